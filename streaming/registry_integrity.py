"""Integrity of model-registry versions: file digests, the metadata digest and ``verify``.

Why a module of its own: :mod:`streaming.model_registry` is about the registry's layout and its
locked read-modify-writes of ``state.json``; checking that a version on disk is exactly what was
published (sha256 manifest, no extra files, metadata digest recorded at creation) is a separate,
self-contained concern that both the local and the object-storage registry
(:mod:`streaming.registry_remote`) share. ``ModelRegistry`` mixes :class:`RegistryIntegrityMixin`
in, and the helpers are re-exported from :mod:`streaming.model_registry`, their historical home.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streaming.clock import now_ms
from streaming.exceptions import ModelIntegrityError
from streaming.fsutil import fsync_dir

METADATA_FILE = "metadata.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed so large variable shards do not load into memory."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below ``root`` (children first, then the parents)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for fname in filenames:
            fd = os.open(os.path.join(dirpath, fname), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def metadata_digest(meta: dict[str, Any]) -> str:
    """sha256 of a version's metadata (without the digest field itself), canonical JSON.

    ``metadata.json`` cannot list its own hash in the manifest, so it carries this digest, and the
    model's ``state.json`` records it again when the version is created: an edit of the lineage,
    featurizer or scores after publishing fails :meth:`ModelRegistry.verify`.
    """
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def version_metadata(metadata: dict[str, Any], name: str, version: int, manifest: dict[str, str]) -> dict[str, Any]:
    """The ``metadata.json`` of a new version: the caller's fields plus its name, number, creation time,
    file manifest (relative path -> sha256) and, last, the digest over all of it."""
    meta = dict(metadata)
    meta["name"] = name
    meta["version"] = version
    meta.setdefault("created_at", now_ms())
    meta["manifest"] = manifest
    meta["metadata_sha256"] = metadata_digest(meta)
    return meta


class RegistryIntegrityMixin:
    """``verify`` for :class:`streaming.model_registry.ModelRegistry` (uses its ``version_dir``,
    ``metadata`` and ``state``, which the object-storage registry overrides)."""

    if TYPE_CHECKING:
        def version_dir(self, name: str, version: int) -> Path: ...
        def metadata(self, name: str, version: int) -> dict[str, Any]: ...
        def state(self, name: str) -> dict[str, Any]: ...

    def verify(self, name: str, version: int) -> dict[str, Any]:
        """Check a version completely; returns its metadata or raises ModelIntegrityError.

        Checks: ``saved_model.pb`` and ``variables/`` (with an index) exist; every file in the
        manifest exists with the recorded sha256; no file exists that the manifest lacks
        (e.g. a swapped-in shard); ``metadata.json`` names this version.
        """
        vdir = self.version_dir(name, version)
        meta = self.metadata(name, version)
        problems: list[str] = []
        if not (vdir / "saved_model.pb").is_file():
            problems.append("saved_model.pb is missing")
        if not (vdir / "variables").is_dir():
            problems.append("variables/ is missing")
        elif not (vdir / "variables" / "variables.index").is_file():
            problems.append("variables/variables.index is missing")
        if meta.get("version") != int(version):
            problems.append(f"metadata.json says version {meta.get('version')!r}")
        manifest = meta.get("manifest")
        if not isinstance(manifest, dict) or not manifest:
            problems.append("metadata.json has no manifest")
            manifest = {}
        present = {p.relative_to(vdir).as_posix() for p in vdir.rglob("*") if p.is_file()}
        present.discard(METADATA_FILE)
        for rel in sorted(set(manifest) - present):
            problems.append(f"{rel} is missing")
        for rel in sorted(present - set(manifest)):
            problems.append(f"{rel} is not in the manifest")
        for rel in sorted(set(manifest) & present):
            if sha256_file(vdir / rel) != manifest[rel]:
                problems.append(f"{rel} sha256 mismatch")
        problems += self._metadata_problems(name, int(version), meta)
        if problems:
            raise ModelIntegrityError(
                f"version: {name}/{version} at {vdir} failed verification: " + "; ".join(problems)
                + f". Do not serve it; restore the directory from a backup, or, if it is the promoted version, "
                f"`streamlearn models rollback {name}` to promote the previous one (deleting a promoted "
                "version's directory leaves the model with no promoted version)"
            )
        return meta

    def _metadata_problems(self, name: str, version: int, meta: dict[str, Any]) -> list[str]:
        """metadata.json against its own digest and the digest state.json recorded at creation.

        Versions published before digests existed have neither and pass (nothing to compare).
        """
        digest = metadata_digest(meta)
        problems = []
        if "metadata_sha256" in meta and meta["metadata_sha256"] != digest:
            problems.append("metadata.json sha256 mismatch (edited after publishing)")
        created = [h for h in self.state(name)["history"]
                   if h.get("action") == "CREATED" and h.get("version") == version and h.get("metadata_sha256")]
        if created and created[-1]["metadata_sha256"] != digest:
            problems.append("metadata.json differs from the digest recorded in state.json at creation")
        return problems
