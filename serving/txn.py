"""Settings of the serving worker's transactional producer that its batch cycle's latency depends on.

Each dynamic batch is one Kafka transaction (``serving/emit.py``): AddPartitionsToTxn, AddOffsetsToTxn,
TxnOffsetCommit, the records' produce and EndTxn, one after another (kafka-python's sender keeps at most
one transactional request in flight and holds the records back until none is), each a round trip the
sender thread must be woken for. Measured with ``benchmarks/probe_txn_latency.py`` (docs/SERVING_LATENCY.md,
"The transaction tail").

Why the retry back-off is lowered: in kafka-python 3.0.12 every transactional request that has to be
*re-sent* costs the producer's ``retry_backoff_ms`` (default 100 ms) twice over, without any error or
log line above DEBUG:

* when a request needs a coordinator the producer does not know yet (the consumer group's, for the
  first ``send_offsets_to_transaction`` of every producer, and again after a NOT_COORDINATOR,
  COORDINATOR_NOT_AVAILABLE, REQUEST_TIMED_OUT or a dropped connection), the sender queues a
  FindCoordinator and then *sleeps in its poll for the whole back-off* with nothing in flight and nobody
  to wake it, sends the lookup, and then ``time.sleep``s the back-off again before re-sending the
  request, because it is marked a retry: 200-230 ms for the first transaction of every worker start,
  against ~6 ms for the others on the same box;
* a CONCURRENT_TRANSACTIONS answer (the previous commit still completing) is retried after the same
  ``time.sleep``: kafka-python lowers the handler's back-off to 20 ms for it (Apache Kafka's
  KAFKA-5477), but its sender sleeps the *config* value, so the lowering has no effect.

20 ms is the back-off Apache Kafka's producer and franz-go use for that retry. It also paces the
producer's other retries (a produce that failed with a retriable error, a failed metadata refresh):
on a broker that refuses for a while, those are re-sent every 20 ms instead of every 100 ms, cheap
requests bounded by ``delivery_timeout_ms`` and ``max_block_ms``. Reconnects keep their own
``reconnect_backoff_ms``. The transaction's semantics do not change: this is only how long the client
waits before it asks again.
"""

from __future__ import annotations

from typing import Any

#: The serving producer's ``retry_backoff_ms`` (kafka-python's default is 100); see the module docstring.
TXN_RETRY_BACKOFF_MS = 20


def serving_producer_overrides() -> dict[str, Any]:
    """Producer settings the serving worker adds to ``streaming.producer.producer_config``'s."""
    return {"retry_backoff_ms": TXN_RETRY_BACKOFF_MS}
