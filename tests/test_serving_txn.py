"""The serving worker's transactional producer settings, and the probe that measures its transactions.

Why (serving/txn.py, docs/SERVING_LATENCY.md "The transaction tail"): kafka-python 3.0.12 waits the
producer's ``retry_backoff_ms`` twice over for every transactional request it has to re-send (the first
``send_offsets_to_transaction`` of each producer is one), so the serving producer runs with a short
back-off. These tests check that the worker's producer really gets it, and that the probe drives the
same transaction cycle to a commit a read_committed reader sees, with each request accounted for.
No TensorFlow: the worker's clients are opened without a model.
"""

from __future__ import annotations

import pytest

from benchmarks import probe_txn_latency as probe
from serving.txn import TXN_RETRY_BACKOFF_MS, serving_producer_overrides
from serving.worker import ServingWorker
from streaming.config import Settings
from streaming.producer import producer_config


def test_the_serving_workers_transactional_producer_gets_the_short_retry_backoff(settings: Settings) -> None:
    worker = ServingWorker(settings, "tiny")
    try:
        worker._topics()
        worker._clients()
        assert worker.producer.config["transactional_id"] == worker.transactional_id
        assert worker.producer.config["retry_backoff_ms"] == TXN_RETRY_BACKOFF_MS
        # The shared producer settings keep kafka-python's default; only the serving producer is shortened.
        assert "retry_backoff_ms" not in producer_config(settings)
    finally:
        worker.close()


def test_overrides_leave_the_transaction_semantics_alone() -> None:
    """Only a wait changes: no acks, idempotence, isolation or timeout setting is overridden."""
    assert set(serving_producer_overrides()) == {"retry_backoff_ms"}


def test_probe_commits_each_cycle_and_times_every_request(settings: Settings) -> None:
    result = probe.run(settings, loops=6, rate=50.0, records=2, load=0, retry_backoff_ms=None, producers=2)
    assert result["retry_backoff_ms"] == TXN_RETRY_BACKOFF_MS  # the probe runs the worker's settings
    assert result["first_txn"]["n"] == 2 and result["calls"]["total"]["n"] == 4
    assert result["init_transactions"]["n"] == 2
    kinds = set(result["requests_rtt"])
    assert {"AddPartitionsToTxnHandler", "AddOffsetsToTxnHandler", "TxnOffsetCommitHandler", "EndTxnHandler",
            "Produce"} <= kinds, kinds
    assert result["error_codes"] == {}
    # Each producer's first transaction looked the group coordinator up: that is the re-sent request.
    assert result["requests_rtt"]["FindCoordinatorHandler"]["n"] >= 2
    assert result["retried_requests"].get("TxnOffsetCommitHandler", 0) >= 2
    assert result["committed_records"] == 6 * 2


@pytest.mark.parametrize("backoff", [5])
def test_probe_honours_an_explicit_backoff(settings: Settings, backoff: int) -> None:
    result = probe.run(settings, loops=2, rate=50.0, records=1, load=0, retry_backoff_ms=backoff)
    assert result["retry_backoff_ms"] == backoff
    assert result["committed_records"] == 2
