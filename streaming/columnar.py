"""Compaction of the feature store's Avro batches (and of the prediction topics) into Parquet.

Why a second copy: the Avro batches are the source of truth and the trainer's unit, but a question
like "the rows of key K between 10:00 and 10:05" would decode every batch. The Parquet copy is
partitioned by namespace, kind and UTC date, sorted by event time within each file (so row-group
min/max statistics prune a time range), and readable by pyarrow, DuckDB and pandas directly
(docs/COLUMNAR.md). :mod:`streaming.query` serves ``GET /query`` and ``streamlearn query`` from it.

Protocol of one step of :func:`compact_features` (a bounded set of not yet compacted batches):

1. read each batch, checking its bytes against the sha256 of its manifest (a modified batch stops
   the run with :class:`ColumnarError`: it never lands in the copy);
2. sort the rows, split them by UTC date and write one Parquet file per date (temp + fsync + rename,
   deterministic name);
3. append the files, with their lineage (source batch ids, offset ranges, the batches' sha256 and the
   file's own sha256), to ``_manifest.json`` (temp + fsync + rename): the commit point.

A kill at any point leaves files the manifest does not list; the next run deletes them and redoes the
step. Re-running is idempotent: a batch listed in the manifest is never read again.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streaming.columnar_format import (
    FEATURE_SCHEMA,
    check_name,
    columnar_root,
    compaction_lock,
    days_of,
    features_dir,
    load_manifest,
    new_manifest,
    part_name,
    remove_orphans,
    save_manifest,
    write_parquet,
)
from streaming.config import Settings
from streaming.exceptions import ColumnarError
from streaming.objstore import is_remote, open_url
from streaming.store import BatchInfo, FeatureStore, parse_batch_id

log = logging.getLogger(__name__)

#: Feature values (rows x n_features) one compaction step holds in memory: ~64 MB of float32 plus the
#: Python lists fastavro decodes into. A step is also capped at STEP_MAX_ROWS rows.
STEP_CELLS = 16_000_000
STEP_MAX_ROWS = 250_000
_SORT = [("event_time_ms", "ascending"), ("topic", "ascending"), ("partition", "ascending"),
         ("offset", "ascending")]


@dataclass
class CompactReport:
    """What :func:`compact_all` did: one entry per feature (namespace, kind) and per model."""

    features: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Feature batches left out because they cannot be used (each with its reason)."""
        return [b for f in self.features for b in f.get("skipped", [])]

    @property
    def rows(self) -> int:
        return sum(int(f.get("rows", 0)) for f in self.features) + sum(int(p.get("rows", 0))
                                                                          for p in self.predictions)

    def as_dict(self) -> dict[str, Any]:
        return {"features": self.features, "predictions": self.predictions, "rows": self.rows}


def _read_verified(info: BatchInfo) -> bytes:
    with open_url(info.path) as fh:
        data: bytes = fh.read()
    if hashlib.sha256(data).hexdigest() != info.manifest.get("sha256"):
        raise ColumnarError(f"batch {info.batch_id}: its bytes do not match the sha256 of its manifest; it was "
                            "modified or corrupted; `streamlearn store gc` cannot fix this: delete it and replay "
                            "its range, then compact again")
    return data


def batch_table(info: BatchInfo, data: bytes) -> pa.Table:
    """The rows of one Avro batch as a table of :data:`FEATURE_SCHEMA`."""
    reader = fastavro.reader(io.BytesIO(data))
    label_names: list[str] = json.loads(reader.metadata["streamlearn.label_names"])
    version = str((info.manifest.get("featurizer") or {}).get("version", ""))
    times: list[int] = []
    keys: list[str] = []
    topics: list[str] = []
    parts: list[int] = []
    offs: list[int] = []
    lens: list[int] = []
    flat: list[float] = []
    label_values: list[float | None] = []
    for item in reader:
        rec: dict[str, Any] = item  # type: ignore[assignment]
        times.append(rec["event_time_ms"])
        keys.append(rec["key"])
        topics.append(rec["topic"])
        parts.append(rec["partition"])
        offs.append(rec["offset"])
        x = rec["x"]
        lens.append(len(x))
        flat.extend(x)
        lab = rec["labels"]
        label_values.extend(lab.get(name) for name in label_names)
    n = len(times)
    x_offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lens, out=x_offsets[1:])
    xs = pa.ListArray.from_arrays(pa.array(x_offsets), pa.array(np.asarray(flat, dtype=np.float32)))
    k = len(label_names)
    map_offsets = pa.array(np.arange(0, (n + 1) * k, k if k else 1, dtype=np.int32)[: n + 1] if k else
                           np.zeros(n + 1, dtype=np.int32))
    labels = pa.MapArray.from_arrays(map_offsets, pa.array(label_names * n, pa.string()),
                                     pa.array(label_values, pa.float64()))
    return pa.table({
        "event_time_ms": pa.array(times, pa.int64()),
        "key": pa.array(keys, pa.string()),
        "topic": pa.array(topics, pa.string()),
        "partition": pa.array(parts, pa.int32()),
        "offset": pa.array(offs, pa.int64()),
        "batch_id": pa.array([info.batch_id] * n, pa.string()),
        "featurizer_version": pa.array([version] * n, pa.string()),
        "labels": labels,
        "x": xs,
    }, schema=FEATURE_SCHEMA)


