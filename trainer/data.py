"""Which feature batches a new version trains and is evaluated on, and loading them.

Prequential plan (one call of :func:`plan_data`):

* **new** batches are those after the parent version's cursor (the last batch it trained on);
* the newest of them are the **holdout** (as many batches as it takes to hold
  max(``spec.min_holdout_rows``, ``spec.holdout_fraction`` x new rows) rows, see
  :func:`holdout_size`): candidate, current model and baseline are all scored on them and none has
  trained on them; the *next* version trains on them, because the cursor only advances over
  trained batches;
* the rest are trained on, together with a bounded **reservoir** of older batch ids (reservoir
  sampling, capped at ``spec.reservoir_batches``): no forgetting of old regimes, no unbounded memory.

The reservoir is a pure function of the batch sequence and the seed: step ``n`` draws from
``random.Random(f"{seed}:{n}")``, so replays and the reproduce command select exactly the same
batches without persisting RNG state. The state handed to the next version (cursor, count,
reservoir ids) lives in ``metadata.json["data_state"]``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streaming.objstore import Location, open_url, relative_key
from streaming.store import BatchInfo, StoreError, parse_batch_id, read_batch
from trainer.exceptions import BatchesGoneError, DamagedBatchError, LineageError, NotEnoughDataError
from trainer.spec import ModelSpec
from trainer.specs.common import not_class_ids

#: at most this many new batch files are read for one retrain (besides ``spec.max_new_rows``); it bounds
#: the file opens and sha256 checks after a long trainer outage with many small batches.
MAX_NEW_BATCHES = 1000

log = logging.getLogger(__name__)


@dataclass
class DataPlan:
    train_new: list[BatchInfo]
    reservoir: list[BatchInfo]
    holdout: list[BatchInfo]
    data_state: dict[str, Any] = field(default_factory=dict)

    @property
    def train(self) -> list[BatchInfo]:
        """Training batches in a fixed order: older reservoir first, then the new ones."""
        return [*self.reservoir, *self.train_new]


def _sort_key(b: BatchInfo) -> tuple[int, str]:
    return int(b.manifest.get("created_at_ms", 0)), b.batch_id


def reservoir_add(reservoir: list[str], seen: int, batch_id: str, cap: int, seed: int) -> int:
    """One step of reservoir sampling (Algorithm R) with a per-step seeded RNG; returns the new count."""
    seen += 1
    if len(reservoir) < cap:
        reservoir.append(batch_id)
    else:
        j = random.Random(f"{seed}:{seen}").randrange(seen)
        if j < cap:
            reservoir[j] = batch_id
    return seen


def batch_rows(b: BatchInfo) -> int:
    """Rows of a batch according to its manifest (0 when the manifest does not say)."""
    return int(b.manifest.get("record_count") or 0)


def holdout_size(spec: ModelSpec, new: list[BatchInfo]) -> int:
    """How many of the newest batches to hold out: enough for max(N rows, fraction of the new rows).

    At least ``spec.holdout_batches``; at least one new batch must be left to train on. Raises
    NotEnoughDataError (the trainer then waits for more batches) when the new data cannot give both.
    """
    total = sum(batch_rows(b) for b in new)
    need = max(spec.min_holdout_rows, math.ceil(spec.holdout_fraction * total))
    k = max(1, spec.holdout_batches)
    while k < len(new) and sum(batch_rows(b) for b in new[-k:]) < need:
        k += 1
    if k >= len(new):
        raise NotEnoughDataError(
            f"model {spec.name!r}: {len(new)} new feature batch(es) ({total} rows) since the last version; the "
            f"gate needs at least {need} held-out rows (max(min_holdout_rows={spec.min_holdout_rows}, "
            f"holdout_fraction={spec.holdout_fraction:g} x new rows)) in the newest batches plus at least one "
            "older batch to train on. Let the stream worker write more batches"
        )
    return k


def direct_count(spec: ModelSpec, train_new: list[BatchInfo]) -> int:
    """How many of the newest ``train_new`` batches are trained on directly (at least one).

    Newest first, while their rows stay within ``spec.max_new_rows`` and their number within
    MAX_NEW_BATCHES; older ones only enter reservoir sampling. Why rows: what one retrain costs in
    memory and time is its rows, not its batch files. The cap was 40 batches, and with a few
    partitions each closing a batch a second that is ~13 s of data, so a previous version's holdout
    (the oldest of the new batches) could go untrained (docs/FRESHNESS.md); with a row budget every
    batch is trained on once unless the stream outruns the trainer.
    """
    rows = 0
    for n, b in enumerate(reversed(train_new)):
        rows += batch_rows(b)
        if n and (rows > spec.max_new_rows or n >= MAX_NEW_BATCHES):
            return n
    return len(train_new)


def plan_data(spec: ModelSpec, batches: list[BatchInfo], parent_state: dict[str, Any] | None) -> DataPlan:
    """Split the store's batches (oldest first) into reservoir / new training / holdout batches."""
    batches = sorted(batches, key=_sort_key)
    by_id = {b.batch_id: b for b in batches}
    state = parent_state or {}
    cursor = state.get("cursor")
    trained = state.get("cursor_offsets") if isinstance(state.get("cursor_offsets"), dict) else None
    if cursor is None:
        new = batches
    elif cursor in by_id:
        idx = [b.batch_id for b in batches].index(cursor)
        new = batches[idx + 1:]
    elif trained is not None:
        # The cursor batch is gone (store gc, or a `store promote` of a rebuilt namespace, whose batches
        # have other ids and all are newer): what is new is what lies past the offsets trained so far.
        # By creation time, every rebuilt batch was new, so a candidate trained again on the rows its
        # parent had trained on, and its holdout overlapped them (a gate biased to the current version).
        new = [b for b in batches if _past(b, trained)]
    else:  # a version from before the offsets were recorded: fall back to the cursor's creation time
        mark = (int(state.get("cursor_created_at_ms", 0)), str(cursor))
        new = [b for b in batches if _sort_key(b) > mark]
    holdout_n = holdout_size(spec, new)
    holdout = new[-holdout_n:]
    train_new = new[:-holdout_n]
    reservoir_ids = [str(b) for b in state.get("reservoir", [])]
    seen = int(state.get("seen", 0))
    overflow = train_new[:len(train_new) - direct_count(spec, train_new)]
    train_new = train_new[len(overflow):]
    for b in overflow:
        seen = reservoir_add(reservoir_ids, seen, b.batch_id, spec.reservoir_batches, spec.seed)
    reservoir = [by_id[i] for i in reservoir_ids if i in by_id]
    next_reservoir = [b.batch_id for b in reservoir]
    for b in train_new:
        seen = reservoir_add(next_reservoir, seen, b.batch_id, spec.reservoir_batches, spec.seed)
    last = train_new[-1]
    marks = dict(trained or {})
    for b in batches[:batches.index(last) + 1]:
        end = _partition_end(b)
        if end is not None:
            marks[end[0]] = max(int(marks.get(end[0], -1)), end[1])
    return DataPlan(train_new, reservoir, holdout, {
        "cursor": last.batch_id, "cursor_created_at_ms": int(last.manifest.get("created_at_ms", 0)),
        "cursor_offsets": marks, "seen": seen, "reservoir": next_reservoir,
    })


