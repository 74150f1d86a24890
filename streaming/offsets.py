"""Positions on a topic: timestamps -> offsets with honest errors, and live group offsets.

Why a module of its own: ``streamlearn replay`` and ``streamlearn offsets reset`` both turn a
timestamp into offsets, and both must refuse, with a message that says what *is* available,
a timestamp the topic no longer holds (records before it were deleted) or does not hold yet
(after the last record) instead of silently jumping to one end. The check asks the topic (beginning
offsets, ``offsets_for_times``), never retention arithmetic.

Kafka timestamps are the records' broker/producer timestamps (``CreateTime``: when the event was
published), not the event-time field inside the Avro record.

Resetting a live group's offsets is only allowed while the group has no live members (checked with
``KafkaAdminClient.describe_groups``; dead members of this host are removed, see
:mod:`streaming.members`); otherwise :class:`GroupActiveError`. Note that a live worker
resumes after the highest offset its feature store already holds, so moving a group *back* does
not rewrite live batches; rebuild older ranges with ``streamlearn replay`` into a namespace.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from streaming.config import Settings
from streaming.exceptions import AfterLastRecordError, GroupActiveError, OffsetOutOfRangeError, StreamingError
from streaming.kafka_security import kafka_security
from streaming.timeargs import format_ms

#: Group states in which no member holds partitions.
INACTIVE_STATES = frozenset({"Empty", "Dead"})


@dataclass(frozen=True)
class PartitionPosition:
    """One partition's committed offset against what the topic holds."""

    partition: int
    committed: int | None
    earliest: int
    latest: int

    @property
    def lag(self) -> int | None:
        return None if self.committed is None else max(0, self.latest - self.committed)


@contextmanager
def _consumer(settings: Settings, **cfg: Any) -> Iterator[KafkaConsumer]:
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False,
                             **kafka_security(settings), **cfg)
    try:
        yield consumer
    finally:
        consumer.close()


def topic_names(settings: Settings) -> set[str]:
    """The names of every topic on the cluster now."""
    with _consumer(settings, request_timeout_ms=10_000) as consumer:
        return set(consumer.topics())


def partitions_of(consumer: KafkaConsumer, topic: str, timeout_s: float = 10.0) -> list[TopicPartition]:
    deadline = time.monotonic() + timeout_s
    parts = consumer.partitions_for_topic(topic)
    while not parts and time.monotonic() < deadline:
        consumer.topics()  # refresh metadata (bounded retry while a new topic propagates)
        parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise StreamingError(f"topic: {topic!r} does not exist; create it with `streamlearn topics create`")
    return [TopicPartition(topic, p) for p in sorted(parts)]


def _first_timestamps(consumer: KafkaConsumer, tps: list[TopicPartition]) -> dict[TopicPartition, Any]:
    return dict(consumer.offsets_for_times(dict.fromkeys(tps, 0)))


def _last_timestamp(consumer: KafkaConsumer, tps: list[TopicPartition],
                    ends: dict[TopicPartition, int], begins: dict[TopicPartition, int]) -> int | None:
    """Timestamp of the newest record (reads the last record of each partition)."""
    wanted = [tp for tp in tps if ends[tp] > begins[tp]]
    if not wanted:
        return None
    consumer.assign(wanted)
    for tp in wanted:
        consumer.seek(tp, ends[tp] - 1)
    newest: int | None = None
    remaining = set(wanted)
    deadline = time.monotonic() + 10
    while remaining and time.monotonic() < deadline:
        for tp, msgs in consumer.poll(timeout_ms=300).items():
            for m in msgs:
                newest = m.timestamp if newest is None else max(newest, m.timestamp)
            remaining.discard(tp)
            consumer.pause(tp)
    consumer.unsubscribe()
    return newest


def offsets_for_timestamp(settings: Settings, topic: str, ts_ms: int, *, bound: str = "start",
                          flag: str = "--from-timestamp", earliest_flag: str = "--from-beginning",
                          latest_flag: str | None = None) -> dict[int, int]:
    """First offset per partition whose record timestamp is >= ``ts_ms``.

    ``bound="start"`` (a replay's --from-timestamp or a reset's --to-timestamp) is checked against
    what the topic really holds, never against retention arithmetic (a topic may hold records older
    than its retention, e.g. the embedded broker's or one whose cleaner has not run):

    * a timestamp before the earliest retained record of a partition whose earliest offset is > 0
      (records were deleted, so part of ``[ts_ms, earliest)`` is gone) is an
      :class:`OffsetOutOfRangeError` naming that offset and its time;
    * a timestamp before the first record of a partition that still starts at offset 0 is fine:
      nothing was lost, the range starts at offset 0;
    * a timestamp after the newest record, or a topic without records, is an error too.

    ``bound="end"`` (a replay's --to): partitions with nothing at/after the timestamp end at their end
    offset, and an early timestamp is simply an empty range. ``flag``/``earliest_flag``/``latest_flag``
    are the command's own flag names, quoted in the errors.
    """
    with _consumer(settings) as consumer:
        tps = partitions_of(consumer, topic)
        begins = consumer.beginning_offsets(tps)
        ends = consumer.end_offsets(tps)
        found = consumer.offsets_for_times(dict.fromkeys(tps, ts_ms))
        out = {tp.partition: (found[tp].offset if found.get(tp) is not None else ends[tp]) for tp in tps}
        if bound != "start":
            return out
        if all(ends[tp] == begins[tp] for tp in tps):
            raise OffsetOutOfRangeError(f"{flag}: topic {topic!r} holds no records; nothing to start from")
        firsts = _first_timestamps(consumer, tps)
        earliest = min((f.timestamp for f in firsts.values() if f is not None), default=None)
        gone = [(f.timestamp, tp) for tp, f in firsts.items()
                if f is not None and begins[tp] > 0 and f.timestamp > ts_ms]
        if gone:  # name the latest such start: the earliest time valid for every partition
            first_ts, tp = max(gone, key=lambda g: (g[0], g[1].partition))
            raise OffsetOutOfRangeError(
                f"{flag}: {format_ms(ts_ms)} is before what {topic!r} still holds: partition {tp.partition}'s "
                f"offsets below {begins[tp]} were deleted, its earliest available record is offset "
                f"{begins[tp]} at {format_ms(first_ts)} (the topic's earliest is at {format_ms(earliest)}); "
                f"use {flag} at or after {first_ts}ms, or {earliest_flag} to take everything still there")
        if all(found.get(tp) is None for tp in tps):
            newest = _last_timestamp(consumer, tps, ends, begins)
            alt = f", or {latest_flag} to skip to the end" if latest_flag else ""
            raise AfterLastRecordError(
                f"{flag}: {format_ms(ts_ms)} is after the last record of {topic!r} (newest at "
                f"{format_ms(newest)}); use an earlier time{alt}")
        return out


