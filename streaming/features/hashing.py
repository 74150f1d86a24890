"""Stable signed feature hashing (the "hashing trick") for open vocabularies such as URL paths.

Why a hand-picked hash: the bucket a token lands in is part of a trained model's input contract.
Python's ``hash()`` is salted per process, so it would give a different feature vector in the
trainer and in serving. We use CRC-32 (``zlib.crc32``): it is specified (IEEE 802.3), identical on
every platform and Python version, and implemented in C, so hashing a handful of path tokens per
record costs well under a microsecond each.

Signed hashing: besides the bucket, one independent bit of the hash gives a sign (+1/-1), so
collisions cancel out in expectation instead of always adding up (Weinberger et al., 2009).

Changing anything here (hash function, seed handling, bit choice) changes every hashed feature:
it requires a new featurizer version. ``tests/test_features_hashing.py`` pins expected buckets so
such a change cannot slip in unnoticed.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

#: Bit of the 32-bit hash that decides the sign; bucket indices use the low bits, so with any
#: bucket count up to 2**31 the sign is independent of the bucket for a power-of-two count.
_SIGN_BIT = 31


def stable_hash32(token: str, seed: str = "") -> int:
    """Return an unsigned 32-bit hash of ``seed + "\\x1f" + token`` (UTF-8), equal across processes.

    ``seed`` namespaces feature groups (e.g. ``"path"`` vs ``"query"``) so the same word used in
    two roles does not deterministically collide.
    """
    data = (seed + "\x1f" + token).encode("utf-8") if seed else token.encode("utf-8")
    return zlib.crc32(data) & 0xFFFFFFFF


def hash_bucket(token: str, n_buckets: int, seed: str = "") -> tuple[int, float]:
    """Return ``(bucket, sign)`` for ``token``: bucket in ``[0, n_buckets)``, sign ``+1.0``/``-1.0``."""
    if n_buckets <= 0:
        raise ValueError(f"n_buckets must be a positive int, got {n_buckets!r}")
    h = stable_hash32(token, seed)
    sign = -1.0 if (h >> _SIGN_BIT) & 1 else 1.0
    return h % n_buckets, sign


@lru_cache(maxsize=65536)
def cached_hash_bucket(token: str, n_buckets: int, seed: str = "") -> tuple[int, float]:
    """:func:`hash_bucket` behind a bounded LRU cache: web paths repeat heavily in real traffic."""
    return hash_bucket(token, n_buckets, seed)


def hash_tokens_into(
    out: list[float], offset: int, tokens: tuple[str, ...] | list[str], n_buckets: int, seed: str = ""
) -> None:
    """Add the signed hashed counts of ``tokens`` to ``out[offset : offset + n_buckets]`` in place."""
    for token in tokens:
        bucket, sign = cached_hash_bucket(token, n_buckets, seed)
        out[offset + bucket] += sign
