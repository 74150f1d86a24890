"""Compaction of a model's prediction topic into Parquet (``<columnar_dir>/predictions/model=<m>/``).

A consumer without a group: its position is the ``offsets`` map of the directory's ``_manifest.json``,
written in the same atomic step as the files it covers (the way a bytewax snapshot carries its input
offsets), so a crash at any point re-reads exactly what was not committed and nothing is counted twice.
It reads ``read_committed`` (aborted answers of a failed serving transaction never land) up to the end
offsets seen when it started, in steps of at most ``step_records`` records.

A record that does not decode as a ``Prediction`` of this model is dead-lettered to the serving
dead-letter topic (original bytes, ``dl.stage=columnar`` and the reason; streaming/producer.py) and its
offset listed in the manifest; the dead letters are acked before the manifest moves past them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streaming.ackguard import record_digest
from streaming.columnar_format import (
    PREDICTION_SCHEMA,
    check_name,
    columnar_root,
    compaction_lock,
    days_of,
    load_manifest,
    part_name,
    predictions_dir,
    remove_orphans,
    save_manifest,
    write_parquet,
)
from streaming.config import Settings
from streaming.exceptions import ColumnarError

log = logging.getLogger(__name__)

#: Prediction records one step holds in memory (a record is ~100 bytes of columns plus its outputs).
STEP_RECORDS = 100_000
_FIELDS = ("request_id", "model_version", "outputs", "latency_ms", "input_topic", "input_partition", "input_offset")


def _existing_topics(settings: Settings) -> set[str]:
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    from streaming.consumer import consumer_config

    try:
        consumer = KafkaConsumer(**consumer_config(settings))
    except KafkaError as exc:
        raise ColumnarError(f"predictions: the broker at {settings.bootstrap} cannot be reached ({exc}); start it "
                            "(`streamlearn up`), or compact feature batches only (--no-predictions)") from exc
    try:
        return set(consumer.topics())
    finally:
        consumer.close()


def known_models(settings: Settings) -> list[str]:
    """Models whose prediction topic exists: the built-in ones, the config file's ``[models]`` and any
    already compacted."""
    from streaming.topics import MODELS, predictions_topic

    names = set(MODELS) | set(settings.model_specs)
    base = columnar_root(settings) / "predictions"
    if base.is_dir():
        names |= {p.name[len("model="):] for p in base.iterdir() if p.name.startswith("model=")}
    topics = _existing_topics(settings)
    return sorted(m for m in names if predictions_topic(settings, m) in topics)


def _row(model: str, rec: Any) -> dict[str, Any]:
    """The Parquet row of one decoded prediction record; a ValueError says why it is not one."""
    v = rec.value
    if not isinstance(v, dict) or any(f not in v for f in _FIELDS):
        raise ValueError(f"not a Prediction record (fields {sorted(v) if isinstance(v, dict) else type(v).__name__})")
    if v.get("model") != model:
        raise ValueError(f"model: the record answers {v.get('model')!r}, not {model!r}, on {model}'s topic")
    latency = float(v["latency_ms"])
    if np.isfinite(latency) and not 0 <= latency <= max(0, int(rec.timestamp)):
        # 1e300 overflowed the int64 request time and stopped this model's compaction for good
        raise ValueError(f"latency_ms: {latency:g} is no latency of an answer written at {int(rec.timestamp)} ms "
                         "(it must be >= 0 and not reach back before 1970)")
    return {"answer_time_ms": int(rec.timestamp),
            "request_time_ms": int(rec.timestamp) - (int(round(latency)) if np.isfinite(latency) else 0),
            "request_id": str(v["request_id"]), "model_version": int(v["model_version"]),
            "outputs": [float(o) for o in v["outputs"]], "predicted_label": v.get("predicted_label"),
            "latency_ms": latency, "error": v.get("error"), "input_topic": str(v["input_topic"]),
            "input_partition": int(v["input_partition"]), "input_offset": int(v["input_offset"]),
            "topic": rec.topic, "partition": int(rec.partition), "offset": int(rec.offset)}


class _Step:
    """What one step read: rows, dead letters and the offsets it covers per partition."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.bad: list[tuple[Any, str]] = []
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.tail: dict[int, dict[str, Any]] = {}  # the last record per partition: what the next run checks

    def seen(self, item: Any) -> None:
        self.first.setdefault(item.partition, item.offset)
        self.last[item.partition] = item.offset
        self.tail[item.partition] = {"offset": int(item.offset), "time": int(item.timestamp),
                                     "digest": record_digest(item.key, item.raw, item.headers)}

    def __len__(self) -> int:
        return len(self.rows) + len(self.bad)


