"""Replay: rebuild feature batches for a range of the raw topic into a separate namespace.

``streamlearn replay <kind> (--from-beginning | --from-offset P:O[,P:O] | --from-timestamp T) [--to T2]
--into NAMESPACE``; ``streamlearn store promote <kind> --from NAMESPACE`` then makes it live
(:mod:`streaming.promote`).

* It never touches the live group's offsets: explicit partition assignment (the Subscriber's
  positions mode) from the start (the topic's earliest offsets, the given offsets, or the first
  offset at/after ``T``) to the first offset at/after ``T2`` (or the end offsets when the replay
  starts), no group, no commits.
* Starts are checked against what the topic really holds (beginning offsets, ``offsets_for_times``),
  never against retention arithmetic; see :func:`streaming.offsets.offsets_for_timestamp`.
* A completed replay writes :data:`RANGE_FILE` into the namespace's kind directory: the exact
  ``start``/``stop`` offsets it covered. Promotion needs it (an interrupted replay has none) and
  commits ``stop`` for the live group.
* It is deterministic, so running it twice yields byte-identical batches: batch boundaries are
  fixed by count only (``batch_max_records``, no time-based closes), each partition starts with
  empty featurizer windows at its first offset, the ``.avro`` has a sync marker derived from the
  batch id and no wall-clock content. A second run into the same namespace finds every batch
  already there and writes nothing.
* Dead letters are recorded in the manifests (``dead_letter_offsets``) but not re-published by
  default: the live run already dead-lettered them; ``dead_letters=True`` re-publishes.
* Progress (records, rate, ETA) goes to an optional sink made once the total is known
  (:mod:`streaming.progress` in the CLI); the total counts offsets, so transaction markers make the
  last percent or so jump.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from schemas.exceptions import RegistryUnavailableError
from schemas.registry import open_registry
from streaming.batcher import Pipeline
from streaming.clock import now_ms
from streaming.config import Settings
from streaming.exceptions import AfterLastRecordError, OffsetOutOfRangeError, ReplayError
from streaming.fsutil import write_json_atomic
from streaming.offsets import earliest_and_end, offsets_for_timestamp
from streaming.store import FeatureStore
from streaming.timeargs import format_ms
from streaming.topics import raw_topic

log = logging.getLogger(__name__)

#: Written into ``<store>/<namespace>/<kind>/`` when a replay completes (not a batch: no ``.avro``).
RANGE_FILE = "_replay.json"
#: The start offsets of a replay that has not completed yet (written before its first batch, removed with
#: :data:`RANGE_FILE`): a re-run of the same command resumes from them (:func:`replay`).
START_FILE = "_replay.start.json"


class ProgressSink(Protocol):
    """What a replay reports progress to (``streaming.progress.Progress`` fits)."""

    def advance(self, n: int = 1) -> None: ...


#: Called with the number of offsets to replay once the range is known; returns a context manager
#: around the replay yielding the sink (so a progress bar knows its total, hence its ETA, up front).
ProgressFactory = Callable[[int], AbstractContextManager[ProgressSink]]


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


def parse_partition_offsets(values: list[str], flag: str = "--from-offset") -> dict[int, int]:
    """``["0:120", "1:95,2:130"]`` -> ``{0: 120, 1: 95, 2: 130}`` (repeatable flag or comma list)."""
    out: dict[int, int] = {}
    for value in values:
        for item in value.split(","):
            part, sep, off = item.strip().partition(":")
            if not sep or not part.strip().isdigit() or not off.strip().isdigit():
                raise ReplayError(f"{flag}: {item.strip()!r} is not PARTITION:OFFSET (e.g. 0:120, or "
                                  "0:120,1:95 for several partitions)")
            p = int(part)
            if p in out and out[p] != int(off):
                raise ReplayError(f"{flag}: partition {p} is given twice ({out[p]} and {int(off)})")
            out[p] = int(off)
    if not out:
        raise ReplayError(f"{flag}: give at least one PARTITION:OFFSET")
    return out


def start_offsets(settings: Settings, topic: str, *, from_ms: int | None = None,
                  from_offsets: dict[int, int] | None = None, from_beginning: bool = False) -> dict[int, int]:
    """The first offset per replayed partition, checked against the topic's real earliest/end offsets."""
    if sum([from_ms is not None, from_offsets is not None, from_beginning]) != 1:
        raise ReplayError("replay: give exactly one of --from-beginning, --from-offset, --from-timestamp")
    if from_ms is not None:
        return offsets_for_timestamp(settings, topic, from_ms, flag="--from-timestamp",
                                     earliest_flag="--from-beginning")
    begins, ends = earliest_and_end(settings, topic)
    if from_beginning:
        return begins
    assert from_offsets is not None
    for p, off in sorted(from_offsets.items()):
        if p not in begins:
            raise ReplayError(f"--from-offset: {topic!r} has no partition {p} (partitions {sorted(begins)})")
        if off < begins[p]:
            raise OffsetOutOfRangeError(
                f"--from-offset: {p}:{off} is before what {topic!r} still holds: partition {p}'s offsets below "
                f"{begins[p]} were deleted; use --from-offset {p}:{begins[p]} or --from-beginning")
        if off > ends[p]:
            raise OffsetOutOfRangeError(
                f"--from-offset: {p}:{off} is past the end of partition {p} (next offset {ends[p]}); "
                f"use an offset in [{begins[p]}, {ends[p]}]")
    return dict(from_offsets)