def earliest_and_end(settings: Settings, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    """``(beginning offsets, end offsets)`` per partition, as the broker reports them now."""
    with _consumer(settings) as consumer:
        tps = partitions_of(consumer, topic)
        begins = consumer.beginning_offsets(tps)
        ends = consumer.end_offsets(tps)
    return ({tp.partition: begins[tp] for tp in tps}, {tp.partition: ends[tp] for tp in tps})


def group_state(settings: Settings, group: str) -> tuple[str, int]:
    """``(state, member count)`` of a consumer group (state 'Dead' when it does not exist)."""
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap, **kafka_security(settings))
    try:
        info = admin.describe_groups([group])[group]
    finally:
        admin.close()
    return str(info.get("group_state") or "Dead"), len(info.get("members") or [])


def show(settings: Settings, group: str, topic: str) -> list[PartitionPosition]:
    """Committed offset, earliest, latest (and lag) of every partition of ``topic`` for ``group``."""
    with _consumer(settings, group_id=group) as consumer:
        tps = partitions_of(consumer, topic)
        begins = consumer.beginning_offsets(tps)
        ends = consumer.end_offsets(tps)
        return [PartitionPosition(tp.partition, consumer.committed(tp), begins[tp], ends[tp]) for tp in tps]


def reset(settings: Settings, group: str, topic: str, *, to_timestamp: int | None = None,
          to_offset: int | None = None, to_earliest: bool = False, to_latest: bool = False) -> dict[int, int]:
    """Set ``group``'s committed offsets on ``topic``; exactly one target. Returns partition -> offset.

    Refuses (:class:`GroupActiveError`, naming the pid) while a live member remains: its next commit
    would overwrite the reset, and moving offsets under a running worker breaks its batch accounting.
    Members of this host whose process is gone are removed first (KIP-345; see streaming.members).
    An explicit offset is clamped to nothing: outside [earliest, latest] it is an error.
    """
    chosen = [to_timestamp is not None, to_offset is not None, to_earliest, to_latest]
    if sum(chosen) != 1:
        raise StreamingError("reset: give exactly one of --to-timestamp, --to-offset, --to-earliest, --to-latest")
    from streaming.members import clear_for_reset

    # Dead members of this host (a worker killed with -9 on a broker that never expires it) are removed;
    # a live worker, or any member of another host, makes this an error naming it.
    clear_for_reset(settings, group)
    with _consumer(settings) as consumer:
        tps = partitions_of(consumer, topic)
        begins = consumer.beginning_offsets(tps)
        ends = consumer.end_offsets(tps)
    if to_timestamp is not None:
        target = offsets_for_timestamp(settings, topic, to_timestamp, flag="--to-timestamp",
                                       earliest_flag="--to-earliest", latest_flag="--to-latest")
    elif to_offset is not None:
        for tp in tps:
            if not begins[tp] <= to_offset <= ends[tp]:
                raise OffsetOutOfRangeError(
                    f"to_offset: {to_offset} is outside partition {tp.partition}'s range "
                    f"[{begins[tp]}, {ends[tp]}]; pick an offset inside it or use --to-earliest/--to-latest")
        target = {tp.partition: to_offset for tp in tps}
    elif to_earliest:
        target = {tp.partition: begins[tp] for tp in tps}
    else:
        target = {tp.partition: ends[tp] for tp in tps}
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap, **kafka_security(settings))
    try:
        result = admin.alter_group_offsets(
            group, {TopicPartition(topic, p): OffsetAndMetadata(off, "", -1) for p, off in target.items()})
    finally:
        admin.close()
    failed = {tp.partition: err.__name__ for tp, err in result.items() if err.__name__ != "NoError"}
    if failed:
        raise GroupActiveError(f"group: {group!r} refused the reset for partitions {failed}; "
                               "a member probably joined meanwhile; stop it and retry")
    return target
