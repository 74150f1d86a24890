"""The Confluent Schema Registry REST subset that standard clients use, over any SchemaRegistry.

Why serve it at all when the file store is shared by every local process: tools outside Python
(kcat, Kafka Connect, ksqlDB, Confluent's own serializers) and processes on other machines speak
this API, and our :class:`~schemas.http_client.HttpRegistryClient` can then be pointed at either
this server or a real Confluent registry with no code change.

Requests and answers use ``application/vnd.schemaregistry.v1+json`` (plain JSON is accepted too).
Errors are Confluent bodies ``{"error_code": 40401, "message": "Subject 'x' not found."}``:
40401 subject, 40402 version, 40403 schema not found, 40408 no subject-level config, 42201 invalid
schema, 42202 invalid version, 42203 invalid compatibility level, 42208 invalid subject name, 409
incompatible, 500xx store, and 401/403 (``error_code`` = the status) for keys, 413 for a body over the limit.

Access (docs/SECURITY.md): with keys configured (``STREAMLEARN_KEYS`` / ``STREAMLEARN_KEYS_FILE``),
writes need the ``schema-admin`` scope; reads are open (``registry_read_open``, the default) or need
``schema-read``. A tenant's key sees and changes only the subjects under ``<topic_prefix><tenant>.``;
the global config is the default tenant's. Keys arrive as ``Bearer <token>`` or as Basic
``name:token`` (what Confluent clients send for ``basic.auth.user.info``). Without keys the server
is open and binds loopback only. Schemas are checked against size, depth, node-count and Avro
naming limits (:mod:`schemas.schema_limits`) before they are parsed.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.access import ANONYMOUS, KeyTable, Principal
from schemas.base import SchemaRegistry, parse_version
from schemas.exceptions import (
    AccessError,
    IncompatibleSchemaError,
    InvalidCompatibilityLevelError,
    InvalidSchemaError,
    InvalidSubjectError,
    InvalidVersionError,
    SchemaNotFoundError,
    StreamlearnError,
    SubjectNotFoundError,
)
from schemas.httpguard import BodyLimitMiddleware, ByteBudget, GuardError, check_json_shape
from schemas.schema_limits import SchemaLimits, check_schema

log = logging.getLogger(__name__)
CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class RegistryResponse(JSONResponse):
    media_type = CONTENT_TYPE


def _error(status: int, code: int, message: str) -> RegistryResponse:
    return RegistryResponse({"error_code": code, "message": message}, status_code=status)


def _status_of(exc: Exception) -> tuple[int, int]:
    """(HTTP status, Confluent error_code) for an error raised by the registry."""
    if isinstance(exc, SchemaNotFoundError):
        return 404, exc.error_code
    if isinstance(exc, IncompatibleSchemaError):
        return 409, 409
    if isinstance(exc, InvalidSchemaError):
        return 422, 42201
    if isinstance(exc, InvalidVersionError):
        return 422, 42202
    if isinstance(exc, InvalidSubjectError):
        return 422, 42208
    if isinstance(exc, InvalidCompatibilityLevelError):
        return 422, 42203
    return 500, 50001


class BadRequest(Exception):
    """The request body is not the JSON object the endpoint needs."""


async def _body(request: Request, key: str | None = None) -> Any:
    raw = await request.body()
    limits: SchemaLimits = request.app.state.schema_limits
    check_json_shape(raw, max_depth=limits.max_depth + 2, max_containers=limits.max_nodes)
    try:
        payload = json.loads(raw or b"{}")
    except ValueError as exc:
        raise BadRequest(f"request body is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    if key is not None and key not in payload:
        raise InvalidSchemaError(f"request body: missing '{key}'") if key == "schema" else BadRequest(
            f"request body: missing '{key}'"
        )
    return payload


async def _schema_of(request: Request) -> str:
    payload = await _body(request, "schema")
    schema_type = payload.get("schemaType", "AVRO")
    if str(schema_type).upper() != "AVRO":
        raise InvalidSchemaError(f"schemaType: only AVRO is supported here (got {schema_type!r})")
    if payload.get("references"):
        raise InvalidSchemaError("references: schema references are not supported; inline the types")
    schema = payload["schema"]
    if not isinstance(schema, str):
        schema = json.dumps(schema)
    check_schema(schema, request.app.state.schema_limits)
    return schema


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StreamlearnError)
    async def _registry_error(request: Request, exc: StreamlearnError) -> RegistryResponse:
        status, code = _status_of(exc)
        if status >= 500:  # a store failure: the text may name files; the log has it
            log.error("schema registry: %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
            return _error(status, code, "schema registry store error; see the server log")
        return _error(status, code, str(exc))

    @app.exception_handler(AccessError)
    async def _access(request: Request, exc: AccessError) -> RegistryResponse:
        response = _error(exc.status, exc.status, exc.message)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Basic realm="streamlearn-registry"'
        return response

    @app.exception_handler(GuardError)
    async def _guard(request: Request, exc: GuardError) -> RegistryResponse:
        code = 42201 if exc.status == 400 and "schema" in exc.message else exc.status
        return _error(exc.status, code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> RegistryResponse:
        return _error(exc.status_code, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> RegistryResponse:
        return _error(422, 42200, "a path or query parameter has the wrong type (ids are integers)")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> RegistryResponse:
        log.error("schema registry: unexpected %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
        return _error(500, 50001, "schema registry internal error; see the server log")


def _json_body(properties: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` of a route that reads its body itself (for the OpenAPI the fuzz test uses)."""
    schema = {"type": "object", "properties": properties}
    return {"requestBody": {"required": True, "content": {CONTENT_TYPE: {"schema": schema},
                                                         "application/json": {"schema": schema}}}}


