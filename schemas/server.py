"""The Confluent Schema Registry REST subset that standard clients use, over any SchemaRegistry.

Why serve it at all when the file store is shared by every local process: tools outside Python
(kcat, Kafka Connect, ksqlDB, Confluent's own serializers) and processes on other machines speak
this API, and our :class:`~schemas.http_client.HttpRegistryClient` can then be pointed at either
this server or a real Confluent registry with no code change.

Requests and answers use ``application/vnd.schemaregistry.v1+json`` (plain JSON is accepted too).
Errors are Confluent bodies ``{"error_code": 40401, "message": "Subject 'x' not found."}``:
40401 subject, 40402 version, 40403 schema not found, 40408 no subject-level config, 42201 invalid
schema, 42202 invalid version, 42203 invalid compatibility level, 409 incompatible, 500xx store.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from schemas.base import SchemaRegistry, parse_version
from schemas.exceptions import (
    IncompatibleSchemaError,
    InvalidCompatibilityLevelError,
    InvalidSchemaError,
    InvalidVersionError,
    SchemaNotFoundError,
    StreamlearnError,
    SubjectNotFoundError,
)

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
    if isinstance(exc, InvalidCompatibilityLevelError):
        return 422, 42203
    return 500, 50001


class BadRequest(Exception):
    """The request body is not the JSON object the endpoint needs."""


async def _body(request: Request, key: str | None = None) -> Any:
    raw = await request.body()
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
    return schema


def create_app(registry: SchemaRegistry) -> FastAPI:
    """The ASGI app serving ``registry``; handlers are sync so blocking file I/O runs in a thread pool."""
    app = FastAPI(title="streamlearn schema registry", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StreamlearnError)
    async def _registry_error(request: Request, exc: StreamlearnError) -> RegistryResponse:
        status, code = _status_of(exc)
        return _error(status, code, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> RegistryResponse:
        return _error(500, 50001, f"schema registry internal error: {type(exc).__name__}: {exc}")

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> RegistryResponse:
        return _error(400, 400, str(exc))

    @app.get("/")
    def root() -> RegistryResponse:
        return RegistryResponse({})

    @app.get("/schemas/types")
    def schema_types() -> RegistryResponse:
        return RegistryResponse(["AVRO"])

    @app.get("/schemas/ids/{schema_id}")
    def get_schema(schema_id: int) -> RegistryResponse:
        return RegistryResponse({"schema": registry.get_schema(schema_id)})

    @app.get("/schemas/ids/{schema_id}/versions")
    def schema_versions(schema_id: int) -> RegistryResponse:
        registry.get_schema(schema_id)  # 40403 when unknown
        out = []
        for subject in registry.subjects():
            for version in registry.versions(subject):
                if registry.get_version(subject, version).id == schema_id:
                    out.append({"subject": subject, "version": version})
        return RegistryResponse(out)

    @app.get("/subjects")
    def subjects() -> RegistryResponse:
        return RegistryResponse(registry.subjects())

    @app.get("/subjects/{subject}/versions")
    def versions(subject: str) -> RegistryResponse:
        return RegistryResponse(registry.versions(subject))

    def _version(subject: str, version: str) -> dict[str, Any]:
        found = registry.get_version(subject, version)
        return {"subject": found.subject, "version": found.version, "id": found.id, "schema": found.schema}

    @app.get("/subjects/{subject}/versions/{version}")
    def get_version(subject: str, version: str) -> RegistryResponse:
        return RegistryResponse(_version(subject, version))

    @app.get("/subjects/{subject}/versions/{version}/schema")
    def get_version_schema(subject: str, version: str) -> RegistryResponse:
        return RegistryResponse(json.loads(_version(subject, version)["schema"]))

    @app.post("/subjects/{subject}/versions")
    async def register(subject: str, request: Request) -> RegistryResponse:
        schema = await _schema_of(request)
        return RegistryResponse({"id": registry.register(subject, schema)})

    @app.post("/subjects/{subject}")
    async def lookup(subject: str, request: Request) -> RegistryResponse:
        schema = await _schema_of(request)
        found = registry.lookup(subject, schema)
        return RegistryResponse(
            {"subject": found.subject, "id": found.id, "version": found.version, "schema": found.schema}
        )

    @app.delete("/subjects/{subject}")
    def delete_subject(subject: str) -> RegistryResponse:
        return RegistryResponse(registry.delete_subject(subject))

    async def _compat(subject: str, version: str, request: Request) -> RegistryResponse:
        schema = await _schema_of(request)
        wanted = parse_version(version)
        try:
            messages = registry.test_compatibility(subject, schema, version)
        except SubjectNotFoundError:
            if wanted is not None:
                raise
            messages = []  # nothing registered yet: anything is compatible
        answer: dict[str, Any] = {"is_compatible": not messages}
        if request.query_params.get("verbose", "").lower() == "true":
            answer["messages"] = messages
        return RegistryResponse(answer)

    @app.post("/compatibility/subjects/{subject}/versions/{version}")
    async def compatibility(subject: str, version: str, request: Request) -> RegistryResponse:
        return await _compat(subject, version, request)

    @app.post("/compatibility/subjects/{subject}/versions")
    async def compatibility_all(subject: str, request: Request) -> RegistryResponse:
        return await _compat(subject, "latest", request)

    @app.get("/config")
    def get_global_config() -> RegistryResponse:
        return RegistryResponse({"compatibilityLevel": registry.get_config()})

    async def _level(request: Request) -> str:
        payload = await _body(request)
        level = payload.get("compatibility", payload.get("compatibilityLevel"))
        if not isinstance(level, str):
            raise InvalidCompatibilityLevelError("request body: set 'compatibility' to e.g. \"BACKWARD\"")
        return level

    @app.put("/config")
    async def put_global_config(request: Request) -> RegistryResponse:
        return RegistryResponse({"compatibility": registry.set_config(await _level(request))})

    @app.get("/config/{subject}")
    def get_subject_config(subject: str, defaultToGlobal: bool = False) -> RegistryResponse:
        level = registry.get_config(subject, default_to_global=defaultToGlobal)
        return RegistryResponse({"compatibilityLevel": level})

    @app.put("/config/{subject}")
    async def put_subject_config(subject: str, request: Request) -> RegistryResponse:
        return RegistryResponse({"compatibility": registry.set_config(await _level(request), subject)})

    @app.delete("/config/{subject}")
    def delete_subject_config(subject: str) -> RegistryResponse:
        return RegistryResponse({"compatibilityLevel": registry.delete_config(subject)})

    return app


def serve(registry: SchemaRegistry, host: str = "127.0.0.1", port: int = 8081) -> None:
    """Serve ``registry`` until interrupted (``streamlearn registry serve``)."""
    import uvicorn

    uvicorn.run(create_app(registry), host=host, port=port, log_level="warning")


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
    registry: SchemaRegistry, host: str = "127.0.0.1", port: int = 0, timeout: float = 15.0
) -> RunningServer:
    """Run the server in a daemon thread (tests, the demo stack); returns once it accepts requests.

    ``port=0`` lets the OS pick a free port, read back from the bound socket (no race).
    """
    import socket
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(registry), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"schema-registry:{bound_port}")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise StreamlearnError(
                f"port: the schema registry server did not start on {host}:{bound_port} within {timeout}s"
            )
        time.sleep(0.01)  # bounded poll of a flag set by uvicorn's own thread
    return RunningServer(f"http://{host}:{bound_port}", server, thread)