def _partition_end(b: BatchInfo) -> tuple[str, int] | None:
    """``("topic/partition", last offset)`` of a batch, from its id (as store gc reads it,
    streaming.retention); None for an id of another form."""
    try:
        topic, partition, _first, last = parse_batch_id(b.batch_id)
    except StoreError:
        return None
    return f"{topic}/{partition}", last


def _past(b: BatchInfo, marks: dict[str, Any]) -> bool:
    """True when ``b`` covers an offset past ``marks`` (per topic/partition, the last offset trained)."""
    end = _partition_end(b)
    return end is not None and end[1] > int(marks.get(end[0], -1))


def file_sha256(path: Location) -> str:
    """sha256 of a batch file, a local path or an object-storage URL (``BatchInfo.path``)."""
    digest = hashlib.sha256()
    with open_url(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_batches(batches: list[BatchInfo], expected_sha: dict[str, str] | None = None) -> None:
    """Raise :class:`DamagedBatchError` for the first batch whose file no longer hashes to its manifest's
    sha256 (or to ``expected_sha``), without reading its rows.

    Why: a distributed run must agree on its window before any worker trains. Every process checks the
    whole plan up front and plans again without a damaged batch, so they all leave out the same ones
    (``trainer/multiworker.py``); found during a shard's load, it ended one worker and failed every run."""
    for b in batches:
        if _recorded_sha(b, expected_sha) is not None:
            _verified_sha(b, expected_sha)


def _recorded_sha(b: BatchInfo, expected_sha: dict[str, str] | None) -> str | None:
    """The sha256 ``b``'s file must have: the lineage's (``expected_sha``) when given, else its manifest's."""
    return (expected_sha or {}).get(b.batch_id) or b.manifest.get("sha256")


def _gone(b: BatchInfo, exc: FileNotFoundError) -> BatchesGoneError:
    """Why here and not around the whole run: only a planned batch's file vanishing means "plan again"
    (``store gc`` deleted it meanwhile); any other missing file is a real error and must say so."""
    return BatchesGoneError(f"lineage: batch {b.batch_id}'s file {b.path} was deleted while this run read it "
                            f"(e.g. by `streamlearn store gc`): {exc.strerror or exc}", [b.batch_id])


def _verified_sha(b: BatchInfo, expected_sha: dict[str, str] | None) -> str:
    """The sha256 of ``b``'s file; DamagedBatchError when it is not the recorded one."""
    want = _recorded_sha(b, expected_sha)
    try:
        got = file_sha256(b.path)
    except FileNotFoundError as exc:
        raise _gone(b, exc) from exc
    if want is not None and got != want:
        raise DamagedBatchError(
            f"batch {b.batch_id}: sha256 of {b.path} is {got}, expected {want}; the file changed since "
            "it was recorded; restore it or replay its offsets into a fresh feature store", b.batch_id
        )
    return got


def load_batches(spec: ModelSpec, batches: list[BatchInfo], n_features: int,
                 expected_sha: dict[str, str] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """Read batches after checking each file's sha256; returns ``(x, label columns, sha256 list)``.

    The hash is checked against the batch manifest, or against ``expected_sha`` (batch id -> hash
    recorded in a version's lineage) when given; any mismatch raises LineageError. A label the
    featurizer did not emit becomes a NaN column.
    """
    xs: list[np.ndarray] = []
    cols: dict[str, list[np.ndarray]] = {name: [] for name in (spec.label, *spec.aux_labels)}
    hashes: list[str] = []
    for b in batches:
        got = _verified_sha(b, expected_sha)
        try:
            arrays = read_batch(b.path)
        except FileNotFoundError as exc:
            raise _gone(b, exc) from exc
        x = arrays["x"]
        if x.shape[1] != n_features:
            raise LineageError(
                f"batch {b.batch_id}: rows have {x.shape[1]} features, model {spec.name!r} needs {n_features}; "
                "the batch was written by another featurizer version"
            )
        xs.append(x)
        for name in cols:
            cols[name].append(arrays[name] if name in arrays else np.full(len(x), np.nan))
        hashes.append(got)
    x_all = np.concatenate(xs, axis=0) if xs else np.zeros((0, n_features), np.float32)
    columns = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols.items()}
    return x_all, columns, hashes


def labelled(spec: ModelSpec, x: np.ndarray, columns: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Drop rows whose primary label is NaN (unknown), then build the targets with the spec.

    A classifier also drops rows whose label is no class id (not an integer in [0, classes)), with one
    warning: users label their own data, and a camera file name ``20241203_101500.png`` labels an
    image ``20241203``. One such row used to fail every retrain for as long as its batch was in the
    window; a row that cannot be a target is unlabelled data, like a missing label.
    """
    ids = np.asarray(columns[spec.label], dtype=np.float64)
    mask = ~np.isnan(ids)
    if spec.class_names is not None:
        n = len(spec.class_names)
        bad = mask & not_class_ids(ids, n)
        if bad.any():
            log.warning("model %s: %d row(s) have a %r label that is no class id in [0, %d) (e.g. %s); "
                        "they train as unlabelled rows", spec.name, int(bad.sum()), spec.label, n,
                        sorted({float(v) for v in ids[bad][:5]}))
            mask &= ~bad
    kept = {k: np.asarray(v)[mask] for k, v in columns.items()}
    y = np.asarray(spec.make_targets(kept), dtype=np.float32)
    return np.asarray(x[mask], dtype=np.float32), y


def lineage(plan: DataPlan, hashes: dict[str, str], feature_store: Location) -> dict[str, Any]:
    """Exact provenance of a version: every batch with its role, file, sha256 and offset ranges.

    ``file`` is relative to the feature store (``live/sensor/<id>.avro``), never an absolute path
    or URL, so a lineage resolves on any host that opens the same store."""
    entries: list[dict[str, Any]] = []
    offsets: dict[str, list[list[int]]] = {}
    schema_ids: set[int] = set()
    featurizers: set[str] = set()
    roles = [("reservoir", plan.reservoir), ("train", plan.train_new), ("holdout", plan.holdout)]
    for role, group in roles:
        for b in group:
            m = b.manifest
            rel = relative_key(b.path, feature_store) or str(b.path)
            entries.append({"batch_id": b.batch_id, "role": role, "file": rel, "sha256": hashes[b.batch_id],
                            "ranges": m.get("ranges", []), "record_count": m.get("record_count"),
                            "namespace": m.get("namespace"), "featurizer": m.get("featurizer", {}).get("version")})
            for r in m.get("ranges", []):
                offsets.setdefault(f"{r['topic']}/{r['partition']}", []).append(
                    [int(r["first_offset"]), int(r["last_offset"])])
            schema_ids.update(int(s) for s in m.get("schema_ids", []))
            if m.get("featurizer", {}).get("version"):
                featurizers.add(str(m["featurizer"]["version"]))
    return {"batches": entries, "offsets": {k: sorted(v) for k, v in sorted(offsets.items())},
            "schema_ids": sorted(schema_ids), "featurizer_versions": sorted(featurizers)}
