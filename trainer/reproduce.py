"""``streamlearn retrain --reproduce <model>/<version>``: retrain a version from its lineage and compare.

What is replayed: the exact batch files of the version's lineage, in their recorded roles and
order (reservoir, new training batches, holdout), each checked against the sha256 recorded at
training time (a changed or missing file raises LineageError rather than silently training on
other data); the parent version's weights for the warm start; the recorded seed and the spec's
training budget. The batch files are themselves a deterministic function of the recorded topic /
partition / offset ranges (the store writes byte-identical files for a replayed range), which is
why matching hashes mean matching offsets.

Tolerance: with ``enable_op_determinism`` on the same machine, TensorFlow gives bit-identical
weights, so the default is ``1e-6`` absolute on the primary metric (scores are computed in float64
from float32 outputs). Across machines/CPU instruction sets kernels can differ in the last bits;
pass a looser ``tolerance`` there.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from streaming.config import Settings
from streaming.model_registry import ModelRegistry
from streaming.objstore import Location, is_remote, open_store
from streaming.progress import progress
from streaming.store import BatchInfo
from trainer.data import DataPlan
from trainer.exceptions import LineageError, ReproductionError
from trainer.spec import ModelSpec, load_spec

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-6


def lineage_path(settings: Settings, entry: dict[str, Any]) -> Location:
    """The batch file a lineage entry names, validated: a relative path that stays under the feature store.

    Why: ``metadata.json`` is data, and a hand-edited or hostile one must not make a reproduction read
    (or hash and train on) files outside the store, e.g. ``/etc/passwd`` or ``../../other-tenant``.
    """
    raw = entry.get("file")
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise LineageError(f"lineage: batch {str(entry.get('batch_id'))[:80]} has no valid 'file'")
    rel = PurePosixPath(raw)
    if rel.is_absolute() or ".." in rel.parts or not raw.endswith(".avro"):
        raise LineageError(f"lineage: file {raw[:200]!r} must be a relative .avro path under the feature store "
                           "(no absolute path, no '..'); the version's metadata is not trustworthy")
    if is_remote(settings.feature_store):  # a key under the store URL: no symlinks to follow
        return f"{str(settings.feature_store).rstrip('/')}/{rel.as_posix()}"
    root = Path(settings.feature_store).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise LineageError(f"lineage: file {raw[:200]!r} leaves the feature store {root} (a symlink?)")
    return path


def _batch(settings: Settings, entry: dict[str, Any]) -> BatchInfo:
    path = lineage_path(settings, entry)
    if isinstance(path, str):
        return _remote_batch(settings, entry, path)
    if not path.is_file():
        root = Path(settings.feature_store).resolve()
        archived = _archived(root, PurePosixPath(str(entry["file"])), entry.get("sha256"))
        if archived is None:
            raise LineageError(
                f"lineage: batch {entry['batch_id']} ({path}) is gone, and no `store promote` archive "
                f"(replaced-*) holds it; restore the feature store from a backup, or check the version's "
                f"offsets {entry.get('ranges')} with --from-offsets")
        log.info("lineage: batch %s is in the archive %s (moved there by `store promote`)", entry["batch_id"],
                 archived.relative_to(root).parts[0])
        path = archived
    manifest_path = path.with_suffix(".json")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    return BatchInfo(entry["batch_id"], path, manifest)


def _archived(root: Path, rel: PurePosixPath, sha256: Any) -> Path | None:
    """The batch file ``rel`` (``live/<kind>/<id>.avro``) as ``store promote`` archived it
    (``replaced-<time>/<kind>/<id>.avro``), newest archive first, when its manifest has the recorded
    sha256. Why: a promote of a rebuilt namespace moves the old live batches there (kept, never
    deleted), and a replay's batch boundaries differ, so every version trained before it had lineage
    batches that were no longer in live, and the advice "replay into it" could not be followed."""
    if len(rel.parts) < 3:
        return None
    for archive in sorted(root.glob("replaced-*"), reverse=True):
        candidate = archive.joinpath(*rel.parts[1:])
        try:
            manifest = json.loads(candidate.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if candidate.is_file() and isinstance(manifest, dict) and manifest.get("sha256") == sha256:
            return candidate
    return None


def _remote_batch(settings: Settings, entry: dict[str, Any], url: str) -> BatchInfo:
    """A lineage batch on object storage: it exists iff its manifest does (docs/STORE.md)."""
    objects = open_store(settings.feature_store)
    key = url[len(str(settings.feature_store).rstrip("/")) + 1:]
    try:
        manifest = json.loads(objects.get(key[:-len(".avro")] + ".json"))
    except FileNotFoundError as exc:
        raise LineageError(
            f"lineage: batch {entry['batch_id']} ({url}) is gone; restore the feature store or replay the "
            f"offsets {entry.get('ranges')} into it first") from exc
    return BatchInfo(entry["batch_id"], url, manifest)


def reproduce(settings: Settings, name: str, version: int, *, tolerance: float = DEFAULT_TOLERANCE,
              spec: ModelSpec | None = None, from_offsets: bool = False) -> dict[str, Any]:
    """Retrain ``name``/``version`` from its lineage; returns a report, raises ReproductionError on mismatch.

    ``from_offsets``: rebuild every batch from the raw Kafka offsets through the featurizer
    (:mod:`trainer.replay`) instead of re-reading the batch files.
    """
    from trainer import model_io
    from trainer.evaluate import fit_and_evaluate
    from trainer.training import configure_tensorflow

    registry = ModelRegistry(settings.model_dir)
    meta = registry.verify(name, version)
    if meta.get("trigger") == "distributed":
        # Refused before any work: a single process retrains on another row order and batch split,
        # so its score differed, and the report claimed the gate decision would have flipped.
        raise ReproductionError(
            f"version: {name}/{version} was trained by a distributed run (trigger=distributed); one process "
            "cannot reproduce it (row order and per-worker batches differ, docs/DISTRIBUTED.md). Its lineage "
            f"still names every batch and sha256: `streamlearn models show {name}/{version}`")
    configure_tensorflow()
    spec = spec or load_spec(name, settings)
    features = spec.features()
    recorded_fz = meta.get("featurizer", {}).get("version")
    if recorded_fz != features.version:
        raise ReproductionError(f"featurizer: version {version} was trained with {recorded_fz}, the spec now "
                                f"uses {features.version}; reproduce with the original spec")
    recorded_spec = meta.get("spec", {})
    changed = {k for k, v in spec.describe().items() if k in recorded_spec and recorded_spec[k] != v}
    if changed:
        raise ReproductionError(f"spec: settings {sorted(changed)} differ from those recorded in version "
                                f"{version}; reproduce with the original spec")
    entries = meta["lineage"]["batches"]
    by_role: dict[str, list[BatchInfo]] = {"reservoir": [], "train": [], "holdout": []}
    replay_dir: Path | None = None
    if from_offsets:
        import tempfile

        from trainer.replay import replay_entry

        replay_dir = Path(tempfile.mkdtemp(prefix=f"replay-{name}-{version}-", dir=settings.home))
    how = "re-read from Kafka" if replay_dir is not None else "load"
    with progress(len(entries), f"reproduce {name}/{version}: {how} batches", unit="batches") as bar:
        for entry in entries:
            if entry.get("role") not in by_role:
                raise LineageError(f"lineage: role {str(entry.get('role'))[:40]!r} is not one of {sorted(by_role)}")
            if replay_dir is not None:
                batch = replay_entry(settings, entry, features.kind, features.version, replay_dir)
            else:
                batch = _batch(settings, entry)
            by_role[entry["role"]].append(batch)
            bar.advance()
    plan = DataPlan(by_role["train"], by_role["reservoir"], by_role["holdout"])
    expected = {e["batch_id"]: e["sha256"] for e in entries}
    parent = meta.get("parent_version")
    parent_dir = None
    if parent is not None:
        registry.verify(name, parent)
        parent_dir = registry.version_dir(name, parent)
    ev = fit_and_evaluate(spec, features, plan, parent_dir=parent_dir, seed=int(meta["seed"]),
                          expected_sha=expected)
    recorded = meta["gate"].get("candidate_score")
    got = ev.decision.candidate_score
    with np.load(registry.version_dir(name, version) / model_io.WEIGHTS_FILE) as data:
        original = [data[k] for k in sorted(data.files)]
    weights = ev.model.get_weights()
    max_weight_diff = max((float(np.max(np.abs(a - b))) if a.size else 0.0)
                          for a, b in zip(original, weights, strict=True))
    diff = abs(got - recorded) if (recorded is not None and got is not None) else math.inf
    report = {
        "model": name, "version": version, "parent_version": parent, "primary_metric": spec.primary_metric,
        "recorded_score": recorded, "reproduced_score": got, "abs_difference": diff,
        "tolerance": tolerance, "max_abs_weight_difference": max_weight_diff,
        "recorded_decision": meta["gate"].get("action"), "reproduced_decision": ev.decision.action,
        "batches": len(entries), "source": "kafka offsets" if from_offsets else "batch files",
        "ok": diff <= tolerance,
    }
    if replay_dir is not None:
        import shutil

        shutil.rmtree(replay_dir, ignore_errors=True)
    if not report["ok"]:
        raise ReproductionError(
            f"reproduce: {name}/{version} {spec.primary_metric} {got} differs from the recorded {recorded} by "
            f"{diff:.3g} > tolerance {tolerance:g}; report: {json.dumps(report)}"
        )
    return report