def _read_step(sub: Any, model: str, tps: list[Any], end: dict[Any, int], step_records: int,
               idle_timeout_s: float) -> tuple[_Step, bool]:
    """Poll until ``step_records`` records, the end offsets, or ``idle_timeout_s`` without a record
    (an open transaction holds read_committed back); returns the step and whether the run is done."""
    step = _Step()
    last = time.monotonic()
    while len(step) < step_records:
        if all(sub.consumer.position(tp) >= end[tp] for tp in tps):
            return step, True
        items = sub.poll_batch(timeout_ms=200, max_records=step_records - len(step))
        if not items:
            if time.monotonic() - last >= idle_timeout_s:
                return step, True
            continue
        last = time.monotonic()
        for item in items:
            step.seen(item)
            if not item.ok:
                step.bad.append((item, item.reason))
                continue
            try:
                step.rows.append(_row(model, item))
            except (ValueError, TypeError, KeyError) as exc:
                step.bad.append((item, f"{type(exc).__name__}: {exc}"))
    return step, False


def _diverged(checker: Any, tp: Any, tail: dict[str, Any] | None, end: int, timeout_s: float = 10.0) -> bool:
    """Whether the last record compacted from ``tp`` is no longer at its offset: the broker lost it (a
    noida-db kill -9) and may have handed its offset to a new answer (streaming/divergence.py does the same
    for feature batches). Reads that one record back with ``checker`` (a consumer of its own, so the
    compactor's fetch state is untouched); a partition it cannot read in time is trusted, with a warning."""
    if not tail:
        return False
    offset = int(tail["offset"])
    if end <= offset:
        return True
    checker.assign([tp])
    checker.seek(tp, offset)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msgs = checker.poll(timeout_ms=200, max_records=1).get(tp, [])
        if msgs:
            m = msgs[0]
            digest = record_digest(m.key, m.value or b"", m.headers or [])
            return bool(m.offset != offset or digest != tail["digest"])
    log.warning("columnar: could not read back %s[%d] offset %d to check it; trusting the manifest",
                tp.topic, tp.partition, offset)
    return False


def _resume_points(settings: Settings, sub: Any, manifest: dict[str, Any], tps: list[Any],
                   end: dict[Any, int]) -> None:
    """Seek every partition to where compaction goes on: the manifest's offset, the log start when
    retention deleted answers first, or after the last compacted answer's time when the broker lost it."""
    from kafka import KafkaConsumer

    from streaming.consumer import consumer_config

    committed = {int(p): int(o) for p, o in manifest["offsets"].items()}
    begin = sub.consumer.beginning_offsets(tps)
    tails = manifest.get("tails", {})
    checker = KafkaConsumer(**consumer_config(settings)) if tails else None
    try:
        diverged = {tp: _diverged(checker, tp, tails.get(str(tp.partition)), end[tp]) for tp in tps}
    finally:
        if checker is not None:
            checker.close()
    for tp in tps:
        at = committed.get(tp.partition, 0)
        tail = tails.get(str(tp.partition))
        if diverged[tp] and tail:
            found = sub.consumer.offsets_for_times({tp: int(tail["time"]) + 1}).get(tp)
            new_at = found.offset if found is not None else end[tp]
            manifest.setdefault("gaps", []).append({
                "partition": tp.partition, "from": min(new_at, at), "to": at,
                "reason": "the broker lost answers after they were compacted and re-used their offsets; the copy "
                          "keeps the lost answers and goes on with the answers newer than the last one compacted"})
            at = new_at
        if begin[tp] > at:  # retention deleted answers before they were compacted: say so, never silently
            manifest.setdefault("gaps", []).append({"partition": tp.partition, "from": at, "to": begin[tp],
                                                    "reason": "deleted by topic retention before compaction"})
            at = begin[tp]
        sub.consumer.seek(tp, at)


