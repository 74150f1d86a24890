"""The gateway's HTTP surface: FastAPI routes and their OpenAPI descriptions (``create_app``)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Path, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from kafka.errors import KafkaTimeoutError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from ingest import gateway as package
from ingest.exceptions import InputRejectedError
from ingest.gateway.errors import (
    BadRequestError,
    GatewayError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from ingest.gateway.limits import BodyLimitMiddleware, GatewayLimits
from ingest.gateway.metrics import RequestMetrics
from ingest.gateway.records import (
    AVRO_TYPES,
    Item,
    TimeRules,
    fingerprint,
    image_file_item,
    is_json,
    media_type,
    now_ms,
    parse_json_body,
)
from ingest.gateway.service import Answer, Gateway
from schemas.exceptions import RegistryUnavailableError
from schemas.httpguard import ByteBudget, GuardError, scan_json
from schemas.registry import SchemaRegistry
from streaming.config import Settings
from streaming.producer import STOP_GRACE_S, Publisher
from streaming.topics import KINDS

_JSON_OR_AVRO = {"required": True, "content": {
    "application/json": {"schema": {"oneOf": [{"type": "object"},
                                              {"type": "array", "items": {"type": "object"}}]}},
    "application/vnd.streamlearn.avro": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}}
_MULTIPART = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "label": {"type": "string"}, "timestamp": {"type": "string"}}}}}}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "every record accepted or a duplicate"},
    207: {"description": "some records rejected (see results)"},
    400: {"description": "body unusable as a whole"}, 401: {"description": "missing/malformed bearer token"},
    403: {"description": "unknown token"}, 409: {"description": "Idempotency-Key reused with another body"},
    413: {"description": "body over the size limit"}, 415: {"description": "unsupported Content-Type"},
    422: {"description": "no record valid"}, 429: {"description": "rate limit; see Retry-After"},
    503: {"description": "Kafka behind or not acknowledging; see Retry-After"},
}

log = logging.getLogger(__name__)


def create_app(settings: Settings, publisher: Publisher | None = None, registry: SchemaRegistry | None = None,
               *, limits: GatewayLimits | None = None, time_rules: TimeRules | None = None) -> FastAPI:
    """The gateway app. A publisher built here is closed on shutdown; one passed in is the caller's."""
    limits = limits or GatewayLimits()
    owned = publisher is None
    pub = publisher or Publisher(settings, registry)
    gw = Gateway(settings, pub, registry or pub.registry, limits, time_rules)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            settled = False
            try:  # acked answers given must survive a broker kill
                settled = await run_in_threadpool(pub.settle, STOP_GRACE_S)
            except KafkaTimeoutError:  # the broker is away: bounded, so a stop ends inside a supervisor's grace
                log.error("gateway shutdown: %d events not acked by the broker after %.0f s; their requests were not "
                          "answered 2xx, so their clients send them again", pub.ledger.unacked(), STOP_GRACE_S)
            except OSError as exc:  # the journal could not be written: the producer must close all the same
                log.error("gateway shutdown: %s", exc)
            await run_in_threadpool(pub.close, 10.0 if settled else 1.0)

    app = FastAPI(title="streamlearn ingest gateway", version="1", lifespan=lifespan, redirect_slashes=False,
                  description=(package.__doc__ or "").split("\n\n", 1)[-1])  # the contract, for OpenAPI
    app.state.gateway = gw
    bearer = HTTPBearer(auto_error=False, description="a token of STREAMLEARN_INGEST_TOKENS")

    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="streamlearn-ingest"'
        return JSONResponse({"error": exc.message}, exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own answers (an unknown path, a wrong method) in the gateway's error shape; a 404 names
        the routes (it was {"detail": "Not Found"}, and a trailing slash a 307 redirect)."""
        message = str(exc.detail)
        if exc.status_code == 404:
            message = (f"no route {request.url.path[:200]!r}; POST /ingest/weblog, /ingest/sensor, /ingest/image "
                       "or /ingest/images (see /docs)")
        return JSONResponse({"error": message}, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(GuardError)
    async def guard_error(_: Request, exc: GuardError) -> JSONResponse:
        headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else {}
        return JSONResponse({"error": exc.message}, exc.status, headers=headers)

    @app.exception_handler(RegistryUnavailableError)
    async def registry_down(_: Request, exc: RegistryUnavailableError) -> JSONResponse:
        return JSONResponse({"error": f"schema registry unavailable ({exc}); retry"}, 503,
                            headers={"Retry-After": "5"})

    @app.post("/ingest/images", responses=_RESPONSES, openapi_extra={"requestBody": _MULTIPART},
              dependencies=[Security(bearer)], summary="Upload image files (multipart/form-data)")
    async def ingest_images(request: Request) -> Response:
        principal = gw.admit(request, "image")
        if media_type(request.headers.get("content-type")) != "multipart/form-data":
            raise UnsupportedMediaTypeError("POST /ingest/images takes multipart/form-data with image files")
        # The body first (bounded by the body limit), then the form from it: an upload that is unusable as a
        # whole is kept as a dead letter with its reason, as a JSON body is, and answered {"error": ...};
        # starlette's own 400s were {"detail": ...} and kept nothing.
        body = await request.body()

        async def refused(message: str) -> Response:
            return (await gw.reject_body("image", body, request, BadRequestError(message), principal)).response()

        try:
            async with request.form(max_files=limits.max_records_per_request, max_fields=16) as form:
                files = [(v.filename, await v.read()) for _, v in form.multi_items() if isinstance(v, UploadFile)]
                fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        except (StarletteHTTPException, MultiPartException) as exc:
            detail = exc.detail if isinstance(exc, StarletteHTTPException) else exc.message
            return await refused(f"the upload is not usable multipart/form-data ({str(detail)[:200]})")
        unknown = sorted(set(fields) - {"label", "timestamp"})
        if unknown or not files:
            return await refused(f"form fields {[u[:40] for u in unknown[:8]]} are unknown (use label, timestamp)"
                                 if unknown else "no complete file in the upload (a file part needs a filename "
                                 "and the closing boundary); send one or more image files")
        stamp = now_ms()
        if fields.get("timestamp"):
            try:
                stamp = gw.time_rules.read(fields["timestamp"].strip())
            except InputRejectedError as exc:
                return await refused(f"form field timestamp: {exc}")
        digest = hashlib.sha256(repr(sorted(fields.items())).encode())
        for name, data in files:
            digest.update(f"\x00{name}\x00{len(data)}\x00".encode() + data)

        def validate() -> list[Item]:  # Pillow decodes each image: CPU work, off the event loop
            return [image_file_item(i, name, data, label=fields.get("label"), timestamp=stamp, rules=gw.time_rules)
                    for i, (name, data) in enumerate(files)]

        async def work() -> Answer:
            gw.charge(principal, len(files))  # before Pillow decodes anything
            items = await run_in_threadpool(validate)
            return await gw.publish("image", items, request, principal, charged=len(files))

        return await gw.with_request_key(request, principal, digest.hexdigest(), work)

    @app.post("/ingest/{kind}", responses=_RESPONSES, openapi_extra={"requestBody": _JSON_OR_AVRO},
              dependencies=[Security(bearer)], summary="Publish one event or a batch of one kind")
    async def ingest(request: Request, kind: str = Path(description="weblog | sensor | image")) -> Response:
        principal = gw.admit(request, kind)
        if kind not in KINDS:
            return JSONResponse({"error": f"unknown kind {kind!r:.40}; use one of {sorted(KINDS)}"}, 404)
        ctype = media_type(request.headers.get("content-type"))
        if not (is_json(ctype) or ctype in AVRO_TYPES):
            raise UnsupportedMediaTypeError(f"Content-Type {ctype!r:.60} is not accepted; use "
                                            "application/json or application/vnd.streamlearn.avro")
        body = await request.body()

        async def work() -> Answer:
            if ctype in AVRO_TYPES:
                gw.charge(principal, 1)
                items = [await run_in_threadpool(gw.avro.item, kind, body)]
                return await gw.publish(kind, items, request, principal, charged=1)
            # Scan the shape without building anything, charge the records it holds (a refused body
            # pays too), and refuse by shape before json.loads can allocate per element.
            shape = await run_in_threadpool(scan_json, body)
            charged = min(max(shape.top_level, 1), limits.max_records_per_request)
            gw.charge(principal, charged)
            try:
                gw.check_shape(shape)
                items = await run_in_threadpool(parse_json_body, kind, body, limits.max_records_per_request,
                                                gw.time_rules, depth=shape.depth)
            except (BadRequestError, PayloadTooLargeError) as exc:
                return await gw.reject_body(kind, body, request, exc, principal)
            return await gw.publish(kind, items, request, principal, charged=charged)

        return await gw.with_request_key(request, principal, fingerprint(ctype, body), work)

    @app.get("/healthz", summary="Kafka reachable from the gateway's producer")
    async def healthz() -> Response:
        return await gw.health()

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def count_refusal(path: str, status: int) -> None:
        route = "/ingest/images" if path == "/ingest/images" else (
            "/ingest/{kind}" if path.startswith("/ingest/") else "unmatched")
        gw.metrics.requests.labels(route=route, status=str(status)).inc()

    app.add_middleware(RequestMetrics, metrics=gw.metrics)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=limits.max_body_bytes, on_reject=count_refusal,
                       budget=ByteBudget(max(limits.body_budget_bytes, 2 * limits.max_body_bytes)))
    return app
