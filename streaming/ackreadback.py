"""The ack ledger's read-back: which records a partition holds now at offsets the broker once acked.

Why apart from :mod:`streaming.ackguard`: the ledger decides *what* to re-send (under its lock, with
its bookkeeping); this reads the broker, slowly and fallibly, with a consumer of its own, and knows
the embedded broker's answers after a crash. A read that fails drops its consumer, so the next tick
starts from a fresh one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

#: How long one read-back may take before the tick gives up (the next tick tries again).
READ_BACK_S = 30.0


def record_digest(key: bytes | None, value: bytes | None, headers: Any) -> str:
    """Identity of one record as sent: sha1 over key, value and headers (stable across processes)."""
    h = hashlib.sha1()
    for part in (key or b"", value or b""):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    for name, val in headers or ():
        h.update(name.encode() + b"\x00" + len(val or b"").to_bytes(8, "big") + (val or b""))
    return h.hexdigest()



def _end_offsets(consumer: Any, partitions: list[Any]) -> dict[Any, int]:
    """End offsets; 0 for a partition the broker no longer has, or answers "no offset" for.

    Why: the embedded broker, killed with -9, can come back without a partition's log, or without a
    topic created shortly before the kill; the next metadata request re-creates such a topic with one
    partition. kafka-python then raises ``KeyError`` for the whole call (it drops the broker's -1 and
    indexes its answer), and for a partition that is not in the metadata it retries until its timeout,
    on every tick. The ledger's re-sends wait for this read-back, so it never settled and the records it
    held were never sent again (tests/test_cproduce.py, tests/test_ackreadback.py). Such a partition
    holds none of the acked records, which is what an end of 0 says, so they are all sent again."""
    from kafka.errors import KafkaTimeoutError

    try:
        return dict(consumer.end_offsets(partitions))
    except (KeyError, KafkaTimeoutError):
        pass
    ends: dict[Any, int] = {}
    known: dict[str, set[int]] = {}
    for tp in partitions:
        if tp.topic not in known:
            known[tp.topic] = set(consumer.partitions_for_topic(tp.topic) or ())
        if tp.partition not in known[tp.topic]:
            log.warning("the broker no longer has %s (it lost it in a crash); its acked records are sent again", tp)
            ends[tp] = 0
            continue
        try:
            ends.update(consumer.end_offsets([tp]))  # a timeout here is a slow broker: the next tick retries
        except KeyError:
            log.warning("the broker has no end offset for %s (it lost the partition's log in a crash); "
                        "its acked records are sent again", tp)
            ends[tp] = 0
    return ends


class ReadBack:
    """Reads the records at given offsets back from the broker, as digests (:func:`record_digest`)."""

    def __init__(self, bootstrap: str, consumer_config: dict[str, Any] | None = None) -> None:
        self.bootstrap = bootstrap
        self._consumer_config = consumer_config or {}
        self._consumer: Any = None

    def held(self, wanted: dict[tuple[str, int], set[int]]) -> dict[tuple[str, int], dict[int, str]]:
        """``{(topic, partition): {offset: digest}}`` of the wanted offsets the partition holds now; an
        offset at or past the partition's end is simply absent (lost). Raises on a failed read."""
        try:
            return self._read(wanted)
        except Exception:
            self.close()
            raise

    def _read(self, wanted: dict[tuple[str, int], set[int]]) -> dict[tuple[str, int], dict[int, str]]:
        from kafka import KafkaConsumer, TopicPartition

        from streaming.kafka_compat import FETCH_RESPONSE_MAX_BYTES

        if self._consumer is None:  # the embedded broker answers with the whole backlog (kafka_compat, fix 4)
            self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                           request_timeout_ms=5000, receive_message_max_bytes=FETCH_RESPONSE_MAX_BYTES,
                                           **self._consumer_config)
        consumer = self._consumer
        tps = {TopicPartition(topic, partition): offsets for (topic, partition), offsets in wanted.items()}
        ends = _end_offsets(consumer, list(tps))
        held: dict[tuple[str, int], dict[int, str]] = {key: {} for key in wanted}
        want: dict[Any, set[int]] = {}
        for tp, offsets in tps.items():
            below = {o for o in offsets if o < ends[tp]}
            if below:
                want[tp] = below
        consumer.assign(list(want))
        for tp, offsets in want.items():
            consumer.seek(tp, min(offsets))
        deadline = time.monotonic() + READ_BACK_S
        while any(consumer.position(tp) <= max(offs) for tp, offs in want.items()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {sorted(str(tp) for tp in want)} back within {READ_BACK_S:g} s")
            for tp, msgs in consumer.poll(timeout_ms=500).items():
                offsets = want.get(tp, set())
                for m in msgs:
                    if m.offset in offsets:
                        held[(tp.topic, tp.partition)][m.offset] = record_digest(m.key, m.value, m.headers)
        return held

    def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close()
            except Exception as exc:  # noqa: BLE001 - closing a broken consumer is best effort
                log.debug("closing the ack ledger's read-back consumer: %s", exc)