def replay(settings: Settings, kind: str, *, from_ms: int | None = None, from_offsets: dict[int, int] | None = None,
           from_beginning: bool = False, to_ms: int | None = None, namespace: str,
           dead_letters: bool = False, featurizer_version: str | None = None,
           idle_timeout_s: float = 30.0, progress: ProgressFactory | None = None) -> ReplayResult:
    """Rebuild ``kind``'s batches from one start (exactly one of ``from_ms``, ``from_offsets``,
    ``from_beginning``) up to records at ``to_ms`` (or the current end) into ``namespace``.

    ``from_offsets`` replays only the partitions it names.
    """
    from streaming.consumer import Subscriber

    if namespace == "live":
        raise ReplayError("--into: replays never write into 'live' (the workers own it); pass another "
                          "namespace, e.g. rebuild, and make it live with `streamlearn store promote`")
    if to_ms is not None and from_ms is not None and to_ms <= from_ms:
        raise ReplayError(f"--to: {format_ms(to_ms)} must be after --from-timestamp {format_ms(from_ms)}")
    topic = raw_topic(settings, kind)
    store = FeatureStore(settings.feature_store)
    directory = store.directory(kind, namespace)
    completed = read_range(directory)  # a replay already finished here: no start record, nothing to resume
    recorded = _recorded_start(directory, topic, completed)
    try:
        start = start_offsets(settings, topic, from_ms=from_ms, from_offsets=from_offsets,
                              from_beginning=from_beginning)
    except AfterLastRecordError:
        if recorded is None:
            raise
        # A relative --from-timestamp (-2h) run again later can drift past the newest record: the same
        # command, so this namespace's own replay, which the recorded start completes (or extends).
        start = dict(recorded)
    _check_same_replay(namespace, directory, topic, start, recorded, exact=from_offsets is not None,
                       has_batches=lambda: bool(store.batch_ids(kind, namespace)))
    # a killed earlier run of this replay left its half-written batch as a temp file: its writer is gone
    store.remove_stale_temp_files(kind, namespace)
    if recorded is not None and start != recorded:
        # A time start drifts (`--from-timestamp -2h` run again an hour later, `--from-beginning` after retention
        # deleted records): resolved to later offsets, whose count-based batch boundaries would overlap the
        # batches already written. Checked above to be this same replay, it continues from its recorded start
        # (completing it, or extending a completed one to the current end).
        log.info("replay into %s: continuing the replay from its recorded start offsets %s (this run's start "
                 "resolved to %s)", directory, recorded, start)
        start = dict(recorded)
    partitions = sorted(start)
    if to_ms is None:
        with Subscriber(settings, topic, start="end", decode=False, partitions=partitions) as probe:
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
    total = sum(stop[p] - start[p] for p in start)
    if completed is None:
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(directory / START_FILE, {"topic": topic, "start": {str(p): o for p, o in start.items()}})
    try:
        with progress(total) if progress is not None else contextlib.nullcontext() as sink:
            if total:
                with Subscriber(settings, topic, start={"offsets": start}, until={"offsets": stop},
                                decode=False, registry=registry, partitions=partitions) as sub:
                    _consume(sub, pipeline, result, idle_timeout_s, sink)
        _flush(pipeline, sorted(start), result)
    finally:
        if dead_letters:
            publisher.close()
    result.records = pipeline.stats.records
    result.rows = pipeline.stats.rows
    result.dead_letters = pipeline.stats.dead_letters
    _write_range(directory, topic, result, pipeline.featurizer.version)
    with contextlib.suppress(FileNotFoundError):
        (directory / START_FILE).unlink()
    return result


