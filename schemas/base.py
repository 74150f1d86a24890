"""The registry interface shared by the file store and the HTTP client, and its small helpers.

Kept apart from :mod:`schemas.registry` so the HTTP client and the file store can both derive from
:class:`SchemaRegistry` without importing each other.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass
from typing import Any

from schemas import catalog
from schemas.exceptions import InvalidVersionError

Version = int | str

@dataclass(frozen=True)
class RegisteredSchema:
    """One version of a subject: what ``lookup``/``latest``/``get_version`` return."""

    subject: str
    id: int
    version: int
    schema: str


def schema_text(schema: str | dict[str, Any] | list[Any]) -> str:
    """Compact JSON text of a schema as stored (key order kept); validates it as Avro first."""
    value = catalog.schema_to_dict(schema)
    catalog.parse(value)  # raises InvalidSchemaError
    return json.dumps(value, separators=(",", ":"))


def parse_version(version: Version) -> int | None:
    """``"latest"`` or ``-1`` -> None; a positive int (or its text) -> int; else InvalidVersionError."""
    given = version  # quoted as the caller sent it ("abc" was reported as "0 is not a version")
    if isinstance(version, str):
        if version.strip().lower() == "latest":
            return None
        try:
            version = int(version)
        except ValueError:
            version = 0
    if isinstance(version, bool) or not isinstance(version, int):
        version = 0
    if version == -1:
        return None
    if version < 1 or version > 2**31 - 1:
        raise InvalidVersionError(
            f"version: {str(given)[:40]!r} is not a version; pass a positive integer or 'latest'"
        )
    return version


class SchemaRegistry(abc.ABC):
    """What serializers, deserializers, the REST server and the CLI need from a registry."""

    def __init__(self) -> None:
        self._parsed: dict[int, Any] = {}

    @abc.abstractmethod
    def register(self, subject: str, schema: str | dict[str, Any]) -> int:
        """Register ``schema`` under ``subject`` and return its global id.

        Idempotent: a schema already registered under the subject returns its id unchanged.
        Otherwise it must pass the subject's compatibility level (IncompatibleSchemaError).
        """

    @abc.abstractmethod
    def get_schema(self, schema_id: int) -> str:
        """Schema text of ``schema_id``; SchemaNotFoundError (40403) if unknown."""

    @abc.abstractmethod
    def lookup(self, subject: str, schema: str | dict[str, Any]) -> RegisteredSchema:
        """The version of ``subject`` holding ``schema``; SchemaNotFoundError if not registered there."""

    @abc.abstractmethod
    def get_version(self, subject: str, version: Version = "latest") -> RegisteredSchema:
        """One version of a subject (``"latest"`` or ``-1`` for the newest)."""

    @abc.abstractmethod
    def subjects(self) -> list[str]:
        """Subjects with at least one live version, sorted."""

    @abc.abstractmethod
    def versions(self, subject: str) -> list[int]:
        """Live versions of ``subject``, ascending; SubjectNotFoundError if none."""

    @abc.abstractmethod
    def test_compatibility(
        self, subject: str, schema: str | dict[str, Any], version: Version = "latest"
    ) -> list[str]:
        """Reasons ``schema`` breaks the subject's level against ``version`` (empty = compatible)."""

    @abc.abstractmethod
    def get_config(self, subject: str | None = None, *, default_to_global: bool = True) -> str:
        """Compatibility level of ``subject`` (falling back to the global one), or the global one."""

    @abc.abstractmethod
    def set_config(self, level: str, subject: str | None = None) -> str:
        """Set the compatibility level of ``subject`` or the global one; returns the level set."""

    @abc.abstractmethod
    def delete_config(self, subject: str) -> str:
        """Drop the subject-level compatibility so the global one applies; returns the level dropped."""

    @abc.abstractmethod
    def delete_subject(self, subject: str) -> list[int]:
        """Hide every version of ``subject`` (ids stay resolvable); returns the versions deleted."""

    def latest(self, subject: str) -> RegisteredSchema:
        """The newest live version of ``subject``."""
        return self.get_version(subject, "latest")

    def get_parsed(self, schema_id: int) -> Any:
        """fastavro parsed (logical types stripped) schema of ``schema_id``; cached, ids never change."""
        parsed = self._parsed.get(schema_id)
        if parsed is None:
            parsed = catalog.parse(self.get_schema(schema_id))
            self._parsed[schema_id] = parsed
        return parsed

    def close(self) -> None:
        """Release files or connections; the default has none."""
        return None
