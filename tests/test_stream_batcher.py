"""Micro-batcher: closes at N records or T seconds, per partition, dead letters count as records."""

from __future__ import annotations

import numpy as np
import pytest

from streaming.batcher import BatcherError, MicroBatcher
from streaming.metrics import partition_label, reason_label, start_metrics_server
from streaming.store import StoredRow


class FakeClock:
    """A settable clock (time is an input of the batcher, not a mock of Kafka)."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _row(partition: int, offset: int) -> StoredRow:
    return StoredRow(np.zeros(2, np.float32), {"y": 1.0}, 1_700_000_000_000, "k", "t", partition, offset)


def _batcher(clock: FakeClock, n: int = 3, t: float | None = 2.0) -> MicroBatcher:
    return MicroBatcher(kind="sensor", featurizer_version="sensor-v1", n_features=2, label_names=["y"],
                        max_records=n, max_seconds=t, clock=clock)


def test_closes_at_count_per_partition() -> None:
    clock = FakeClock()
    b = _batcher(clock)
    b.add_row(_row(0, 5), 1)
    b.add_row(_row(1, 0), 1)
    b.add_dead_letter("t", 0, 6)
    assert b.due() == []
    b.add_row(_row(0, 8), 2)
    assert b.due() == [("t", 0)]
    closed = b.close("t", 0, '{"s": 1}')
    assert closed is not None
    assert (closed.spec.first_offset, closed.spec.last_offset, closed.next_offset) == (5, 8, 9)
    assert list(closed.spec.dead_letter_offsets) == [6]
    assert list(closed.spec.schema_ids) == [1, 2]
    assert [r.offset for r in closed.rows] == [5, 8]
    assert closed.spec.featurizer_state == '{"s": 1}'
    assert b.pending("t", 0) == 0 and b.pending("t", 1) == 1


def test_closes_at_age_and_reports_wait() -> None:
    clock = FakeClock()
    b = _batcher(clock)
    assert b.seconds_until_due() is None
    b.add_row(_row(0, 0), None)
    clock.t += 1.5
    assert b.due() == [] and b.seconds_until_due() == pytest.approx(0.5)
    clock.t += 0.5
    assert b.due() == [("t", 0)]
    closed = b.close("t", 0, None)
    assert closed is not None and closed.age_s == pytest.approx(2.0)
    assert b.close("t", 0, None) is None


def test_count_only_mode_for_replays_and_offsets_must_increase() -> None:
    clock = FakeClock()
    b = _batcher(clock, n=2, t=None)
    b.add_row(_row(0, 0), None)
    clock.t += 10_000
    assert b.due() == [] and b.seconds_until_due() is None
    with pytest.raises(BatcherError, match="not after"):
        b.add_row(_row(0, 0), None)
    assert b.drop("t", 0) == (1, 1)  # records, rows
    b.add_row(_row(0, 0), None)  # after a drop the partition may re-read
    with pytest.raises(BatcherError, match="max_records"):
        _batcher(clock, n=0)


def test_metric_labels_are_bounded() -> None:
    assert reason_label("FeatureValidationError") == "FeatureValidationError"
    assert reason_label("SomethingNew" * 5) == "other"
    assert partition_label(3) == "3" and partition_label(10**6) == "other"
    assert start_metrics_server(-1) == -1
    port = start_metrics_server(0, addr="127.0.0.1")
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "streamlearn_stream_records_total" in body


def test_a_taken_metrics_port_falls_back_to_a_free_one_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Two `up`s on one host once raced for port 9102 and the loser crash-looped; now it serves elsewhere."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        taken = holder.getsockname()[1]
        with caplog.at_level("WARNING", logger="streaming.metrics"):
            port = start_metrics_server(taken, addr="127.0.0.1")
    assert port > 0 and port != taken
    assert f"metrics port {taken} on 127.0.0.1 is in use" in caplog.text and f"port {port} instead" in caplog.text
    assert "STREAMLEARN_METRICS_PORT" in caplog.text
