"""Subscriber SDK: decoded records with their coordinates, from a group or from explicit positions.

Two modes:

* **group** (``group=...`` and ``start="committed"``): subscribe in a consumer group, so more
  processes share the partitions; offsets are committed only by an explicit :meth:`commit` (never
  automatically: a worker commits once the effect of a record is durable).
* **positions** (no group, or any other ``start``): explicit assignment of every partition of the
  topics, seeking to the beginning, the end, an offset, or the first record at/after a timestamp
  (``offsets_for_times``). Nothing is committed; a live group is never disturbed.

``until`` bounds the read (an offset, a timestamp, or ``"end"`` = the end offsets when the
subscriber started); iteration stops when every partition reached its bound.

A record that cannot be decoded (bad magic byte, short payload, unknown schema id, truncated
Avro) becomes an :class:`ErrorItem` with its coordinates and reason; it never stops the stream.
A registry outage raises ``RegistryUnavailableError`` instead: that is not the record's fault and
must be retried, not dead-lettered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from schemas.exceptions import FramingError, SchemaError
from schemas.registry import SchemaRegistry, open_registry
from schemas.serde import AvroDeserializer, Decoded
from streaming import cfetch, tenancy
from streaming.aborted_txns import install as _install_abort_filter
from streaming.config import Settings
from streaming.exceptions import OffsetOutOfRangeError, StreamingError
from streaming.idlepoll import (  # noqa: F401 - re-exported: callers import them from here
    FULL_POLL_S,
    IDLE_CAP_LIMIT_S,
    IDLE_MAX_S,
    IdlePoller,
    _joining,
)
from streaming.kafka_compat import install as _install_kafka_fixes
from streaming.kafka_security import kafka_security

_install_kafka_fixes()  # group joins that finish between polls are kept (see streaming.kafka_compat)
_install_abort_filter()  # read_committed sees commits after an old abort (see streaming.aborted_txns)

log = logging.getLogger(__name__)

Position = str | dict[str, Any]
END_RECHECK_S = 2.0  # until="end": seconds without records before the end offsets are asked again


@dataclass(slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    headers: list[tuple[str, bytes]]
    schema_id: int | None
    value: Any
    raw: bytes

    ok = True


@dataclass(slots=True)
class ErrorItem:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    headers: list[tuple[str, bytes]]
    raw: bytes
    error: Exception

    ok = False

    @property
    def reason(self) -> str:
        return f"{type(self.error).__name__}: {self.error}"


Item = Record | ErrorItem


def consumer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "max_poll_records": 2000,
        "fetch_max_bytes": 32 * 1024 * 1024,
        "max_partition_fetch_bytes": 8 * 1024 * 1024,
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 1_000,
        "max_poll_interval_ms": 300_000,
    }
    cfg.update(kafka_security(settings))
    cfg.update(overrides)
    tenancy.check_group(settings, cfg.get("group_id"))
    return cfg


class Subscriber:
    """Iterate decoded records of one or more topics. See the module docstring for the modes.

    Example, reading back what :class:`~streaming.producer.Publisher`'s example sent: ``start`` and
    ``until`` bound the read, so the loop ends at the topic's end offsets instead of waiting::

        >>> from streaming.topics import raw_topic
        >>> with Subscriber(settings, raw_topic(settings, "sensor"), start="beginning", until="end") as sub:
        ...     [(r.value["sensor_id"], r.value["value"]) for r in sub.iterate(idle_timeout_s=10)]
        [('s-1', 21.5)]
    """

    def __init__(self, settings: Settings, topics: str | list[str], *, group: str | None = None,
                 start: Position = "committed", until: Position | None = None,
                 registry: SchemaRegistry | None = None, reader_schema: dict[str, Any] | None = None,
                 isolation_level: str = "read_committed", decode: bool = True,
                 partitions: list[int] | None = None, idle_backoff: bool = False,
                 idle_max_s: float = IDLE_MAX_S, **consumer_overrides: Any) -> None:
        self.settings = settings
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        tenancy.check_topics(settings, self.topics, "subscribe to")  # before any network call
        tenancy.check_group(settings, group)
        self.group = group
        self.decode = decode
        self.registry = registry or (open_registry(settings.registry_url, settings.registry_dir) if decode else None)
        self._deserializer = AvroDeserializer(self.registry, reader_schema) if decode and self.registry else None
        cfg = consumer_config(settings, isolation_level=isolation_level, group_id=group, **consumer_overrides)
        if group is None:
            cfg["enable_auto_commit"] = False
        self.consumer = KafkaConsumer(**cfg)
        self._stop_at: dict[TopicPartition, int] = {}
        self._done: set[TopicPartition] = set()
        self._until_end = until == "end"
        self._quiet_since = time.monotonic()  # the last poll that brought records (until="end" re-checks)
        self.grouped = group is not None and start == "committed"
        if self.grouped:
            self.consumer.subscribe(self.topics)
        else:
            tps = self._partitions(partitions)
            self.consumer.assign(tps)
            self._seek(tps, start)
            if until is not None:
                self._set_until(tps, until)
                # A bounded read of backlog may fetch with librdkafka (streaming/cfetch.py says when and why).
                self.consumer = cfetch.take_over(settings, self.consumer, self.topics, stop_at=self._stop_at,
                                                 until_end=self._until_end, overrides=consumer_overrides,
                                                 isolation_level=isolation_level)
        #: "librdkafka" or "kafka-python": which client fetches this subscriber's records.
        self.fetcher = "librdkafka" if isinstance(self.consumer, cfetch.CFetchConsumer) else "kafka-python"
        # Opt-in: the workers, dashboards and `streamlearn subscribe` turn it on; library users who call
        # poll on ``self.consumer`` themselves keep the client's plain poll.
        self.poller = (IdlePoller(self.consumer, max_idle_s=idle_max_s, probe=self.fetcher == "kafka-python")
                       if idle_backoff else None)

    # -- positioning ----------------------------------------------------------------------
    def _partitions(self, only: list[int] | None) -> list[TopicPartition]:
        # A topic the cluster lists may still be without partition metadata (just created): wait up to
        # 15 s for those. One the cluster does not list at all is missing: said after 3 s, not 18 s of
        # metadata requests sent back to back.
        started = time.monotonic()
        deadline = started + 15
        tps: list[TopicPartition] = []
        for topic in self.topics:
            parts = self.consumer.partitions_for_topic(topic)
            while not parts and time.monotonic() < deadline:
                listed = self.consumer.topics()  # refresh metadata
                parts = self.consumer.partitions_for_topic(topic)
                if not parts and topic not in listed and time.monotonic() - started > 3:
                    break
                if not parts:
                    time.sleep(0.1)  # bounded retry of a metadata request, not a wait for a result
            if not parts:
                raise StreamingError(f"topic {topic!r} does not exist; create it with `streamlearn topics create`")
            tps += [TopicPartition(topic, p) for p in sorted(parts) if only is None or p in only]
        return tps

    def _seek(self, tps: list[TopicPartition], start: Position) -> None:
        if start in ("committed", "beginning"):
            self.consumer.seek_to_beginning(*tps)
        elif start == "end":
            # Resolve the end offsets now: seek_to_end is lazy in kafka-python, and "end" must mean the end
            # when the subscriber was created, or records produced meanwhile (answers to requests sent
            # right after subscribing) would be skipped.
            for tp, end in self.consumer.end_offsets(tps).items():
                self.consumer.seek(tp, end)
        elif isinstance(start, dict) and "offset" in start:
            for tp in tps:
                self.consumer.seek(tp, int(start["offset"]))
        elif isinstance(start, dict) and "offsets" in start:
            for tp in tps:
                self.consumer.seek(tp, int(start["offsets"].get(tp.partition, 0)))
        elif isinstance(start, dict) and "timestamp" in start:
            for tp, offset in self.offsets_for_timestamp(tps, int(start["timestamp"])).items():
                self.consumer.seek(tp, offset)
        else:
            raise ValueError(f"start must be 'committed', 'beginning', 'end', {{'offset': n}}, "
                             f"{{'offsets': {{partition: n}}}} or {{'timestamp': ms}}; got {start!r}")

    def offsets_for_timestamp(self, tps: list[TopicPartition], ts_ms: int,
                              strict: bool = True) -> dict[TopicPartition, int]:
        """First offset at or after ``ts_ms`` per partition (the end offset if none).

        With ``strict``, a timestamp older than what a partition still holds (its earliest offset
        is > 0, i.e. retention deleted records, and the earliest record is newer than ``ts_ms``)
        is an error that says what is available, never a silent jump.
        """
        found = self.consumer.offsets_for_times(dict.fromkeys(tps, ts_ms))
        begin = self.consumer.beginning_offsets(tps)
        end = self.consumer.end_offsets(tps)
        out: dict[TopicPartition, int] = {}
        gone: list[tuple[int, TopicPartition]] = []
        for tp in tps:
            hit = found.get(tp)
            if strict and begin[tp] > 0 and hit is not None and hit.offset == begin[tp]:
                first = self.consumer.offsets_for_times({tp: 0}).get(tp)
                if first is not None and first.timestamp > ts_ms:
                    gone.append((first.timestamp, tp))
            out[tp] = hit.offset if hit is not None else end[tp]
        if gone:  # name the latest such start: the earliest time valid for every partition
            from streaming.timeargs import format_ms

            first_ts, tp = max(gone, key=lambda g: (g[0], g[1].partition))
            raise OffsetOutOfRangeError(
                f"{tp.topic}[{tp.partition}] no longer holds records from {format_ms(ts_ms)}: offsets below "
                f"{begin[tp]} were deleted; the earliest available is offset {begin[tp]} at {format_ms(first_ts)}; "
                f"use a time at or after it (e.g. {first_ts}ms) or start from the beginning")
        return out

    def _set_until(self, tps: list[TopicPartition], until: Position) -> None:
        if until == "end":
            self._stop_at = dict(self.consumer.end_offsets(tps))
        elif isinstance(until, dict) and "offset" in until:
            self._stop_at = dict.fromkeys(tps, int(until["offset"]))
        elif isinstance(until, dict) and "offsets" in until:
            self._stop_at = {tp: int(until["offsets"][tp.partition]) for tp in tps}
        elif isinstance(until, dict) and "timestamp" in until:
            self._stop_at = self.offsets_for_timestamp(tps, int(until["timestamp"]), strict=False)
        else:
            raise ValueError(f"until must be 'end', {{'offset': n}} or {{'timestamp': ms}}; got {until!r}")
        for tp in tps:  # a partition already at its bound is done before the first poll
            if self.consumer.position(tp) >= self._stop_at[tp]:
                self._reached(tp)

    def _reached(self, tp: TopicPartition) -> None:
        """``tp`` is at its ``until`` bound: done, and no longer fetched."""
        self._done.add(tp)
        self.consumer.pause(tp)

    @property
    def finished(self) -> bool:
        """True when ``until`` was given and every partition reached it."""
        return bool(self._stop_at) and len(self._done) == len(self._stop_at)

    # -- reading --------------------------------------------------------------------------
    def _item(self, msg: Any) -> Item:
        raw = msg.value if msg.value is not None else b""
        if self._deserializer is None:
            return Record(msg.topic, msg.partition, msg.offset, msg.timestamp, msg.key, msg.headers or [],
                          None, raw, raw)
        try:
            decoded = self._deserializer(msg.value, {"topic": msg.topic})  # None: a tombstone, said as such
        except (FramingError, SchemaError) as exc:
            return ErrorItem(msg.topic, msg.partition, msg.offset, msg.timestamp, msg.key, msg.headers or [],
                             raw, exc)
        return Record(msg.topic, msg.partition, msg.offset, msg.timestamp, msg.key, msg.headers or [],
                      decoded.schema_id, decoded.value, raw)

    def poll_raw(self, timeout_ms: int = 500, max_records: int | None = None) -> dict[TopicPartition, list[Any]]:
        """One poll of undecoded records per partition, through the idle back-off when it is on."""
        if self.poller is not None:
            return self.poller.poll(timeout_ms=timeout_ms, max_records=max_records)
        return dict(self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records))

    def poll_batch(self, timeout_ms: int = 500, max_records: int | None = None) -> list[Item]:
        """One poll: decoded items of all partitions, in offset order within each partition."""
        if self.finished:
            return []
        polled = self.poll_raw(timeout_ms=timeout_ms, max_records=max_records)
        items: list[Item] = []
        for tp, msgs in polled.items():
            stop = self._stop_at.get(tp)
            if stop is not None and msgs and msgs[-1].offset >= stop:
                msgs = [m for m in msgs if m.offset < stop]  # offsets ascend: the ones before the bound
            items += self._items(msgs)
            if stop is not None and tp not in self._done and self.consumer.position(tp) >= stop:
                self._reached(tp)
        if polled:
            self._quiet_since = time.monotonic()
        elif self._until_end and not self.finished:
            self._recheck_end()
        return items

    def _recheck_end(self) -> None:
        """``until="end"``: a partition whose end offset fell below the bound, and is reached, is done.

        Why: the bound is the end offsets when the read started. The embedded broker killed with -9 loses
        its last writes and comes back with a lower end, so the read would wait for records that are gone
        (until new records take their offsets). Asked after ``END_RECHECK_S`` without records, at most
        that often; a broker that does not answer is asked again later.
        """
        now = time.monotonic()
        if now - self._quiet_since < END_RECHECK_S:
            return
        self._quiet_since = now
        waiting = [tp for tp in self._stop_at if tp not in self._done]
        try:
            ends = self.consumer.end_offsets(waiting)
        except Exception as exc:  # noqa: BLE001 - the broker is away; the next quiet interval asks again
            log.debug("end offsets not available yet: %s", exc)
            return
        for tp, end in ends.items():
            if end < self._stop_at[tp] and self.consumer.position(tp) >= end:
                log.warning("%s[%d]: the end offset fell from %d to %d while reading (the broker lost records); "
                            "the read ends there", tp.topic, tp.partition, self._stop_at[tp], end)
                self._stop_at[tp] = end
                self._reached(tp)

    def _items(self, msgs: list[Any]) -> list[Item]:
        """Items of one partition's fetched records: one decode call per batch, not per record
        (:meth:`schemas.serde.AvroDeserializer.decode_many`; same checks and error items as :meth:`_item`)."""
        if self._deserializer is None:
            return [self._item(m) for m in msgs]
        out: list[Item] = []
        append = out.append
        decodes = self._deserializer.decode_many([m.value for m in msgs])  # None: a tombstone, said as such
        for m, decoded in zip(msgs, decodes, strict=True):
            raw = m.value if m.value is not None else b""
            if isinstance(decoded, Decoded):
                append(Record(m.topic, m.partition, m.offset, m.timestamp, m.key, m.headers or [],
                              decoded.schema_id, decoded.value, raw))
            else:
                append(ErrorItem(m.topic, m.partition, m.offset, m.timestamp, m.key, m.headers or [], raw, decoded))
        return out

    def __iter__(self) -> Iterator[Item]:
        while not self.finished:
            yield from self.poll_batch()

    def iterate(self, max_records: int | None = None, idle_timeout_s: float | None = None,
                batch_done: Callable[[], None] | None = None) -> Iterator[Item]:
        """Iterate with optional bounds: stop after ``max_records`` or ``idle_timeout_s`` without data.

        ``batch_done()`` runs after the caller has taken every item of a fetched batch, before the next
        poll: the place to commit what was handled, once per batch rather than once per record (a
        commit is a broker round trip). A caller that stops early commits its own remainder."""
        count = 0
        last = time.monotonic()
        while not self.finished:
            batch = self.poll_batch(timeout_ms=200)
            if batch:
                last = time.monotonic()
            elif idle_timeout_s is not None and time.monotonic() - last >= idle_timeout_s:
                return
            for item in batch:
                yield item
                count += 1
                if max_records is not None and count >= max_records:
                    return
            if batch and batch_done is not None:
                batch_done()

    # -- control --------------------------------------------------------------------------
    def commit(self, offsets: dict[TopicPartition, int] | None = None, timeout_ms: int | None = None) -> None:
        """Commit next-offsets (``{tp: last_processed + 1}``) for the group; only in group mode.
        ``timeout_ms`` bounds the wait (kafka-python's ``KafkaTimeoutError`` past it); None: the client's own."""
        if self.group is None:
            raise StreamingError("commit needs a consumer group; create the Subscriber with group=...")
        if offsets is None:
            self.consumer.commit(timeout_ms=timeout_ms)
            return
        from kafka.structs import OffsetAndMetadata

        self.consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()},
                             timeout_ms=timeout_ms)

    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

    def pause(self, *tps: TopicPartition) -> None:
        self.consumer.pause(*tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.consumer.resume(*tps)

    def close(self) -> None:
        if self.poller is not None:
            self.poller.close()
        self.consumer.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
