"""Micro-batcher: collects featurized rows per partition until N records or T seconds.

Why per partition: a batch's name is derived from one partition's offset range, which keeps
names deterministic (a restarted worker recomputes the same ids) and lets the worker commit one
partition's offsets as soon as that partition's batch is durable, independently of the others.

A dead-lettered record counts as a record of the batch (it occupies an offset the batch
covers, and its offset is listed in the manifest), so a batch can close with zero rows; the
worker then only flushes the dead-letter producer and commits. Closing by time is wall-clock
dependent, so replays pass ``max_seconds=None`` to get boundaries fixed by count alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from streaming.store import BatchSpec, StoredRow


class BatcherError(ValueError):
    """Bad batcher arguments or an offset going backwards within a partition."""


@dataclass
class ClosedBatch:
    """What a partition's batcher hands to the store: the manifest fields and the rows."""

    spec: BatchSpec
    rows: list[StoredRow]
    opened_at: float
    closed_at: float

    @property
    def next_offset(self) -> int:
        """The offset to commit once this batch is durable."""
        return self.spec.last_offset + 1

    @property
    def age_s(self) -> float:
        return self.closed_at - self.opened_at


@dataclass
class PartitionBatch:
    """The open batch of one topic-partition."""

    topic: str
    partition: int
    rows: list[StoredRow] = field(default_factory=list)
    dead_letter_offsets: list[int] = field(default_factory=list)
    schema_ids: set[int] = field(default_factory=set)
    first_offset: int | None = None
    last_offset: int | None = None
    opened_at: float | None = None

    @property
    def count(self) -> int:
        return len(self.rows) + len(self.dead_letter_offsets)

    def _advance(self, offset: int, now: float) -> None:
        if self.last_offset is not None and offset <= self.last_offset:
            raise BatcherError(
                f"offset: {offset} is not after {self.last_offset} on {self.topic}[{self.partition}]; "
                "drop the partition's batch (rebalance/seek) before re-reading older offsets"
            )
        if self.first_offset is None:
            self.first_offset = offset
            self.opened_at = now
        self.last_offset = offset


class MicroBatcher:
    """Open batches of every assigned partition; closes at ``max_records`` or ``max_seconds``."""

    def __init__(self, *, kind: str, featurizer_version: str, n_features: int, label_names: list[str],
                 max_records: int, max_seconds: float | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_records < 1:
            raise BatcherError(f"max_records: must be >= 1, got {max_records}; set batch_max_records")
        if max_seconds is not None and max_seconds <= 0:
            raise BatcherError(f"max_seconds: must be > 0 or None, got {max_seconds}; set batch_max_seconds")
        self.kind = kind
        self.featurizer_version = featurizer_version
        self.n_features = n_features
        self.label_names = list(label_names)
        self.max_records = max_records
        self.max_seconds = max_seconds
        self.clock = clock
        self._open: dict[tuple[str, int], PartitionBatch] = {}

    def _batch(self, topic: str, partition: int) -> PartitionBatch:
        key = (topic, partition)
        b = self._open.get(key)
        if b is None:
            b = self._open[key] = PartitionBatch(topic, partition)
        return b

    def add_row(self, row: StoredRow, schema_id: int | None) -> None:
        b = self._batch(row.topic, row.partition)
        b._advance(row.offset, self.clock())
        b.rows.append(row)
        if schema_id is not None:
            b.schema_ids.add(int(schema_id))

    def add_dead_letter(self, topic: str, partition: int, offset: int) -> None:
        """Record that ``offset`` went to the dead-letter topic (processed, but no row)."""
        b = self._batch(topic, partition)
        b._advance(offset, self.clock())
        b.dead_letter_offsets.append(offset)

    def pending(self, topic: str, partition: int) -> int:
        b = self._open.get((topic, partition))
        return b.count if b else 0

    def due(self, now: float | None = None) -> list[tuple[str, int]]:
        """Partitions whose batch is full or whose oldest record is older than ``max_seconds``."""
        now = self.clock() if now is None else now
        out = []
        for key, b in self._open.items():
            if b.count == 0:
                continue
            if b.count >= self.max_records:
                out.append(key)
            elif (self.max_seconds is not None and b.opened_at is not None
                  and now - b.opened_at >= self.max_seconds):
                out.append(key)
        return sorted(out)

    def seconds_until_due(self, now: float | None = None) -> float | None:
        """How long until the next time-based close (None when nothing is open or no time limit)."""
        if self.max_seconds is None:
            return None
        now = self.clock() if now is None else now
        ages = [now - b.opened_at for b in self._open.values() if b.count and b.opened_at is not None]
        return max(0.0, self.max_seconds - max(ages)) if ages else None

    def close(self, topic: str, partition: int, featurizer_state: str | None) -> ClosedBatch | None:
        """Close the partition's open batch (None when empty); ``featurizer_state`` is the state
        after its last record, checkpointed in the manifest so a restart resumes windows exactly."""
        b = self._open.pop((topic, partition), None)
        if b is None or b.count == 0 or b.first_offset is None or b.last_offset is None:
            return None
        spec = BatchSpec(
            kind=self.kind, topic=topic, partition=partition, first_offset=b.first_offset,
            last_offset=b.last_offset, featurizer_version=self.featurizer_version,
            n_features=self.n_features, label_names=self.label_names, schema_ids=sorted(b.schema_ids),
            dead_letter_offsets=list(b.dead_letter_offsets), featurizer_state=featurizer_state,
        )
        return ClosedBatch(spec, b.rows, b.opened_at or self.clock(), self.clock())

    def drop(self, topic: str, partition: int) -> int:
        """Forget a partition's open batch (revoked, or about to re-read after a failure)."""
        b = self._open.pop((topic, partition), None)
        return b.count if b else 0

    def open_partitions(self) -> Iterator[tuple[str, int]]:
        return iter(sorted(k for k, b in self._open.items() if b.count))
