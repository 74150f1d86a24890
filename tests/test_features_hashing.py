"""Hashed features are part of a trained model's input contract: pin the hash so a change is caught."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streaming.features.hashing import cached_hash_bucket, hash_bucket, hash_tokens_into, stable_hash32


def test_hash_is_standard_crc32() -> None:
    # The CRC-32 (IEEE) check value of "123456789" is 0xCBF43926 by specification.
    assert stable_hash32("123456789") == 0xCBF43926


def test_pinned_buckets_of_fixed_tokens() -> None:
    assert stable_hash32("a", "weblog-path") == 3069833973
    assert hash_bucket("a", 32, "weblog-path") == (21, -1.0)
    assert hash_bucket("b", 32, "weblog-path") == (15, 1.0)
    assert hash_bucket("index.html", 32, "weblog-path") == (31, 1.0)
    assert cached_hash_bucket("a", 32, "weblog-path") == hash_bucket("a", 32, "weblog-path")


def test_seed_namespaces_tokens() -> None:
    assert stable_hash32("a", "weblog-path") != stable_hash32("a", "other")
    assert stable_hash32("a") != stable_hash32("a", "weblog-path")


def test_same_bucket_in_a_fresh_process_with_other_hash_seed() -> None:
    code = (
        "from streaming.features.hashing import hash_bucket; "
        "print(hash_bucket('index.html', 32, 'weblog-path'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
        cwd=str(Path(__file__).resolve().parents[1]),
    ).stdout.strip()
    assert out == "(31, 1.0)"


def test_hash_tokens_into_adds_signed_counts() -> None:
    out = [0.0] * 40
    hash_tokens_into(out, 8, ["a", "a", "b"], 32, "weblog-path")
    assert out[8 + 21] == -2.0
    assert out[8 + 15] == 1.0
    assert sum(abs(v) for v in out) == 3.0


def test_bucket_count_must_be_positive() -> None:
    with pytest.raises(ValueError, match="n_buckets"):
        hash_bucket("a", 0)
