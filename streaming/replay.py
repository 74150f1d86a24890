"""Replay: rebuild feature batches for a time range of the raw topic into a separate namespace.

``streamlearn replay <kind> --from-timestamp T [--to T2] --into NAMESPACE``.

* It never touches the live group's offsets: explicit partition assignment (the Subscriber's
  positions mode) from the first offset at/after ``T`` to the first offset at/after ``T2`` (or the
  end offsets when the replay starts), no group, no commits.
* It is deterministic, so running it twice yields byte-identical batches: batch boundaries are
  fixed by count only (``batch_max_records``, no time-based closes), each partition starts with
  empty featurizer windows at its first offset, the ``.avro`` has a sync marker derived from the
  batch id and no wall-clock content. A second run into the same namespace finds every batch
  already there and writes nothing.
* Dead letters are recorded in the manifests (``dead_letter_offsets``) but not re-published by
  default: the live run already dead-lettered them; ``dead_letters=True`` re-publishes.
* Timestamps the topic no longer holds (older than retention) or does not hold yet are errors
  that say what is available (:func:`streaming.offsets.offsets_for_timestamp`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from schemas.exceptions import RegistryUnavailableError
from schemas.registry import open_registry
from streaming.batcher import Pipeline
from streaming.config import Settings
from streaming.exceptions import (
    ReplayError,  # noqa: F401 (re-exported)
    )
from streaming.offsets import offsets_for_timestamp
from streaming.store import BatchOverlapError
from streaming.topics import raw_topic

log = logging.getLogger(__name__)


class _NoDeadLetters:
    """Stands in for the Publisher when a replay does not re-publish dead letters."""

    def dead_letter(self, *args: Any, **kwargs: Any) -> _Done:
        return _Done()

    def flush(self, timeout: float | None = None) -> None:
        return None


class _Done:
    exception = None

    def failed(self) -> bool:
        return False


@dataclass
class ReplayResult:
    namespace: str
    kind: str
    start: dict[int, int]
    stop: dict[int, int]
    records: int = 0
    rows: int = 0
    dead_letters: int = 0
    batches_written: list[str] = field(default_factory=list)
    batches_existing: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "kind": self.kind, "start": self.start, "stop": self.stop,
                "records": self.records, "rows": self.rows, "dead_letters": self.dead_letters,
                "batches_written": len(self.batches_written), "batches_existing": len(self.batches_existing)}


def replay(settings: Settings, kind: str, *, from_ms: int, to_ms: int | None = None, namespace: str,
           dead_letters: bool = False, featurizer_version: str | None = None,
           idle_timeout_s: float = 30.0) -> ReplayResult:
    """Rebuild ``kind``'s batches for record timestamps in ``[from_ms, to_ms)`` into ``namespace``."""
    from streaming.consumer import Subscriber

    if namespace == "live":
        raise ReplayError("namespace: replays never write into 'live' (the workers own it); "
                          "pass another --into, e.g. replay-2025-01-01")
    if to_ms is not None and to_ms <= from_ms:
        raise ReplayError(f"to: {to_ms} must be after --from-timestamp {from_ms}")
    topic = raw_topic(settings, kind)
    start = offsets_for_timestamp(settings, topic, from_ms, bound="start")
    if to_ms is None:
        with Subscriber(settings, topic, start="end", decode=False) as probe:
            stop = {tp.partition: probe.consumer.position(tp) for tp in probe.assignment()}
    else:
        stop = offsets_for_timestamp(settings, topic, to_ms, bound="end")
    stop = {p: max(stop[p], start[p]) for p in start}
    registry = open_registry(settings.registry_url, settings.registry_dir)
    publisher: Any
    if dead_letters:
        from streaming.producer import Publisher

        publisher = Publisher(settings, registry)
    else:
        publisher = _NoDeadLetters()
    pipeline = Pipeline(settings, kind, namespace=namespace, registry=registry, publisher=publisher,
                        max_seconds=None, featurizer_version=featurizer_version)
    result = ReplayResult(namespace, kind, dict(start), dict(stop))
    for p in start:
        pipeline.states[p] = pipeline.featurizer.new_state()  # windows start empty at the range start
    try:
        if any(stop[p] > start[p] for p in start):
            with Subscriber(settings, topic, start={"offsets": start}, until={"offsets": stop},
                            decode=False, registry=registry) as sub:
                _consume(sub, pipeline, result, idle_timeout_s)
        for p in sorted(start):
            _close(pipeline, p, result)
    finally:
        if dead_letters:
            publisher.close()
    result.records = pipeline.stats.records
    result.rows = pipeline.stats.rows
    result.dead_letters = pipeline.stats.dead_letters
    return result


def _consume(sub: Any, pipeline: Pipeline, result: ReplayResult, idle_timeout_s: float) -> None:
    import time

    last = time.monotonic()
    while not sub.finished:
        items = sub.poll_batch(timeout_ms=500)
        if items:
            last = time.monotonic()
        elif time.monotonic() - last > idle_timeout_s:
            raise ReplayError(f"replay: no records for {idle_timeout_s} s before reaching the end offsets "
                              f"{result.stop}; is the broker reachable? Re-run to continue (batches already "
                              "written are kept and skipped)")
        for item in items:
            while True:
                try:
                    pipeline.process(item)
                    break
                except RegistryUnavailableError as exc:
                    log.warning("schema registry unavailable (%s); retrying in 1 s", exc)
                    time.sleep(1.0)  # backoff before retrying the same record, not a test wait
            if pipeline.batcher.pending(item.topic, item.partition) >= pipeline.batcher.max_records:
                _close(pipeline, item.partition, result)
        pipeline.report_metrics()


def _close(pipeline: Pipeline, partition: int, result: ReplayResult) -> None:
    closed = pipeline.close(partition)
    if closed is None:
        return
    try:
        written = pipeline.persist(closed)
    except BatchOverlapError as exc:
        raise ReplayError(f"namespace: {result.namespace!r} already holds batches of another range ({exc}); "
                          "replay into a new namespace or delete that one") from exc
    from streaming.store import batch_id_for

    bid = batch_id_for(closed.spec.topic, partition, closed.spec.first_offset, closed.spec.last_offset)
    (result.batches_written if written else result.batches_existing).append(bid)