def _ranges(info: BatchInfo) -> list[dict[str, Any]]:
    return [{k: r.get(k) for k in ("topic", "partition", "first_offset", "last_offset", "dead_letter_offsets")}
            for r in info.manifest.get("ranges", [])]


def _compacted(manifest: dict[str, Any]) -> set[str]:
    done = {s["batch_id"] for f in manifest["files"] for s in f["sources"]}
    return done | {e["batch_id"] for e in manifest.get("empty_batches", [])}


def _spans(manifest: dict[str, Any]) -> dict[tuple[str, int], list[tuple[int, int]]]:
    """Compacted offset ranges per (topic, partition), sorted: to notice a store that was swapped under us."""
    out: dict[tuple[str, int], set[tuple[int, int]]] = {}
    entries = [s for f in manifest["files"] for s in f["sources"]] + list(manifest.get("empty_batches", []))
    for e in entries:
        for r in e.get("ranges", []):
            out.setdefault((r["topic"], int(r["partition"])), set()).add((int(r["first_offset"]),
                                                                         int(r["last_offset"])))
    return {k: sorted(v) for k, v in out.items()}


def _overlap(spans: dict[tuple[str, int], list[tuple[int, int]]], batch_id: str) -> bool:
    topic, partition, first, last = parse_batch_id(batch_id)
    ranges = spans.get((topic, partition), [])
    # Compacted ranges never overlap each other, so only the last one starting at or before ``last`` can reach
    # back into [first, last].
    at = bisect.bisect_right(ranges, (last, float("inf")))
    return at > 0 and ranges[at - 1][1] >= first


def _plan(pending: list[BatchInfo], budget_rows: int) -> list[list[BatchInfo]]:
    """Cut the pending batches (in store order) into steps of at most ``budget_rows`` rows (a bigger batch
    is a step of its own)."""
    steps: list[list[BatchInfo]] = []
    current: list[BatchInfo] = []
    rows = 0
    for info in pending:
        n = int(info.manifest.get("record_count", 0) or 0)
        if current and rows + n > budget_rows:
            steps.append(current)
            current, rows = [], 0
        current.append(info)
        rows += n
    if current:
        steps.append(current)
    return steps


def _readable(info: BatchInfo) -> pa.Table | None:
    """The batch's verified rows (None: an empty batch); ColumnarError when it cannot be used."""
    try:
        data = _read_verified(info)
        if int(info.manifest.get("record_count", 0) or 0) == 0:
            return None
        return batch_table(info, data)
    except ColumnarError:
        raise
    except FileNotFoundError as exc:
        raise ColumnarError(f"batch {info.batch_id}: its file is gone ({exc.strerror}); it was deleted while "
                            "compacting (store gc?)") from exc
    except (ValueError, KeyError, TypeError, EOFError, OSError, pa.ArrowException) as exc:
        raise ColumnarError(f"batch {info.batch_id}: cannot be read as a feature batch ({type(exc).__name__}: "
                            f"{str(exc)[:200]}); delete it and replay its range, then compact again") from exc


def _step(out: Path, manifest: dict[str, Any], step: list[BatchInfo],
          skipped: list[dict[str, str]]) -> tuple[int, int]:
    """Compact one step into ``out``; returns (rows, files). The manifest is saved last.

    A batch that cannot be used (damaged, unreadable, deleted meanwhile) is left out and named in
    ``skipped``, not recorded as compacted: one bad batch must not stop every other batch's copy (the
    control API compacts in the background, and /query would go stale for the whole store). It is
    tried again at the next compaction, so a batch replaced by a replay of its range gets in then.
    """
    tables: list[pa.Table] = []
    infos: dict[str, BatchInfo] = {}
    for info in step:
        try:
            table = _readable(info)
        except ColumnarError as exc:
            log.warning("columnar: %s; left out of this compaction", exc)
            skipped.append({"batch_id": info.batch_id, "reason": str(exc)})
            continue
        infos[info.batch_id] = info
        if table is None:
            manifest.setdefault("empty_batches", []).append(
                {"batch_id": info.batch_id, "sha256": info.manifest.get("sha256"), "ranges": _ranges(info)})
            continue
        tables.append(table)
    files = 0
    rows = 0
    if tables:
        table = pa.concat_tables(tables)
        table = table.take(pc.sort_indices(table, sort_keys=_SORT))
        days = days_of(table["event_time_ms"].to_numpy())
        sources = sorted(infos)
        for day in sorted(set(days.tolist())):
            part = table.filter(pa.array(days == day))
            entry = write_parquet(out, part_name(sources, day), part)
            counts = pc.value_counts(part["batch_id"]).to_pylist()
            times = part["event_time_ms"]
            entry.update({
                "date": day,
                "event_time_min_ms": pc.min(times).as_py(),
                "event_time_max_ms": pc.max(times).as_py(),
                "sources": [{"batch_id": c["values"], "rows": c["counts"],
                             "sha256": infos[c["values"]].manifest.get("sha256"),
                             "ranges": _ranges(infos[c["values"]])}
                            for c in sorted(counts, key=lambda c: c["values"])],
            })
            manifest["files"].append(entry)
            files += 1
            rows += part.num_rows
    save_manifest(out, manifest)
    return rows, files


