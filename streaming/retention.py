"""Retention of the feature store (`streamlearn store gc`): an age limit and a size limit per kind.

What is never deleted, whatever the limits say:

* a batch named in the lineage of any version still in the model registry (``metadata.json``
  ``lineage.batches[].batch_id``) — an unexpired version must stay reproducible
  (``streamlearn retrain --reproduce``); a version expires when the registry's own retention
  (``ModelRegistry.apply_retention``) deletes it, and its batches become collectable then.
  Ids are matched in every namespace, which can only keep more than needed, never less; and the
  batch just before each such batch in its partition, whose featurizer state
  ``retrain --reproduce --from-offsets`` replays the range from;
* the newest batch of every partition — the stream worker resumes after it and restores the
  featurizer state checkpointed with it (deleting it would restart the windows from scratch);
* a batch a training cycle in progress plans to use: a live trainer's cycle marker
  (``STATE_DIR/trainer/<model>.json``, phase ``started``, its pid alive) names them. A version
  published after gc deleted one of its batches could not be reproduced; the trainer also checks
  that its batches are all still there before it publishes, which closes the window between its
  plan and its marker;
* anything when a version's metadata cannot be read: gc stops with an error naming it, since
  it cannot know which batches that version needs.

Order: oldest first (the store's order, manifest ``created_at_ms``). The age limit deletes every
unprotected batch older than ``retention_days``; the size limit then deletes the oldest unprotected
batches until the kind's bytes (``.avro`` + manifest + state file) fit ``max_bytes`` (protected
batches count but stay, so a store whose lineage alone exceeds the limit stays above it, and the
report says so). Both limits are off by default (0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from streaming import clock
from streaming.config import Settings
from streaming.exceptions import ModelRegistryError, StoreError
from streaming.model_registry import ModelRegistry
from streaming.store import STATE_SUFFIX, FeatureStore, parse_batch_id
from streaming.topics import KINDS

_DAY_MS = 86_400_000


@dataclass
class GcResult:
    """What one gc run deleted (or, with ``dry_run``, would delete) and what it kept for lineage."""

    dry_run: bool
    namespace: str
    retention_days: float
    max_bytes: int
    deleted: list[dict[str, Any]] = field(default_factory=list)
    kept_for_lineage: int = 0
    kept_newest_of_partition: int = 0
    bytes_before: dict[str, int] = field(default_factory=dict)
    bytes_after: dict[str, int] = field(default_factory=dict)

    @property
    def freed_bytes(self) -> int:
        return sum(int(d["bytes"]) for d in self.deleted)

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "namespace": self.namespace, "retention_days": self.retention_days,
                "max_bytes": self.max_bytes, "deleted": self.deleted, "freed_bytes": self.freed_bytes,
                "kept_for_lineage": self.kept_for_lineage,
                "kept_newest_of_partition": self.kept_newest_of_partition,
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after}


def _predecessors(batch_ids: list[str], protected: set[str]) -> set[str]:
    """The batch just before each protected one in its topic partition (by first offset; ids parsed as
    :func:`_newest_per_partition` parses them).

    Why: ``retrain --reproduce --from-offsets`` replays a lineage range starting from the featurizer
    state the batch before it recorded; gc deleted that batch, and the replay then started from an
    older batch's state and reported the version as not reproducible."""
    by_partition: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for bid in batch_ids:
        try:
            topic, partition, first, _last = parse_batch_id(bid)
        except StoreError:
            continue
        by_partition.setdefault((topic, partition), []).append((first, bid))
    out: set[str] = set()
    for items in by_partition.values():
        items.sort()
        out.update(items[i - 1][1] for i in range(1, len(items)) if items[i][1] in protected)
    return out


def lineage_batch_ids(registry: ModelRegistry) -> set[str]:
    """Every batch id some version in the registry was trained or evaluated on."""
    needed: set[str] = set()
    for name in registry.names():
        for version in registry.versions(name):
            try:
                meta = registry.metadata(name, version)
            except ModelRegistryError as exc:
                raise StoreError(f"store gc: cannot read the lineage of {name}/{version} ({exc}); gc would not "
                                 "know which batches it needs, so nothing was deleted; fix or delete that "
                                 "version first") from exc
            for entry in meta.get("lineage", {}).get("batches", []):
                needed.add(str(entry["batch_id"]))
    return needed


