"""Columnar encoding of a feature batch into the exact bytes fastavro writes for it.

Why: :func:`streaming.store.encode_rows` built a dict per row and let fastavro encode it field by
field (each feature a separate float write); that was a fifth of the stream worker's time. Here the
feature matrix is converted once (``float32`` little endian, which is Avro's ``float``), the
constant parts of a row (the array and map headers, the topic, the label names) are encoded once per
batch, and only the varying fields are encoded per row.

The output must stay byte-identical to ``fastavro.writer`` for the same rows, because a batch's
sha256 is its identity (manifests, lineage, ``retrain --reproduce``). So the container is fastavro's:
its header is written by fastavro itself, blocks are closed at the same size (``sync_interval``), and
compressed by the same snappy function fastavro uses; ``tests/test_rowcodec.py`` compares the bytes
with ``fastavro.writer`` for single- and multi-block batches.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any, cast

import fastavro
import numpy as np

from streaming.exceptions import StoreError

_DOUBLE = struct.Struct("<d").pack
_CRC = struct.Struct(">I").pack
_SMALL = [bytes([(n << 1) & 0xFF]) if n < 64 else b"" for n in range(64)]


def _snappy() -> Callable[[bytes], Any]:
    """The very compressor fastavro's snappy codec uses (cramjam when installed, else python-snappy);
    it returns a buffer (bytes or a cramjam Buffer)."""
    from fastavro import _write_py

    return cast(Callable[[bytes], Any], _write_py.snappy_compress)


def zigzag_varint(n: int) -> bytes:
    """Avro's ``long``/``int`` encoding: zig-zag, then 7-bit groups, least significant first."""
    if 0 <= n < 64:
        return _SMALL[n]
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return zigzag_varint(len(data)) + data


def encode_container(rows: Sequence[Any], n_features: int, label_names: Sequence[str], *, schema: Any,
                     codec: str, sync_marker: bytes, metadata: dict[str, str], sync_interval: int) -> bytes:
    """The Avro container fastavro writes for ``rows`` (objects with ``x``, ``labels``,
    ``event_time_ms``, ``key``, ``topic``, ``partition``, ``offset``) with the FeatureRow schema."""
    if codec != "snappy":
        raise StoreError(f"codec: only snappy is encoded column-wise, got {codec!r}")
    out = io.BytesIO()
    fastavro.writer(out, schema, [], codec=codec, sync_marker=sync_marker, metadata=metadata,
                    sync_interval=sync_interval)  # the header, byte for byte as fastavro writes it
    if not rows:
        return out.getvalue()
    x = _feature_matrix(rows, n_features)
    xbytes = x.tobytes()
    width = 4 * n_features
    x_head = zigzag_varint(n_features)
    names = list(label_names)
    label_head = zigzag_varint(len(names)) if names else b""
    label_keys = [_string(name) for name in names]
    strings: dict[str, bytes] = {}
    compress = _snappy()
    block: list[bytes] = []
    size = count = 0
    for i, r in enumerate(rows):
        labels = r.labels
        parts = [x_head, xbytes[i * width:(i + 1) * width], b"\x00", label_head]
        for name, key in zip(names, label_keys, strict=True):
            v = labels.get(name)
            parts.append(key + (b"\x00" if v is None else b"\x02" + _DOUBLE(float(v))))
        parts.append(b"\x00")  # the map's end (an empty map is this byte alone)
        key_b = strings.get(r.key)
        if key_b is None:
            key_b = strings[r.key] = _string(r.key)
        topic_b = strings.get(r.topic)
        if topic_b is None:
            topic_b = strings[r.topic] = _string(r.topic)
        parts += (zigzag_varint(int(r.event_time_ms)), key_b, topic_b, zigzag_varint(int(r.partition)),
                  zigzag_varint(int(r.offset)))
        data = b"".join(parts)
        block.append(data)
        size += len(data)
        count += 1
        if size >= sync_interval:  # fastavro closes a block once its buffer reaches the interval
            _write_block(out, block, count, compress, sync_marker)
            block, size, count = [], 0, 0
    if count:
        _write_block(out, block, count, compress, sync_marker)
    return out.getvalue()


def _feature_matrix(rows: Sequence[Any], n_features: int) -> np.ndarray:
    """``(len(rows), n_features)`` little-endian float32; a row of another width is a StoreError."""
    try:
        x = np.array([r.x for r in rows], dtype="<f4")
        if x.ndim == 2 and x.shape[1] == n_features:
            return x
    except ValueError:  # ragged rows: find the culprit below
        pass
    for r in rows:
        n = np.asarray(r.x).size
        if n != n_features:
            raise StoreError(f"rows: offset {r.offset} has {n} features, the batch needs {n_features}")
    return np.array([np.asarray(r.x, dtype="<f4").reshape(-1) for r in rows], dtype="<f4")


def _write_block(out: io.BytesIO, block: list[bytes], count: int, compress: Callable[[bytes], Any],
                 sync_marker: bytes) -> None:
    raw = b"".join(block)
    data = compress(raw)
    out.write(zigzag_varint(count))
    out.write(zigzag_varint(len(data) + 4))  # the CRC follows the compressed bytes
    out.write(data)
    out.write(_CRC(zlib.crc32(raw) & 0xFFFFFFFF))
    out.write(sync_marker)