_SCHEMA_BODY = _json_body({"schema": {"type": "string"}, "schemaType": {"type": "string"},
                           "references": {"type": "array"}})
_LEVEL_BODY = _json_body({"compatibility": {"type": "string"}})


def create_app(registry: SchemaRegistry, *, keys: KeyTable | None = None, read_open: bool = True,
               topic_prefix: str = "", limits: SchemaLimits | None = None) -> FastAPI:
    """The ASGI app serving ``registry``; handlers are sync so blocking file I/O runs in a thread pool.

    ``keys`` empty or None: open (the caller binds loopback only). ``topic_prefix`` is stripped from
    a subject before its tenant is read (``<prefix><tenant>.<topic>-value``).
    """
    keys = keys if keys is not None else KeyTable()
    limits = limits or SchemaLimits()
    app = FastAPI(title="streamlearn schema registry", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.schema_limits = limits
    _install_error_handlers(app)

    def who(request: Request, scope: str) -> Principal:
        if not keys or (scope == "schema-read" and read_open):
            return ANONYMOUS
        principal = keys.authenticate(request.headers.get("authorization"), allow_basic=True)
        keys.require(principal, scope)
        return principal

    def local(subject: str) -> str:
        return subject[len(topic_prefix):] if topic_prefix and subject.startswith(topic_prefix) else subject

    def visible(principal: Principal, subject: str) -> bool:
        return principal is ANONYMOUS or keys.owns(principal, local(subject))

    def check(request: Request, scope: str, subject: str | None = None) -> Principal:
        """The caller's principal, after its scope and (for a subject) its tenant were checked."""
        principal = who(request, scope)
        if subject is not None and principal is not ANONYMOUS:
            keys.require(principal, scope, local(subject))
        return principal

    def admin_global(request: Request) -> None:
        principal = who(request, "schema-admin")
        if principal.tenant:
            raise AccessError(f"key {principal.name!r} belongs to tenant {principal.tenant!r}; the global "
                              "config is the operator's (use /config/{subject} for your subjects)")

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> RegistryResponse:
        return _error(400, 400, str(exc))

    @app.get("/")
    def root() -> RegistryResponse:
        return RegistryResponse({})

    @app.get("/schemas/types")
    def schema_types() -> RegistryResponse:
        return RegistryResponse(["AVRO"])

    def uses(schema_id: int, principal: Principal) -> list[dict[str, Any]]:
        out = []
        for subject in registry.subjects():
            if not visible(principal, subject):
                continue
            for version in registry.versions(subject):
                if registry.get_version(subject, version).id == schema_id:
                    out.append({"subject": subject, "version": version})
        return out

    @app.get("/schemas/ids/{schema_id}")
    def get_schema(schema_id: int, request: Request) -> RegistryResponse:
        principal = check(request, "schema-read")
        text = registry.get_schema(schema_id)
        if principal.tenant and not uses(schema_id, principal):
            raise SchemaNotFoundError(f"Schema {schema_id} not found.", error_code=40403)
        return RegistryResponse({"schema": text})

    @app.get("/schemas/ids/{schema_id}/versions")
    def schema_versions(schema_id: int, request: Request) -> RegistryResponse:
        principal = check(request, "schema-read")
        registry.get_schema(schema_id)  # 40403 when unknown
        return RegistryResponse(uses(schema_id, principal))

    @app.get("/subjects")
    def subjects(request: Request) -> RegistryResponse:
        principal = check(request, "schema-read")
        return RegistryResponse([s for s in registry.subjects() if visible(principal, s)])

    @app.get("/subjects/{subject}/versions")
    def versions(subject: str, request: Request) -> RegistryResponse:
        check(request, "schema-read", subject)
        return RegistryResponse(registry.versions(subject))

    def _version(subject: str, version: str) -> dict[str, Any]:
        found = registry.get_version(subject, version)
        return {"subject": found.subject, "version": found.version, "id": found.id, "schema": found.schema}

    @app.get("/subjects/{subject}/versions/{version}")
    def get_version(subject: str, version: str, request: Request) -> RegistryResponse:
        check(request, "schema-read", subject)
        return RegistryResponse(_version(subject, version))

    @app.get("/subjects/{subject}/versions/{version}/schema")
    def get_version_schema(subject: str, version: str, request: Request) -> RegistryResponse:
        check(request, "schema-read", subject)
        return RegistryResponse(json.loads(_version(subject, version)["schema"]))

    @app.post("/subjects/{subject}/versions", openapi_extra=_SCHEMA_BODY)
    async def register(subject: str, request: Request) -> RegistryResponse:
        check(request, "schema-admin", subject)
        schema = await _schema_of(request)
        # the compatibility check and the file lock run in a worker thread: on the event loop, one slow
        # check stopped every other request of the server (GET /subjects timed out meanwhile)
        schema_id = await run_in_threadpool(registry.register, subject, schema)
        return RegistryResponse({"id": schema_id})

    @app.post("/subjects/{subject}", openapi_extra=_SCHEMA_BODY)
    async def lookup(subject: str, request: Request) -> RegistryResponse:
        check(request, "schema-read", subject)
        schema = await _schema_of(request)
        found = await run_in_threadpool(registry.lookup, subject, schema)
        return RegistryResponse(
            {"subject": found.subject, "id": found.id, "version": found.version, "schema": found.schema}
        )

    @app.delete("/subjects/{subject}")
    def delete_subject(subject: str, request: Request) -> RegistryResponse:
        check(request, "schema-admin", subject)
        return RegistryResponse(registry.delete_subject(subject))

    async def _compat(subject: str, version: str, request: Request) -> RegistryResponse:
        check(request, "schema-read", subject)
        schema = await _schema_of(request)
        wanted = parse_version(version)
        try:
            messages = await run_in_threadpool(registry.test_compatibility, subject, schema, version)
        except SubjectNotFoundError:
            if wanted is not None:
                raise
            messages = []  # nothing registered yet: anything is compatible
        answer: dict[str, Any] = {"is_compatible": not messages}
        if request.query_params.get("verbose", "").lower() == "true":
            answer["messages"] = messages
        return RegistryResponse(answer)

    @app.post("/compatibility/subjects/{subject}/versions/{version}", openapi_extra=_SCHEMA_BODY)
    async def compatibility(subject: str, version: str, request: Request) -> RegistryResponse:
        return await _compat(subject, version, request)

    @app.post("/compatibility/subjects/{subject}/versions", openapi_extra=_SCHEMA_BODY)
    async def compatibility_all(subject: str, request: Request) -> RegistryResponse:
        return await _compat(subject, "latest", request)

    @app.get("/config")
    def get_global_config(request: Request) -> RegistryResponse:
        check(request, "schema-read")
        return RegistryResponse({"compatibilityLevel": registry.get_config()})

    async def _level(request: Request) -> str:
        payload = await _body(request)
        level = payload.get("compatibility", payload.get("compatibilityLevel"))
        if not isinstance(level, str):
            raise InvalidCompatibilityLevelError("request body: set 'compatibility' to e.g. \"BACKWARD\"")
        return level

    @app.put("/config", openapi_extra=_LEVEL_BODY)
    async def put_global_config(request: Request) -> RegistryResponse:
        admin_global(request)
        return RegistryResponse({"compatibility": registry.set_config(await _level(request))})

    @app.get("/config/{subject}")
    def get_subject_config(subject: str, request: Request, defaultToGlobal: bool = False) -> RegistryResponse:
        check(request, "schema-read", subject)
        level = registry.get_config(subject, default_to_global=defaultToGlobal)
        return RegistryResponse({"compatibilityLevel": level})

    @app.put("/config/{subject}", openapi_extra=_LEVEL_BODY)
    async def put_subject_config(subject: str, request: Request) -> RegistryResponse:
        check(request, "schema-admin", subject)
        return RegistryResponse({"compatibility": registry.set_config(await _level(request), subject)})

    @app.delete("/config/{subject}")
    def delete_subject_config(subject: str, request: Request) -> RegistryResponse:
        check(request, "schema-admin", subject)
        return RegistryResponse({"compatibilityLevel": registry.delete_config(subject)})

    app.add_middleware(BodyLimitMiddleware, max_body_bytes=2 * limits.max_bytes + 4096, what="schema registry",
                       budget=ByteBudget(64 * (2 * limits.max_bytes + 4096)),
                       error_body=lambda status, message: {"error_code": status, "message": message})
    return app


def serve(registry: SchemaRegistry, host: str = "127.0.0.1", port: int = 8081, *, keys: KeyTable | None = None,
          read_open: bool = True, topic_prefix: str = "") -> None:
    """Serve ``registry`` until interrupted (``streamlearn registry serve``).

    Without a key the server binds 127.0.0.1 whatever ``host`` says, and logs so.
    """
    import uvicorn

    from schemas.access import bind_host
    from schemas.httpguard import server_config

    keys = keys if keys is not None else KeyTable()
    host, warning = bind_host(host, keys, "schema registry", "--host / STREAMLEARN_REGISTRY_HOST")
    if warning:
        log.warning(warning)
    app = create_app(registry, keys=keys, read_open=read_open, topic_prefix=topic_prefix)
    uvicorn.Server(server_config(app, host=host, port=port)).run()


@dataclass
class RunningServer:
    """A server started by :func:`start_in_thread`; ``url`` is what clients use."""

    url: str
    server: Any
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(
    registry: SchemaRegistry, host: str = "127.0.0.1", port: int = 0, timeout: float = 15.0, *,
    keys: KeyTable | None = None, read_open: bool = True, topic_prefix: str = "",
) -> RunningServer:
    """Run the server in a daemon thread (tests, the demo stack); returns once it accepts requests.

    ``port=0`` lets the OS pick a free port, read back from the bound socket (no race).
    """
    from schemas.httpguard import ThreadedServer

    app = create_app(registry, keys=keys, read_open=read_open, topic_prefix=topic_prefix)
    threaded = ThreadedServer(app, host=host, port=port, name="schema-registry", lifespan="off")
    if not threaded.start(timeout):
        raise StreamlearnError(
            f"port: the schema registry server did not start on {host}:{threaded.port} within {timeout}s"
        )
    return RunningServer(threaded.url, threaded.server, threaded.thread)