def _write_step(out: Path, manifest: dict[str, Any], step: _Step, topic: str) -> int:
    """The step's rows as one Parquet file per answer date; returns how many files."""
    if not step.rows:
        return 0
    table = pa.Table.from_pylist(step.rows, schema=PREDICTION_SCHEMA)
    table = table.take(pc.sort_indices(table, sort_keys=[("answer_time_ms", "ascending"),
                                                         ("partition", "ascending"), ("offset", "ascending")]))
    days = days_of(table["answer_time_ms"].to_numpy())
    sources = [f"{topic}-p{p}-{step.first[p]}-{step.last[p]}" for p in sorted(step.first)]
    files = 0
    for day in sorted(set(days.tolist())):
        part = table.filter(pa.array(days == day))
        entry = write_parquet(out, part_name(sources, day), part)
        ranges = []
        for p in sorted(set(part["partition"].to_pylist())):
            offs = part.filter(pc.equal(part["partition"], p))["offset"]
            ranges.append({"topic": topic, "partition": p, "first_offset": pc.min(offs).as_py(),
                           "last_offset": pc.max(offs).as_py(), "rows": len(offs)})
        times = part["answer_time_ms"]
        entry.update({"date": day, "answer_time_min_ms": pc.min(times).as_py(),
                      "answer_time_max_ms": pc.max(times).as_py(), "ranges": ranges})
        manifest["files"].append(entry)
        files += 1
    return files


def _dead_letter(settings: Settings, publisher: Any, step: _Step, model: str) -> Any:
    """Keep the undecodable records (original bytes + reason); acked before the manifest moves past them."""
    if not step.bad:
        return publisher
    if publisher is None:
        from streaming.producer import Publisher

        publisher = Publisher(settings)
    for item, reason in step.bad:
        publisher.dead_letter("serving", item.raw, stage="columnar", error=reason, key=item.key,
                              source={"topic": item.topic, "partition": item.partition, "offset": item.offset,
                                      "model": model})
    publisher.flush()
    return publisher


def compact_predictions(settings: Settings, model: str, *, step_records: int = STEP_RECORDS,
                        idle_timeout_s: float = 2.0, publisher: Any = None) -> dict[str, Any]:
    """Append the prediction records of ``model`` not yet compacted (from the manifest's offsets to the
    topic's current end) as Parquet; returns a report (rows, files, dead letters, offsets)."""
    from streaming.consumer import Subscriber
    from streaming.topics import predictions_topic

    check_name("model", model)
    topic = predictions_topic(settings, model)
    out = predictions_dir(columnar_root(settings), model)
    report: dict[str, Any] = {"model": model, "topic": topic, "rows": 0, "files": 0, "dead_letters": 0,
                              "orphans_removed": 0, "offsets": {}}
    if topic not in _existing_topics(settings):
        report["skipped"] = f"topic {topic} does not exist"
        return report
    own_publisher = publisher is None
    with compaction_lock(out):
        manifest = load_manifest(out, model=model, topic=topic, offsets={}, tails={}, dead_letters=[], gaps=[])
        if manifest.get("topic") != topic:
            raise ColumnarError(f"{out}: its manifest follows topic {manifest.get('topic')!r}, not {topic!r} (another "
                                "topic prefix or tenant); give each its own STREAMLEARN_COLUMNAR_DIR")
        report["orphans_removed"] = remove_orphans(out, manifest)
        committed = {int(p): int(o) for p, o in manifest["offsets"].items()}
        with Subscriber(settings, topic, start={"offsets": committed}, isolation_level="read_committed") as sub:
            tps = sorted(sub.assignment(), key=lambda tp: tp.partition)
            end = sub.consumer.end_offsets(tps)
            _resume_points(settings, sub, manifest, tps, end)
            done = False
            try:
                while not done:
                    step, done = _read_step(sub, model, tps, end, step_records, idle_timeout_s)
                    try:
                        files = _write_step(out, manifest, step, topic)
                    except OSError as exc:
                        raise ColumnarError(f"columnar predictions of {model}: cannot write under {out}: {exc}; free "
                                            "disk space or fix permissions, then run again") from exc
                    publisher = _dead_letter(settings, publisher, step, model)
                    manifest.setdefault("dead_letters", []).extend(
                        {"partition": item.partition, "offset": item.offset, "reason": reason[:500]}
                        for item, reason in step.bad)
                    offsets = {str(tp.partition): int(sub.consumer.position(tp)) for tp in tps}
                    manifest.setdefault("tails", {}).update({str(p): tail for p, tail in step.tail.items()})
                    if offsets != manifest["offsets"] or files or step.tail:
                        manifest["offsets"] = offsets
                        save_manifest(out, manifest)
                    report["rows"] += len(step.rows)
                    report["files"] += files
                    report["dead_letters"] += len(step.bad)
            finally:
                if own_publisher and publisher is not None:
                    publisher.close()
        report["offsets"] = dict(manifest["offsets"])
    if report["dead_letters"]:
        log.warning("columnar %s: %d prediction records were not Predictions of this model; dead-lettered",
                    model, report["dead_letters"])
    return report