def _recorded_start(directory: Path, topic: str, completed: dict[str, Any] | None) -> dict[int, int] | None:
    """The start offsets of the replay this namespace already holds (completed: :data:`RANGE_FILE`;
    interrupted: :data:`START_FILE`), or None when it holds none (of ``topic``)."""
    record = completed
    if record is None:
        try:
            record = json.loads((directory / START_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    try:
        if record.get("topic") != topic:
            return None
        return {int(p): int(o) for p, o in record["start"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _check_same_replay(namespace: str, directory: Path, topic: str, start: dict[int, int],
                       recorded: dict[int, int] | None, *, exact: bool, has_batches: Callable[[], bool]) -> None:
    """Refuse, before anything is written, a replay that is not the one this namespace already holds.

    A namespace holds one replay: one start per partition. Why: another start into it was run, and its
    count-based batch boundaries met the old batches. Where they fell on the same offsets (a
    ``--from-beginning`` after a replay from 39000) the old batches -- built from empty windows at 39000 --
    were kept as "already written" and the namespace claimed a full rebuild, which ``store promote`` made
    live; where they did not, the overlap was found at the first clash, after the batches before it had been
    written, and the namespace could no longer be promoted. A narrower re-run into a completed namespace
    rewrote its recorded range, so promote refused the partitions it left out.

    The same replay is: the recorded start, or (``exact`` False: a time or --from-beginning start, which
    drifts) a start at or after it on the same partitions, which :func:`replay` then takes back to the
    recorded one. ``--from-offset`` never drifts and must name the recorded start exactly.
    """
    if recorded is None:
        if has_batches():
            raise ReplayError(
                f"--into: namespace {namespace!r} holds batches but no record of the replay that wrote them "
                f"({directory}); replay into a new namespace, or remove that directory first")
        return
    same = set(start) == set(recorded) and (
        start == recorded if exact else all(start[p] >= recorded[p] for p in start))
    if same:
        return
    where = ",".join(f"{p}:{o}" for p, o in sorted(recorded.items()))
    asked = ",".join(f"{p}:{o}" for p, o in sorted(start.items()))
    state = "a completed" if (directory / RANGE_FILE).exists() else "an interrupted"
    raise ReplayError(
        f"--into: namespace {namespace!r} holds {state} replay of {topic!r} from offsets {where}; this one "
        f"starts at {asked}, a different replay, which would mix with it. Run the same start again (--from-offset "
        f"{where}) to finish or extend it, or replay into a new namespace (or remove {directory} first)")


def _write_range(directory: Path, topic: str, result: ReplayResult, featurizer_version: str) -> None:
    """Record the completed range: what :mod:`streaming.promote` commits for the live group."""
    write_range(directory, {"format": 1, "kind": result.kind, "topic": topic, "namespace": result.namespace,
                            "start": {str(p): o for p, o in sorted(result.start.items())},
                            "stop": {str(p): o for p, o in sorted(result.stop.items())},
                            "featurizer_version": featurizer_version, "records": result.records,
                            "completed_at_ms": now_ms()})


def write_range(directory: Path, record: dict[str, Any]) -> None:
    """Write :data:`RANGE_FILE` atomically (temp file, fsync, rename, fsync of the directory)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / RANGE_FILE, record, indent=1)


def read_range(directory: Path) -> dict[str, Any] | None:
    """The completed-replay record of a namespace's kind directory, or None (never completed)."""
    try:
        record: dict[str, Any] = json.loads((directory / RANGE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    return record


def _consume(sub: Any, pipeline: Pipeline, result: ReplayResult, idle_timeout_s: float,
             progress: ProgressSink | None) -> None:
    last = time.monotonic()
    while not sub.finished:
        items = sub.poll_batch(timeout_ms=500)
        if items:
            last = time.monotonic()
            if progress is not None:
                progress.advance(len(items))
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
            if pipeline.sink.pending(item.partition) >= pipeline.batcher.max_records:
                _flush(pipeline, [item.partition], result)
        pipeline.report_metrics()


def _flush(pipeline: Pipeline, partitions: list[int], result: ReplayResult) -> None:
    """Close the partitions' batches and write them through the pipeline's sink (the same writes as
    the live worker's; a replay has no ``on_durable``: it commits nothing). A store that refuses
    (SinkBackpressureError) ends the replay: re-running it skips the batches already written."""
    flushed = pipeline.sink.flush(partitions)
    result.batches_written += flushed.written
    result.batches_existing += flushed.existing
    if flushed.overlaps:
        exc = next(iter(flushed.overlaps.values()))
        raise ReplayError(f"namespace: {result.namespace!r} already holds batches of another range ({exc}); "
                          "replay into a new namespace or delete that one") from exc