def in_flight_batch_ids(settings: Settings) -> set[str]:
    """Batches named by the cycle marker of a trainer that is training now (phase ``started``, pid alive).

    The marker is written by ``trainer.cycle.write_marker``; read here as plain JSON, since the store's
    retention must not import the trainer."""
    from streaming.fsutil import pid_alive

    needed: set[str] = set()
    folder = settings.state_dir / "trainer"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            marker = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(marker, dict) or marker.get("phase") != "started":
            continue
        pid = marker.get("pid")
        if not isinstance(pid, int) or pid <= 0 or not pid_alive(pid):
            continue
        for key in ("train_batches", "holdout_batches", "reservoir_batches"):
            needed.update(str(b) for b in marker.get(key) or [])
    return needed


def _batch_bytes(store: FeatureStore, kind: str, namespace: str, batch_id: str) -> int:
    if store.remote is not None:  # object storage: the objects' sizes (a HEAD each)
        return sum(store.remote.objects.size(key) for key in
                   (store.remote.key(kind, namespace, f"{batch_id}{ext}") for ext in (".avro", ".json", STATE_SUFFIX))
                   if store.remote.objects.exists(key))
    d = store.directory(kind, namespace)
    total = 0
    for name in (f"{batch_id}.avro", f"{batch_id}.json", f"{batch_id}{STATE_SUFFIX}"):
        try:
            total += (d / name).stat().st_size
        except FileNotFoundError:
            continue
    return total


def _newest_per_partition(batch_ids: list[str]) -> set[str]:
    newest: dict[tuple[str, int], tuple[int, str]] = {}
    for bid in batch_ids:
        try:
            topic, partition, _first, last = parse_batch_id(bid)
        except StoreError:
            continue
        if (topic, partition) not in newest or last > newest[(topic, partition)][0]:
            newest[(topic, partition)] = (last, bid)
    return {bid for _, bid in newest.values()}


def collect(settings: Settings, *, dry_run: bool, kinds: list[str] | None = None, namespace: str = "live",
            retention_days: float | None = None, max_bytes: int | None = None,
            now_ms: int | None = None, store: FeatureStore | None = None) -> GcResult:
    """Apply the retention limits (``None`` = the settings' value) to ``namespace``."""
    days = settings.store_retention_days if retention_days is None else float(retention_days)
    cap = settings.store_max_bytes if max_bytes is None else int(max_bytes)
    if days < 0 or cap < 0:
        raise StoreError("store gc: --retention-days and --max-bytes must be >= 0 (0 turns a limit off)")
    store = store or FeatureStore(settings.feature_store)
    if namespace != "live" and store.remote is None and not (store.root / namespace).is_dir():
        # a typo'd namespace used to report "deleted 0 batches" as if there were nothing to collect
        found = sorted(p.name for p in store.root.iterdir() if p.is_dir()) if store.root.is_dir() else []
        raise StoreError(f"store gc: --namespace {namespace!r} does not exist in {store.root}; "
                         f"namespaces there: {', '.join(found) or 'none'}")
    result = GcResult(dry_run=dry_run, namespace=namespace, retention_days=days, max_bytes=cap)
    protected = lineage_batch_ids(ModelRegistry(settings.model_dir)) | in_flight_batch_ids(settings)
    now = clock.now_ms() if now_ms is None else now_ms
    for kind in kinds or sorted(KINDS):
        batches = store.batches(kind, namespace)
        ids = [b.batch_id for b in batches]
        keep_newest = _newest_per_partition(ids)
        protected_here = protected | _predecessors(ids, protected)
        sizes = {b.batch_id: _batch_bytes(store, kind, namespace, b.batch_id) for b in batches}
        total = sum(sizes.values())
        result.bytes_before[kind] = total
        for b in batches:  # oldest first
            age_ok = days <= 0 or now - int(b.manifest.get("created_at_ms", 0) or 0) <= days * _DAY_MS
            size_ok = cap <= 0 or total <= cap
            if age_ok and size_ok:
                continue
            if b.batch_id in protected_here:
                result.kept_for_lineage += 1
                continue
            if b.batch_id in keep_newest:
                result.kept_newest_of_partition += 1
                continue
            reason = "age" if not age_ok else "size"
            freed = sizes[b.batch_id] if dry_run else store.remove_batch(kind, b.batch_id, namespace)
            total -= sizes[b.batch_id]
            result.deleted.append({"kind": kind, "batch_id": b.batch_id, "bytes": freed, "reason": reason,
                                   "created_at_ms": b.manifest.get("created_at_ms")})
        result.bytes_after[kind] = total
    return result