def compact_features(settings: Settings, kind: str, namespace: str = "live", *, store: FeatureStore | None = None,
                     step_rows: int | None = None) -> dict[str, Any]:
    """Compact the batches of one kind and namespace that are not in the Parquet copy yet.

    Incremental (only new batches), idempotent, crash-safe (see the module docstring) and bounded in
    memory by ``step_rows`` rows per step (default: STEP_CELLS / n_features, at most STEP_MAX_ROWS).
    When a new batch overlaps the offsets of a compacted one, the store was swapped (``store promote``)
    or rebuilt: the copy of that namespace and kind is rebuilt from the store.
    """
    FeatureStore.check_names(kind, namespace)
    store = store or FeatureStore(settings.feature_store)
    out = features_dir(columnar_root(settings), namespace, kind)
    report: dict[str, Any] = {"namespace": namespace, "kind": kind, "batches": 0, "rows": 0, "files": 0,
                              "orphans_removed": 0, "rebuilt": False, "skipped": []}
    with compaction_lock(out):
        manifest = load_manifest(out, namespace=namespace, kind=kind, empty_batches=[])
        report["orphans_removed"] = remove_orphans(out, manifest)
        done = _compacted(manifest)
        pending = [b for b in store.batches(kind, namespace) if b.batch_id not in done]
        spans = _spans(manifest)
        if spans and any(_overlap(spans, b.batch_id) for b in pending):
            log.warning("columnar %s/%s: new batches overlap compacted offsets (the namespace was promoted or "
                        "replayed); rebuilding its Parquet copy from the store", namespace, kind)
            manifest = new_manifest(namespace=namespace, kind=kind, empty_batches=[])
            save_manifest(out, manifest)  # commit point first: every old file is now an orphan
            report["orphans_removed"] += remove_orphans(out, manifest)
            report["rebuilt"] = True
            pending = store.batches(kind, namespace)
        if step_rows is None:
            n_features = max([int((b.manifest.get("featurizer") or {}).get("n_features", 1) or 1)
                              for b in pending] or [1])
            step_rows = max(1, min(STEP_MAX_ROWS, STEP_CELLS // n_features))
        for step in _plan(pending, step_rows):
            try:
                before = len(report["skipped"])
                rows, files = _step(out, manifest, step, report["skipped"])
            except OSError as exc:
                raise ColumnarError(f"columnar {namespace}/{kind}: cannot write under {out}: {exc}; free disk space "
                                    "or fix permissions, then run again (the half-done step is redone)") from exc
            report["batches"] += len(step) - (len(report["skipped"]) - before)
            report["rows"] += rows
            report["files"] += files
    return report


def store_partitions(settings: Settings) -> list[tuple[str, str]]:
    """Every (namespace, kind) directory of the feature store (live kinds only on object storage)."""
    if is_remote(settings.feature_store):
        from streaming.topics import KINDS

        return [("live", k) for k in sorted(KINDS)]
    root = Path(settings.feature_store)
    out = []
    for ns in sorted(os.listdir(root)) if root.is_dir() else []:
        if ns.startswith(".") or not (root / ns).is_dir():
            continue
        for kind in sorted(os.listdir(root / ns)):
            if not kind.startswith(".") and (root / ns / kind).is_dir():
                out.append((ns, kind))
    return out


def compact_all(settings: Settings, *, kinds: list[str] | None = None, namespaces: list[str] | None = None,
                models: list[str] | None = None, predictions: bool = True, features: bool = True) -> CompactReport:
    """Compact every feature (namespace, kind) of the store and every model's prediction topic.

    ``kinds``/``namespaces`` restrict the features; ``models`` the predictions (default: the built-in
    models and those of the config file's ``[models]`` table whose prediction topic exists).
    ``features=False`` / ``predictions=False`` skip one half. An unreachable broker raises
    :class:`ColumnarError` when predictions are asked for (after the features are done).
    """
    for name in [*(kinds or []), *(namespaces or []), *(models or [])]:
        check_name("kind/namespace/model", name)
    report = CompactReport()
    store = FeatureStore(settings.feature_store)
    for ns, kind in store_partitions(settings) if features else []:
        if (kinds and kind not in kinds) or (namespaces and ns not in namespaces):
            continue
        try:
            check_name("namespace", ns)
            check_name("kind", kind)
        except ColumnarError:
            continue  # not a store directory (the store only writes checked names)
        report.features.append(compact_features(settings, kind, ns, store=store))
    if predictions:
        from streaming.columnar_predictions import compact_predictions, known_models

        for model in models or known_models(settings):
            report.predictions.append(compact_predictions(settings, model))
    return report
