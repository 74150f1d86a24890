"""The feature store's batches on object storage (``s3://``, other fsspec URLs): what
:class:`streaming.store.FeatureStore` delegates to when its root is a URL.

Why a separate protocol from the local one: an object store has no rename, so the local rule "a
batch exists iff its ``.avro`` exists" (temp file renamed into place last) cannot be built there.
Instead a batch is published with :meth:`ObjectStore.publish`: the ``.avro`` and the state file are
put first (each PUT is atomic: whole or absent), the manifest ``<batch_id>.json`` last and only if
absent (S3 ``If-None-Match: *``). **On object storage a batch exists iff its manifest exists.** A
writer killed between the data and the manifest leaves invisible objects that
:meth:`RemoteBatches.collect_orphans` deletes after a grace period; a second writer of the same
range loses the conditional put and gets the first one's batch back, as a local re-write does.

Keys are ``<namespace>/<kind>/<batch_id>.{avro,json,state.json}`` relative to the store URL, so a
lineage entry (``file``: ``live/sensor/<id>.avro``) resolves on any host that opens the same URL.
There is no ``_index.json`` journal (it relies on O_APPEND): a listing reads names only and keeps
the manifests it already parsed in memory, so a poll parses only new manifests.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from streaming.exceptions import BackpressureError, ObjectNotFoundError, StoreError
from streaming.objstore import ObjectStore, backend_errors

if TYPE_CHECKING:
    from streaming.store import BatchInfo, BatchSpec, FeatureStore, StoredRow

log = logging.getLogger(__name__)


class ManifestGoneError(StoreError):
    """The manifest was deleted between a listing and its read (gc, compaction): the batch is gone."""


#: Unpublished data objects younger than this are a writer in progress, never garbage.
ORPHAN_GRACE_S = 900.0
STATE_SUFFIX = ".state.json"


def _is_manifest_name(name: str) -> bool:
    return name.endswith(".json") and not name.endswith(STATE_SUFFIX) and not name.startswith(("_", "."))


class RemoteBatches:
    """Batch I/O of one :class:`FeatureStore` whose root is an object-storage URL."""

    def __init__(self, store: FeatureStore, objects: ObjectStore) -> None:
        self.store = store
        self.objects = objects
        self._manifests: dict[str, dict[str, dict[str, Any]]] = {}  # prefix -> batch id -> manifest

    @staticmethod
    def prefix(kind: str, namespace: str) -> str:
        return f"{namespace}/{kind}"

    def key(self, kind: str, namespace: str, name: str) -> str:
        self.store.check_names(kind, namespace)
        return f"{self.prefix(kind, namespace)}/{name}"

    def batch_path(self, kind: str, batch_id: str, namespace: str) -> str:
        return str(self.objects.url_of(self.key(kind, namespace, f"{batch_id}.avro")))

    # ---- reading -----------------------------------------------------------------------------
    def batch_ids(self, kind: str, namespace: str) -> list[str]:
        """Ids of the published batches (those whose manifest exists), by name."""
        from streaming.store_format import _BATCH_RE

        self.store.check_names(kind, namespace)
        names = self.objects.names(self.prefix(kind, namespace))
        return sorted(n[:-5] for n in names if _is_manifest_name(n) and _BATCH_RE.match(n[:-5]))

    def manifest(self, kind: str, batch_id: str, namespace: str) -> dict[str, Any]:
        try:
            data = self.objects.get(self.key(kind, namespace, f"{batch_id}.json"))
        except ObjectNotFoundError as exc:
            raise ManifestGoneError(f"batch_id: {batch_id} is not published in {self.objects.url}/"
                                    f"{self.prefix(kind, namespace)}") from exc
        from streaming.store import parse_manifest

        # as the local store reads it: a damaged manifest is named, never skipped (it hid the batch) nor
        # a traceback (a JSON list was an AttributeError in every listing)
        return parse_manifest(data, f"{self.objects.url}/{self.prefix(kind, namespace)}/{batch_id}.json",
                              f"Delete {batch_id}.* there")

    def ordered(self, kind: str, namespace: str) -> list[tuple[str, dict[str, Any]]]:
        """Every batch with its manifest, oldest first; parses only manifests not seen before."""
        ids = self.batch_ids(kind, namespace)
        cache = self._manifests.setdefault(self.prefix(kind, namespace), {})
        for gone in set(cache) - set(ids):
            del cache[gone]
        for bid in ids:
            if bid not in cache:
                try:
                    cache[bid] = self.manifest(kind, bid, namespace)
                except ManifestGoneError:
                    continue  # removed between the listing and the read
        return sorted(((b, cache[b]) for b in ids if b in cache),
                      key=lambda p: (int(p[1].get("created_at_ms", 0) or 0), p[0]))

    def batches(self, kind: str, namespace: str) -> list[BatchInfo]:
        from streaming.store import BatchInfo

        return [BatchInfo(bid, self.batch_path(kind, bid, namespace), m) for bid, m in self.ordered(kind, namespace)]

    def batches_after(self, kind: str, batch_id: str | None, created_at_ms: int, namespace: str) -> list[BatchInfo]:
        from streaming.store import BatchInfo

        pairs = self.ordered(kind, namespace)
        if batch_id is not None:
            known = dict(pairs).get(batch_id)
            mark = (int(known.get("created_at_ms", 0) or 0) if known is not None else int(created_at_ms), batch_id)
            pairs = [(b, m) for b, m in pairs if (int(m.get("created_at_ms", 0) or 0), b) > mark]
        return [BatchInfo(bid, self.batch_path(kind, bid, namespace), m) for bid, m in pairs]

    def verify(self, info: BatchInfo) -> None:
        kind, namespace = str(info.manifest.get("kind")), str(info.manifest.get("namespace"))
        key = self.key(kind, namespace, f"{info.batch_id}.avro")
        try:
            data = self.objects.get(key)
        except ObjectNotFoundError as exc:
            raise StoreError(f"batch {info.batch_id}: its rows {key} are gone although its manifest exists; "
                             "delete the batch and replay the range") from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.manifest.get("sha256"):
            raise StoreError(f"batch {info.batch_id}: sha256 {digest} of {self.objects.url}/{key} does not match "
                             "its manifest; the object was modified or torn; delete it and replay the range")

    # ---- writing -----------------------------------------------------------------------------
    def write_batch(self, spec: BatchSpec, rows: Sequence[StoredRow], namespace: str,
                    created_at_ms: int | None) -> tuple[BatchInfo, bool]:
        """Data objects first, the manifest last and only if absent (see the module docstring)."""
        from streaming.store import BatchInfo, batch_id_for, encode_rows, manifest_bytes

        bid = batch_id_for(spec.topic, spec.partition, spec.first_offset, spec.last_offset)
        path = self.batch_path(spec.kind, bid, namespace)
        manifest_key = self.key(spec.kind, namespace, f"{bid}.json")
        try:  # an unreachable or refusing object store is backpressure (pause, retry), not a crash
            if self.objects.exists(manifest_key):
                return BatchInfo(bid, path, self.manifest(spec.kind, bid, namespace)), False
            self.store.check_overlap(spec, bid, namespace)
            data = encode_rows(bid, rows, spec.n_features, spec.label_names)
            manifest, state_bytes = self.store.prepare_manifest(bid, spec, rows, data, namespace, created_at_ms)
            objects = {self.key(spec.kind, namespace, f"{bid}.avro"): data}
            if state_bytes is not None:
                objects[self.key(spec.kind, namespace, f"{bid}{STATE_SUFFIX}")] = state_bytes
            body = manifest_bytes(manifest)
            created = self.objects.publish(objects, manifest_key, body)
            if not created:  # another writer published the same range first: its batch is the batch
                return BatchInfo(bid, path, self.manifest(spec.kind, bid, namespace)), False
        except backend_errors() as exc:
            err = BackpressureError(f"feature store: cannot publish batch {bid} to {self.objects.url}: {exc}; "
                                    "the worker pauses and retries")
            raise err from exc
        return BatchInfo(bid, path, manifest), True

    def remove_batch(self, kind: str, batch_id: str, namespace: str) -> int:
        """Manifest first (the batch stops existing at once), then its data objects."""
        freed = 0
        for name in (f"{batch_id}.json", f"{batch_id}.avro", f"{batch_id}{STATE_SUFFIX}"):
            key = self.key(kind, namespace, name)
            try:
                size = self.objects.size(key)
            except ObjectNotFoundError:
                continue
            if self.objects.delete(key):
                freed += size
        self._manifests.get(self.prefix(kind, namespace), {}).pop(batch_id, None)
        return freed

    def collect_orphans(self, kind: str, namespace: str, older_than_s: float = ORPHAN_GRACE_S) -> int:
        """Delete data objects whose manifest never appeared (a writer killed before publishing),
        once older than ``older_than_s`` (at least :data:`ORPHAN_GRACE_S` would be wise: a live
        writer's objects are young). Returns how many were deleted; 0 when the store cannot be
        listed now (cleanup is retried at the next start; it stopped a worker from starting)."""
        try:
            names = set(self.objects.names(self.prefix(kind, namespace)))
        except backend_errors() as exc:
            log.warning("feature store: cannot look for unpublished objects in %s/%s (%s); left for later",
                        self.objects.url, self.prefix(kind, namespace), exc)
            return 0
        now = time.time()
        removed = 0
        for name in sorted(names):
            if name.endswith(STATE_SUFFIX):
                bid = name[: -len(STATE_SUFFIX)]
            elif name.endswith(".avro"):
                bid = name[:-5]
            else:
                continue
            if f"{bid}.json" in names:
                continue
            key = self.key(kind, namespace, name)
            try:
                if now - self.objects.modified_s(key) >= older_than_s and self.objects.delete(key):
                    removed += 1
            except ObjectNotFoundError:
                continue
            except backend_errors() as exc:
                log.warning("feature store: cannot delete unpublished %s/%s (%s); left for later",
                            self.objects.url, key, exc)
                break
        return removed
