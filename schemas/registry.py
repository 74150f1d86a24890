"""Schema registries: a file store shared by every process on a machine, and a Confluent REST client.

Why a file store and not a compacted Kafka topic (what Confluent does): the embedded broker persists
by rewriting one JSON file shortly after changes, so on ``kill -9`` it can lose the last ~2 s of
*acked* writes. Losing an event is bad; losing a schema is worse, because every record framed with
that schema id becomes undecodable forever. So the registry is an append-only JSON-lines log,
written under an exclusive ``fcntl.flock`` and ``fsync``'d before ``register`` returns. Every
process on the machine opens the same log and re-reads it when it grew, so an id registered by
process A resolves in process B. Ids are global integers from 1 and are never reused or changed;
deleting a subject hides its versions but the ids stay resolvable.

Log records (one JSON object per line):
``{"op": "schema", "id": n, "schema": text}``, ``{"op": "version", "subject": s, "version": v,
"id": n}``, ``{"op": "delete", "subject": s}``, ``{"op": "config", "subject": s|null, "level": L}``,
``{"op": "config_delete", "subject": s}``.

With a URL, :func:`open_registry` returns :class:`HttpRegistryClient`, which speaks the Confluent
Schema Registry REST API (ours in :mod:`schemas.server`, or a real Confluent one).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import catalog, compat
from schemas.base import RegisteredSchema, SchemaRegistry, Version, parse_version, schema_text
from schemas.exceptions import (
    IncompatibleSchemaError,
    RegistryStoreError,
    SchemaNotFoundError,
    SubjectNotFoundError,
    VersionNotFoundError,
)
from schemas.http_client import HttpRegistryClient
from schemas.schema_limits import check_schema, check_subject

LOG_NAME = "schemas.jsonl"
LOCK_NAME = "schemas.lock"


@dataclass
class _State:
    """The registry as replayed from the log."""

    schemas: dict[int, str] = field(default_factory=dict)
    ids_by_key: dict[str, int] = field(default_factory=dict)  # canonical text -> id
    # subject -> version -> id (live versions only); next_version survives deletes
    subjects: dict[str, dict[int, int]] = field(default_factory=dict)
    next_version: dict[str, int] = field(default_factory=dict)
    config: dict[str | None, str] = field(default_factory=dict)

    def apply(self, entry: dict[str, Any]) -> None:
        op = entry["op"]
        if op == "schema":
            self.schemas[entry["id"]] = entry["schema"]
            self.ids_by_key[catalog.canonical_text(entry["schema"])] = entry["id"]
        elif op == "version":
            subject, version = entry["subject"], entry["version"]
            self.subjects.setdefault(subject, {})[version] = entry["id"]
            self.next_version[subject] = max(self.next_version.get(subject, 1), version + 1)
        elif op == "delete":
            self.subjects.pop(entry["subject"], None)
        elif op == "config":
            self.config[entry["subject"]] = entry["level"]
        elif op == "config_delete":
            self.config.pop(entry["subject"], None)


class FileRegistry(SchemaRegistry):
    """The machine-wide registry: an fsync'd, flock-guarded JSON-lines log under ``directory``."""

    def __init__(self, directory: Path | str) -> None:
        super().__init__()
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._log_path = self.directory / LOG_NAME
            self._log_path.touch(exist_ok=True)
            self._lock_path = self.directory / LOCK_NAME
            os.close(os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644))
        except OSError as exc:
            raise RegistryStoreError(
                f"directory: cannot open the schema registry under {self.directory}: {exc}; "
                f"check the path (setting registry_dir) is writable"
            ) from exc
        self._mutex = threading.RLock()
        self._state = _State()
        self._offset = 0

    # -- log plumbing -------------------------------------------------------------------------
    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        """Hold the machine-wide lock. The lock file is opened per operation on purpose: a flock
        belongs to an open file description, which a forked child would share (and so not be
        excluded by) if the descriptor were kept open across ``fork``."""
        with self._mutex:
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise RegistryStoreError(f"cannot open the registry lock {self._lock_path}: {exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                yield
            finally:
                os.close(fd)  # closing the last descriptor releases the flock

    def _catch_up(self, *, repair: bool = False) -> None:
        """Apply log lines appended since the last read (by any process). Caller holds the lock."""
        try:
            size = os.stat(self._log_path).st_size
        except OSError as exc:
            raise RegistryStoreError(f"schema registry log {self._log_path} is gone: {exc}") from exc
        if size < self._offset:
            raise RegistryStoreError(
                f"schema registry log {self._log_path} shrank from {self._offset} to {size} bytes; "
                f"it must only be appended to — restore it from a backup"
            )
        if size == self._offset:
            return
        with open(self._log_path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read(size - self._offset)
        end = data.rfind(b"\n") + 1
        for lineno, line in enumerate(data[:end].splitlines()):
            if not line.strip():
                continue
            try:
                self._state.apply(json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                raise RegistryStoreError(
                    f"schema registry log {self._log_path} has a corrupt entry near byte "
                    f"{self._offset} (+{lineno} lines): {exc}"
                ) from exc
        self._offset += end
        if end < len(data) and repair:
            # A writer died mid-line (it held the exclusive lock we now hold): drop the torn tail.
            os.truncate(self._log_path, self._offset)

    def _append(self, entries: list[dict[str, Any]]) -> None:
        """Append and fsync ``entries``, then apply them. Caller holds the exclusive lock."""
        payload = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in entries)
        try:
            fd = os.open(self._log_path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise RegistryStoreError(f"cannot write the schema registry log {self._log_path}: {exc}") from exc
        self._catch_up()

    def _read(self) -> _State:
        """Fresh state for a read: re-read the log if another process appended."""
        with self._mutex:
            try:
                if os.stat(self._log_path).st_size == self._offset:
                    return self._state
            except OSError:
                pass
            with self._locked(exclusive=False):
                self._catch_up()
            return self._state

    # -- queries ------------------------------------------------------------------------------
    def get_schema(self, schema_id: int) -> str:
        text = self._state.schemas.get(schema_id)
        if text is None:
            text = self._read().schemas.get(schema_id)
        if text is None:
            raise SchemaNotFoundError(f"Schema {schema_id} not found.", error_code=40403)
        return text

    def _subject_versions(self, state: _State, subject: str) -> dict[int, int]:
        versions = state.subjects.get(subject)
        if not versions:
            raise SubjectNotFoundError(subject)
        return versions

    def get_version(self, subject: str, version: Version = "latest") -> RegisteredSchema:
        wanted = parse_version(version)
        with self._mutex:
            state = self._read()
            versions = self._subject_versions(state, subject)
            number = max(versions) if wanted is None else wanted
            if number not in versions:
                raise VersionNotFoundError(subject, version)
            schema_id = versions[number]
            return RegisteredSchema(subject, schema_id, number, state.schemas[schema_id])

    def lookup(self, subject: str, schema: str | dict[str, Any]) -> RegisteredSchema:
        key = catalog.canonical_text(schema)
        with self._mutex:
            state = self._read()
            versions = self._subject_versions(state, subject)
            schema_id = state.ids_by_key.get(key)
            for number in sorted(versions, reverse=True):
                if versions[number] == schema_id:
                    return RegisteredSchema(subject, schema_id, number, state.schemas[schema_id])
        raise SchemaNotFoundError(f"Schema not found under subject '{subject}'.", error_code=40403)

    def subjects(self) -> list[str]:
        with self._mutex:
            return sorted(s for s, v in self._read().subjects.items() if v)

    def versions(self, subject: str) -> list[int]:
        with self._mutex:
            return sorted(self._subject_versions(self._read(), subject))

    def get_config(self, subject: str | None = None, *, default_to_global: bool = True) -> str:
        with self._mutex:
            config = self._read().config
            if subject is not None and subject in config:
                return config[subject]
            if subject is not None and not default_to_global:
                raise SchemaNotFoundError(
                    f"Subject '{subject}' does not have subject-level compatibility configured",
                    error_code=40408,
                )
            return config.get(None, compat.DEFAULT_LEVEL)

    def _previous(self, state: _State, subject: str) -> list[str]:
        versions = state.subjects.get(subject) or {}
        return [state.schemas[versions[v]] for v in sorted(versions)]

    def test_compatibility(
        self, subject: str, schema: str | dict[str, Any], version: Version = "latest"
    ) -> list[str]:
        text = schema_text(schema)
        wanted = parse_version(version)
        with self._mutex:
            state = self._read()
            level = self.get_config(subject)
            if wanted is None:
                previous = self._previous(state, subject)
            else:
                previous = [self.get_version(subject, wanted).schema]
            return compat.check_compatibility(level, text, previous)

    # -- writes -------------------------------------------------------------------------------
    def register(self, subject: str, schema: str | dict[str, Any]) -> int:
        check_subject(subject)
        text = schema_text(schema)
        check_schema(text)  # the REST server checks too; `schemas register` writes the file store directly
        key = catalog.canonical_text(text)
        with self._locked(exclusive=True):
            self._catch_up(repair=True)
            state = self._state
            existing = state.ids_by_key.get(key)
            versions = state.subjects.get(subject) or {}
            if existing is not None and existing in versions.values():
                return existing
            level = state.config.get(subject, state.config.get(None, compat.DEFAULT_LEVEL))
            errors = compat.check_compatibility(level, text, self._previous(state, subject))
            if errors:
                raise IncompatibleSchemaError(subject, level, errors)
            entries: list[dict[str, Any]] = []
            schema_id = existing
            if schema_id is None:
                schema_id = max(state.schemas, default=0) + 1
                entries.append({"op": "schema", "id": schema_id, "schema": text})
            version = state.next_version.get(subject, 1)
            entries.append({"op": "version", "subject": subject, "version": version, "id": schema_id})
            self._append(entries)
            return schema_id

    def set_config(self, level: str, subject: str | None = None) -> str:
        value = compat.normalize_level(level)
        if subject is not None:
            check_subject(subject)
        with self._locked(exclusive=True):
            self._catch_up(repair=True)
            self._append([{"op": "config", "subject": subject, "level": value}])
        return value

    def delete_config(self, subject: str) -> str:
        with self._locked(exclusive=True):
            self._catch_up(repair=True)
            level = self._state.config.get(subject)
            if level is None:
                raise SchemaNotFoundError(
                    f"Subject '{subject}' does not have subject-level compatibility configured",
                    error_code=40408,
                )
            self._append([{"op": "config_delete", "subject": subject}])
        return level

    def delete_subject(self, subject: str) -> list[int]:
        with self._locked(exclusive=True):
            self._catch_up(repair=True)
            versions = sorted(self._subject_versions(self._state, subject))
            self._append([{"op": "delete", "subject": subject}])
        return versions


__all__ = [
    "FileRegistry",
    "HttpRegistryClient",
    "RegisteredSchema",
    "SchemaRegistry",
    "Version",
    "open_registry",
    "parse_version",
    "schema_text",
]


def open_registry(url: str | None, directory: Path | str) -> SchemaRegistry:
    """The registry configuration names: an HTTP client when ``url`` is set, else the file store."""
    if url:
        return HttpRegistryClient(url)
    return FileRegistry(directory)
