"""Client of the Confluent Schema Registry REST API (ours in :mod:`schemas.server` or a real one).

Uses only :mod:`urllib.request` so the bottom layer needs no HTTP library. Schema ids are immutable,
so id -> schema text and (subject, schema) -> id answers are cached for the life of the client;
the hot path (deserializing) never makes a request for an id it has seen.

Connection failures, timeouts and 5xx answers raise :class:`RegistryUnavailableError` (retry with
backoff, never dead-letter); Confluent error bodies map onto the typed errors of
:mod:`schemas.exceptions` by their ``error_code``.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from schemas import catalog
from schemas.base import RegisteredSchema, SchemaRegistry, Version, parse_version, schema_text
from schemas.exceptions import (
    IncompatibleSchemaError,
    InvalidCompatibilityLevelError,
    InvalidSchemaError,
    InvalidVersionError,
    RegistryUnavailableError,
    SchemaError,
    SchemaNotFoundError,
    SubjectNotFoundError,
    VersionNotFoundError,
)

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


def _quote(subject: str) -> str:
    return urllib.parse.quote(subject, safe="")


class HttpRegistryClient(SchemaRegistry):
    """A :class:`SchemaRegistry` over HTTP; ``url`` is the registry root, e.g. http://host:8081."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        super().__init__()
        if not url.startswith(("http://", "https://")):
            raise RegistryUnavailableError(
                f"url: {url.rsplit('@', 1)[-1]!r} is not an http(s) URL; set registry_url (STREAMLEARN_REGISTRY_URL) "
                f"to e.g. http://localhost:8081, or leave it unset to use the file store"
            )
        # A key rides in the URL's userinfo (http://name:token@host:8081, what Confluent clients
        # accept too); it is taken out of ``url`` so no message or repr can show it.
        parts = urllib.parse.urlsplit(url)
        self._authorization: str | None = None
        if parts.username is not None or parts.password is not None:
            userinfo = f"{urllib.parse.unquote(parts.username or '')}:{urllib.parse.unquote(parts.password or '')}"
            self._authorization = "Basic " + base64.b64encode(userinfo.encode("utf-8")).decode("ascii")
            netloc = parts.hostname or ""
            if ":" in netloc:
                netloc = f"[{netloc}]"
            if parts.port is not None:
                netloc += f":{parts.port}"
            url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._schemas: dict[int, str] = {}
        self._ids: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    # -- transport ----------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Accept", f"{CONTENT_TYPE}, application/json")
        if self._authorization is not None:
            req.add_header("Authorization", self._authorization)
        if data is not None:
            req.add_header("Content-Type", CONTENT_TYPE)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            self._raise_for(exc, path)
        except (TimeoutError, urllib.error.URLError, OSError) as exc:
            raise RegistryUnavailableError(
                f"schema registry at {self.url} is unreachable ({method} {path}): {exc}; "
                f"retry later or check registry_url"
            ) from exc
        try:
            return json.loads(raw) if raw else None
        except ValueError as exc:
            raise RegistryUnavailableError(
                f"schema registry at {self.url} answered {method} {path} with non-JSON: {raw[:100]!r}"
            ) from exc

    def _raise_for(self, exc: urllib.error.HTTPError, path: str) -> Any:
        try:
            payload = json.loads(exc.read() or b"{}")
        except ValueError:
            payload = {}
        code = payload.get("error_code", exc.code) if isinstance(payload, dict) else exc.code
        message = payload.get("message", str(exc)) if isinstance(payload, dict) else str(exc)
        if exc.code in (401, 403):
            # A key problem is the deployment's, not the record's: callers retry (never dead-letter)
            # and log this until the key is fixed.
            raise RegistryUnavailableError(
                f"schema registry at {self.url} refused this client's key on {path} ({exc.code}): {message}; "
                "put a key with the needed scope in STREAMLEARN_REGISTRY_URL (http://name:token@host:port)"
            ) from exc
        if exc.code >= 500:
            raise RegistryUnavailableError(
                f"schema registry at {self.url} failed on {path} ({code}): {message}; retry later"
            ) from exc
        if code == 40401:
            subject = message.split("'")[1] if message.count("'") >= 2 else path
            raise SubjectNotFoundError(subject) from exc
        if code == 40402:
            err = SchemaNotFoundError(message, error_code=40402)
            raise err from exc
        if code in (40403, 40408) or exc.code == 404:
            raise SchemaNotFoundError(message, error_code=int(code)) from exc
        if code == 409 or exc.code == 409:
            parts = path.split("/")
            subject = urllib.parse.unquote(parts[2]) if len(parts) > 2 else path
            raise IncompatibleSchemaError(subject, "registry", [message]) from exc
        if code == 42201 or code == 422 and "schema" in message.lower():
            raise InvalidSchemaError(message) from exc
        if code == 42202:
            raise InvalidVersionError(message) from exc
        if code == 42203:
            raise InvalidCompatibilityLevelError(message) from exc
        raise SchemaError(f"schema registry at {self.url} refused {path} ({code}): {message}") from exc

    # -- SchemaRegistry -----------------------------------------------------------------------
    def register(self, subject: str, schema: str | dict[str, Any]) -> int:
        text = schema_text(schema)
        key = (subject, catalog.canonical_text(text))
        cached = self._ids.get(key)
        if cached is not None:
            return cached
        answer = self._request("POST", f"/subjects/{_quote(subject)}/versions", {"schema": text})
        schema_id = int(answer["id"])
        with self._lock:
            self._ids[key] = schema_id
            self._schemas.setdefault(schema_id, text)
        return schema_id

    def get_schema(self, schema_id: int) -> str:
        text = self._schemas.get(schema_id)
        if text is None:
            text = str(self._request("GET", f"/schemas/ids/{int(schema_id)}")["schema"])
            with self._lock:
                self._schemas[schema_id] = text
        return text

    def _registered(self, subject: str, answer: dict[str, Any]) -> RegisteredSchema:
        result = RegisteredSchema(
            str(answer.get("subject", subject)),
            int(answer["id"]),
            int(answer["version"]),
            str(answer["schema"]),
        )
        with self._lock:
            self._schemas.setdefault(result.id, result.schema)
        return result

    def lookup(self, subject: str, schema: str | dict[str, Any]) -> RegisteredSchema:
        answer = self._request("POST", f"/subjects/{_quote(subject)}", {"schema": schema_text(schema)})
        return self._registered(subject, answer)

    def get_version(self, subject: str, version: Version = "latest") -> RegisteredSchema:
        number = parse_version(version)
        label = "latest" if number is None else str(number)
        try:
            answer = self._request("GET", f"/subjects/{_quote(subject)}/versions/{label}")
        except SchemaNotFoundError as exc:
            if exc.error_code == 40402:
                raise VersionNotFoundError(subject, version) from exc
            raise
        return self._registered(subject, answer)

    def subjects(self) -> list[str]:
        return sorted(str(s) for s in self._request("GET", "/subjects"))

    def versions(self, subject: str) -> list[int]:
        return sorted(int(v) for v in self._request("GET", f"/subjects/{_quote(subject)}/versions"))

    def test_compatibility(
        self, subject: str, schema: str | dict[str, Any], version: Version = "latest"
    ) -> list[str]:
        number = parse_version(version)
        label = "latest" if number is None else str(number)
        try:
            answer = self._request(
                "POST",
                f"/compatibility/subjects/{_quote(subject)}/versions/{label}?verbose=true",
                {"schema": schema_text(schema)},
            )
        except SchemaNotFoundError as exc:
            if exc.error_code == 40401:  # nothing registered yet: anything is compatible
                return []
            raise
        if answer.get("is_compatible"):
            return []
        return [str(m) for m in answer.get("messages") or ["incompatible (registry gave no reason)"]]

    def get_config(self, subject: str | None = None, *, default_to_global: bool = True) -> str:
        if subject is None:
            path = "/config"
        else:
            path = f"/config/{_quote(subject)}" + ("?defaultToGlobal=true" if default_to_global else "")
        try:
            answer = self._request("GET", path)
        except SchemaNotFoundError:
            if subject is None or not default_to_global:
                raise
            answer = self._request("GET", "/config")
        return str(answer.get("compatibilityLevel") or answer.get("compatibility"))

    def set_config(self, level: str, subject: str | None = None) -> str:
        path = "/config" if subject is None else f"/config/{_quote(subject)}"
        answer = self._request("PUT", path, {"compatibility": str(level).upper()})
        return str(answer.get("compatibility") or answer.get("compatibilityLevel"))

    def delete_config(self, subject: str) -> str:
        answer = self._request("DELETE", f"/config/{_quote(subject)}")
        return str(answer.get("compatibilityLevel") or answer.get("compatibility"))

    def delete_subject(self, subject: str) -> list[int]:
        answer = self._request("DELETE", f"/subjects/{_quote(subject)}")
        with self._lock:
            for key in [k for k in self._ids if k[0] == subject]:
                del self._ids[key]
        return sorted(int(v) for v in answer)
