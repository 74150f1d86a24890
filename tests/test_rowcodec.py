"""Column-wise batch encoding writes the very bytes ``fastavro.writer`` writes for the same rows.

Why bytes: a batch's sha256 is its identity (manifest, model lineage, ``retrain --reproduce``),
so the faster encoder must not change one byte of any batch, old or new. The oracle below is the
dict-per-row fastavro encoding ``store.encode_rows`` used before.
"""

from __future__ import annotations

import io
import json
import random

import fastavro
import numpy as np
import pytest

from streaming.exceptions import StoreError
from streaming.rowcodec import zigzag_varint
from streaming.store import StoredRow, encode_rows, read_batch
from streaming.store_format import _PARSED_ROW_SCHEMA, SYNC_INTERVAL, _sync_marker


def _oracle(batch_id: str, rows: list[StoredRow], n_features: int, label_names: list[str]) -> bytes:
    records = [{"x": np.asarray(r.x, dtype=np.float32).reshape(-1).tolist(),
                "labels": {n: (None if r.labels.get(n) is None else float(r.labels[n]))  # type: ignore[arg-type]
                           for n in label_names},
                "event_time_ms": int(r.event_time_ms), "key": r.key, "topic": r.topic,
                "partition": int(r.partition), "offset": int(r.offset)} for r in rows]
    buf = io.BytesIO()
    meta = {"streamlearn.batch_id": batch_id, "streamlearn.n_features": str(n_features),
            "streamlearn.label_names": json.dumps(list(label_names))}
    fastavro.writer(buf, _PARSED_ROW_SCHEMA, records, codec="snappy", sync_marker=_sync_marker(batch_id),
                    metadata=meta, sync_interval=SYNC_INTERVAL)
    return buf.getvalue()


def _rows(rng: random.Random, n: int, f: int, labels: list[str]) -> list[StoredRow]:
    out = []
    for i in range(n):
        x = np.array([rng.choice([0.0, -0.0, 1e-40, 3.25, -7.5e30, rng.uniform(-1e6, 1e6)]) for _ in range(f)],
                     dtype=np.float32)
        lab = {name: rng.choice([None, 0.0, 1.0, -2.5e-300, rng.random()]) for name in labels}
        out.append(StoredRow(x, lab, rng.choice([-62_000_000_000_000, 0, 63, 64, 1_700_000_000_000 + i]),
                             rng.choice(["s1", "sensör-ü", "", "k" * 300]), "pre.sensor.raw", rng.choice([0, 3, 70]),
                             rng.choice([0, 1, 63, 64, 2**40 + i])))
    return out


@pytest.mark.parametrize(("n", "f", "labels"), [(0, 5, ["a"]), (1, 1, []),
                                                (300, 22, ["next_value_delta", "is_anomaly"]),
                                                (40, 64, ["is_bot_or_attack", "is_error", "is_failed"])])
def test_bytes_equal_fastavro(n: int, f: int, labels: list[str]) -> None:
    rows = _rows(random.Random(n * 31 + f), n, f, labels)
    assert encode_rows("t-p0-1-2", rows, f, labels) == _oracle("t-p0-1-2", rows, f, labels)


def test_multi_block_batch_equals_fastavro_and_reads_back(tmp_path: object) -> None:
    """Over ``SYNC_INTERVAL`` bytes fastavro starts a new block at the same row as ours."""
    f = 300  # 1.2 KB a row: 1 MiB is crossed after ~870 rows
    rng = np.random.default_rng(3)
    rows = [StoredRow(rng.standard_normal(f).astype(np.float32), {"y": float(i)}, 1_700_000_000_000 + i, f"k{i % 7}",
                      "t", 2, 1000 + i) for i in range(950)]
    data = encode_rows("t-p2-x", rows, f, ["y"])
    assert data == _oracle("t-p2-x", rows, f, ["y"])
    path = tmp_path / "b.avro"  # type: ignore[operator]
    path.write_bytes(data)
    back = read_batch(path)
    np.testing.assert_array_equal(back["x"], np.stack([r.x for r in rows]))
    assert back["offset"].tolist() == [r.offset for r in rows]


def test_a_row_of_another_width_is_refused_with_its_offset() -> None:
    rows = [StoredRow(np.zeros(3, np.float32), {}, 0, "k", "t", 0, 5),
            StoredRow(np.zeros(4, np.float32), {}, 0, "k", "t", 0, 6)]
    with pytest.raises(StoreError, match="offset 6 has 4 features"):
        encode_rows("b", rows, 3, [])


def test_zigzag_varint_matches_avro() -> None:
    for n, want in [(0, b"\x00"), (-1, b"\x01"), (1, b"\x02"), (-64, b"\x7f"), (64, b"\x80\x01"),
                    (2**63 - 1, b"\xfe" + b"\xff" * 8 + b"\x01"), (-(2**63), b"\xff" * 9 + b"\x01")]:
        assert zigzag_varint(n) == want, n
