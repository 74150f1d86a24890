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

import threading
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
from streaming.end_offsets import EndOffsetProbe
from streaming.exceptions import OffsetOutOfRangeError, StreamingError
from streaming.kafka_compat import install as _install_kafka_fixes
from streaming.kafka_security import kafka_security

_install_kafka_fixes()  # group joins that finish between polls are kept (see streaming.kafka_compat)
_install_abort_filter()  # read_committed sees commits after an old abort (see streaming.aborted_txns)

Position = str | dict[str, Any]


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


IDLE_MAX_S = 0.064  # back-off cap: ~15 empty polls/s idle, first record after idle within about one cap
IDLE_CAP_LIMIT_S = 0.5  # no back-off cap above this: a record after idle waits at most about one cap
FULL_POLL_S = 1.0  # with the end-offset probe, a real fetch still at least this often (rebalances, poll interval)


def _joining(consumer: KafkaConsumer) -> bool:
    """True while this group member wants to (re-)join: a rebalance is under way for it.

    Reads kafka-python's coordinator state (``need_rejoin``); False for consumers with manually
    assigned partitions, which never join, and wherever that state is not there.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    subscription = getattr(consumer, "_subscription", None)
    if coordinator is None or subscription is None or getattr(coordinator, "group_id", None) is None:
        return False
    try:
        return bool(subscription.partitions_auto_assigned() and coordinator.need_rejoin())
    except Exception:  # an internal we do not know: behave as outside a rebalance
        return False


class IdlePoller:
    """``consumer.poll`` that sleeps between empty polls instead of spinning on an idle topic.

    kafka-python sends the next fetch as soon as an empty one returns and relies on the broker to
    hold it for ``fetch_max_wait_ms``. The embedded broker (noida-db) answers empty fetches at once,
    so a plain ``poll(200)`` on an idle topic re-fetches in a tight loop and burns most of a core.

    This never touches ``pause()``/``resume()`` (the first version paused idle partitions during the
    back-off; that raced with the workers' own pauses and rebalance repositioning, see docs/IDLE.md).
    With partitions assigned and fetchable it calls ``poll(read_ms)`` -- a short poll that sends a
    fetch and reads its answer, so what it sees is fresh, not one back-off old -- and, when nothing
    came, sleeps a back-off that doubles from ``min_idle_s`` to ``max_idle_s`` (at most
    ``IDLE_CAP_LIMIT_S``). Records or an assignment change reset the back-off (a change also ends the
    call, so the caller sees the rebalance before any record of the new assignment). With nothing
    assigned, everything paused by the caller, or a group (re-)join under way, it is kafka-python's
    own ``poll(timeout_ms)``: the fetcher is idle or the call waits on the join, so kafka-python does
    not spin, and a join completes inside the call rather than one back-off later. Group joins
    that finish between two calls are kept by :mod:`streaming.kafka_compat` (installed on import);
    without it kafka-python threw them away and the short polls kept a group rebalancing forever.
    Heartbeats run on kafka-python's IO thread; a join under way is polled through in the call that
    sees it, and an idle consumer fetches at least once per back-off cap (the back-off keeps its own
    schedule across calls, so a call that ends inside it returns ``{}`` without a fetch), so rebalance
    callbacks and ``max_poll_interval_ms`` behave as with a plain poll. A call never lasts
    longer than ``timeout_ms`` (plus one fetch), and a set ``wake`` event ends its back-off at once
    (the workers pass their stop event, so SIGTERM is not delayed by a sleep). On Apache Kafka it
    only adds a short sleep between empty polls.

    Once a back-off is under way (an empty fetch since the last records), a due check first asks
    :class:`streaming.end_offsets.EndOffsetProbe` whether any fetchable partition's last stable
    offset differs from the consumer's position: one ListOffsets round trip on a private socket,
    ~10x cheaper than an empty ``poll``. Only "yes" or "cannot tell" leads to the real fetch; "no"
    counts as an empty poll. A real fetch still happens at least every ``full_poll_s``.
    ``probe=False`` turns it off.
    """

    def __init__(self, consumer: KafkaConsumer, min_idle_s: float = 0.001, max_idle_s: float = IDLE_MAX_S,
                 read_ms: int = 2, wake: threading.Event | None = None, probe: bool = True,
                 full_poll_s: float = FULL_POLL_S) -> None:
        if not 0 < min_idle_s <= max_idle_s <= IDLE_CAP_LIMIT_S:
            raise ValueError(f"IdlePoller needs 0 < min_idle_s <= max_idle_s <= {IDLE_CAP_LIMIT_S} s (a longer cap "
                             f"delays the first record after idle); got min_idle_s={min_idle_s}, "
                             f"max_idle_s={max_idle_s}")
        self.consumer = consumer
        self.min_idle_s, self.max_idle_s, self.read_ms = min_idle_s, max_idle_s, read_ms
        self.wake = wake
        self._idle_s = min_idle_s
        #: monotonic time before which no fetch is sent (one back-off after the last empty poll); 0: none.
        self._next_fetch_at = 0.0
        self._assigned: frozenset[TopicPartition] = frozenset()
        self.probe = EndOffsetProbe(consumer) if probe else None
        self.full_poll_s = full_poll_s
        self._polled_at = 0.0  # monotonic time of the last real fetch
        self.fetches = 0  # real fetches made (tests and docs/IDLE.md read it)

    def close(self) -> None:
        """Close the probe's socket (the consumer is the caller's to close)."""
        if self.probe is not None:
            self.probe.close()

    def reset(self) -> None:
        """Forget the back-off (the next poll fetches at once; an empty one then sleeps ``min_idle_s``)."""
        self._idle_s = self.min_idle_s
        self._next_fetch_at = 0.0

    def poll(self, timeout_ms: int = 200, max_records: int | None = None) -> dict[TopicPartition, list[Any]]:
        """Like ``KafkaConsumer.poll``: records as soon as there are some, else ``{}`` after ``timeout_ms``."""
        deadline = time.monotonic() + max(0, timeout_ms) / 1000
        while True:
            assigned = frozenset(self.consumer.assignment())
            if assigned != self._assigned:
                first, self._assigned = not self._assigned, assigned
                self.reset()
                if not first and time.monotonic() < deadline and assigned:
                    # A rebalance happened inside this call: hand control back before fetching more,
                    # so the caller repositions the new partitions first (as after a plain poll).
                    return {}
            if not assigned or assigned <= set(self.consumer.paused()) or _joining(self.consumer):
                remaining_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
                records = self._got(self.consumer.poll(timeout_ms=remaining_ms, max_records=max_records))
                if records or remaining_ms == 0 or frozenset(self.consumer.assignment()) == assigned:
                    return records
                continue  # the join ended inside the poll: apply the assignment change above
            # The back-off runs on its own clock, across calls: the next fetch is due one back-off after
            # the last empty one, however the caller slices its time. (When each call started with a
            # fetch and ended with one at its deadline, a worker polling in 100 ms calls fetched ~30
            # times a second with a 64 ms cap instead of ~15, doubling its idle CPU.)
            now = time.monotonic()
            if now < self._next_fetch_at:
                pause_s = min(self._next_fetch_at, deadline) - now  # a back-off, not a wait for an event
                if pause_s > 0:
                    if self.wake is None:
                        time.sleep(pause_s)
                    elif self.wake.wait(pause_s):
                        return {}
                if time.monotonic() >= deadline and time.monotonic() < self._next_fetch_at:
                    return {}  # the call's time ran out inside the back-off: no fetch is due yet
                continue  # re-check the assignment and joins, then fetch
            if self._nothing_new(assigned, now):
                records = {}
            else:
                # Not poll(0): that returns the answer to the fetch sent one back-off ago and costs as much.
                # A full read_ms even at the deadline: a call may end one short fetch late, never early.
                records = self.consumer.poll(timeout_ms=self.read_ms, max_records=max_records)
                self._polled_at = time.monotonic()
                self.fetches += 1
                if records:
                    return self._got(records)
            self._next_fetch_at = time.monotonic() + self._idle_s
            self._idle_s = min(self.max_idle_s, self._idle_s * 2)
            if time.monotonic() >= deadline:
                return {}

    def _nothing_new(self, assigned: frozenset[TopicPartition], now: float) -> bool:
        """True when the probe says no fetchable partition has anything past its position (so no fetch is
        needed now); False to fetch: no probe, no back-off under way yet, a real fetch due, or the probe
        saw news or could not tell."""
        if self.probe is None or self._idle_s <= self.min_idle_s or now - self._polled_at >= self.full_poll_s:
            return False
        return self.probe.has_news(assigned - set(self.consumer.paused())) is False

    def _got(self, records: Any) -> dict[TopicPartition, list[Any]]:
        if records:
            self.reset()
        return dict(records)


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
                self.consumer = cfetch.take_over(settings, self.consumer, self.topics, grouped=False,
                                                 stop_at=self._stop_at, until_end=until == "end",
                                                 overrides=consumer_overrides, isolation_level=isolation_level)
        #: "librdkafka" or "kafka-python": which client fetches this subscriber's records.
        self.fetcher = "librdkafka" if isinstance(self.consumer, cfetch.CFetchConsumer) else "kafka-python"
        # Opt-in: the workers, dashboards and `streamlearn subscribe` turn it on; library users who call
        # poll on ``self.consumer`` themselves keep the client's plain poll.
        self.poller = (IdlePoller(self.consumer, max_idle_s=idle_max_s, probe=self.fetcher == "kafka-python")
                       if idle_backoff else None)

    # -- positioning ----------------------------------------------------------------------
    def _partitions(self, only: list[int] | None) -> list[TopicPartition]:
        deadline = time.monotonic() + 15
        tps: list[TopicPartition] = []
        for topic in self.topics:
            parts = self.consumer.partitions_for_topic(topic)
            while not parts and time.monotonic() < deadline:
                self.consumer.topics()  # refresh metadata
                parts = self.consumer.partitions_for_topic(topic)
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
            decoded = self._deserializer(raw, {"topic": msg.topic})
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
                self._done.add(tp)
                self.consumer.pause(tp)
        return items

    def _items(self, msgs: list[Any]) -> list[Item]:
        """Items of one partition's fetched records: one decode call per batch, not per record
        (:meth:`schemas.serde.AvroDeserializer.decode_many`; same checks and error items as :meth:`_item`)."""
        if self._deserializer is None:
            return [self._item(m) for m in msgs]
        raws = [m.value if m.value is not None else b"" for m in msgs]
        out: list[Item] = []
        append = out.append
        for m, raw, decoded in zip(msgs, raws, self._deserializer.decode_many(raws), strict=True):
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
    def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        """Commit next-offsets (``{tp: last_processed + 1}``) for the group; only in group mode."""
        if self.group is None:
            raise StreamingError("commit needs a consumer group; create the Subscriber with group=...")
        if offsets is None:
            self.consumer.commit()
            return
        from kafka.structs import OffsetAndMetadata

        self.consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})

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
