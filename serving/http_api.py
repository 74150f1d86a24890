"""HTTP front end in the TensorFlow Serving REST shape, beside the Kafka loop.

It shares the worker's :class:`~serving.versions.VersionManager` (same loaded versions, same swaps)
and featurizer states, so an HTTP answer and a Kafka answer of the same instant come from the same
version. Routes (TF Serving REST API):

* ``GET /v1/models/{name}``, ``.../versions/{v}`` and ``.../labels/{l}`` -> ``model_version_status``
* ``GET /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata`` -> signature def
* ``POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict`` with ``{"instances": [...]}`` (row
  format) or ``{"inputs": ...}`` (columnar) -> ``{"predictions": [...]}`` / ``{"outputs": [...]}``

Instances are feature vectors (lists, or ``{"x": [...]}``) or raw event objects featurized
server-side. Labels are ``stable`` and ``canary``. Without a version or label the stable version
answers (the canary share applies to Kafka requests, whose ids are hashed).

Every 4xx/5xx is TF Serving's ``{"error": "..."}``, never a traceback: 400 bad input, 401/403 key,
404 unknown model/version/label, 408 slow body, 413 body or instances over the limit, 415 a
compressed body, 429 too many concurrent predictions or the tenant's quota spent, 501 ``:classify``,
``:regress`` and ``:multi_inference`` (only the Predict API is served). Keys (``predict``
scope, the model under the key's tenant) come from ``STREAMLEARN_KEYS``/``STREAMLEARN_KEYS_FILE``
(docs/SECURITY.md); without keys the server binds loopback only. Inference runs in a small thread
pool, never on the event loop, so HTTP and the Kafka loop of the same process do not block each other.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.access import ANONYMOUS, KeyTable, Principal, bind_host, load_keys
from schemas.exceptions import AccessError
from schemas.httpguard import BodyLimitMiddleware, ByteBudget, GuardError, RateBuckets, ThreadedServer, loads_guarded
from serving import metrics
from serving.exceptions import NoModelVersionError, RequestDecodeError, ServingError
from serving.inputs import Featurization, declared_pixels
from serving.model import LoadedVersion
from serving.versions import VersionManager
from streaming.config import Settings
from streaming.limits import unique_keys

log = logging.getLogger(__name__)

#: HTTP requests by tenant (bounded: configured tenants, else "other") and status class.
TENANT_REQUESTS = Counter("streamlearn_serving_http_requests_total",
                          "Serving HTTP requests by model, tenant and status code", ["model", "tenant", "status"])
_VERSION_RE = re.compile(r"^[0-9]{1,18}$")  # ASCII digits only: "²".isdigit() is True, int("²") fails


@dataclass(frozen=True)
class ServeLimits:
    """Limits of the HTTP front end; defaults from the settings of the same names."""

    max_body_bytes: int = 4 * 1024 * 1024
    max_instances: int = 1024
    max_concurrent: int = 8  # predict requests being decoded or inferred at once; 429 beyond
    tenant_rate: float = 0.0  # instances/s per tenant; <= 0: no quota
    max_depth: int = 32
    pool_workers: int = 2  # inference threads (TensorFlow parallelizes inside a call)
    body_timeout_s: float = 30.0
    #: Pixels the images of one request may declare, all together. Why: 180 small PNGs each declaring
    #: 4000x4000 fit every other limit (3.8 MB body) and took 14 s of CPU to decode; two such requests
    #: filled the inference pool and a trivial predict waited 12 s. Four 16 Mpx photos still fit.
    max_request_pixels: int = 64_000_000

    @classmethod
    def from_settings(cls, settings: Settings) -> ServeLimits:
        return cls(max_body_bytes=settings.serve_max_body_bytes, max_instances=settings.serve_max_instances,
                   max_concurrent=settings.serve_max_concurrent, tenant_rate=settings.serve_tenant_rate)


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


#: How often a prediction waiting in the pool checks that its client is still connected.
DISCONNECT_POLL_S = 0.1


async def _finished_unless_abandoned(request: Request, work: Future[Any]) -> bool:
    """Wait for ``work``; False when its client went away while it was still queued (it is then cancelled).

    Why: a request whose client had gone kept its prediction queued and then running in the pool, and kept
    its slot of ``max_concurrent``: ten abandoned slow requests held all 8 slots for ~20 s, and everybody
    else got 429. Work already running is waited for (TensorFlow cannot be interrupted, and its slot bounds
    the pool's work); queued work of a client that left is dropped.
    """
    done = asyncio.wrap_future(work)
    while True:
        finished, _ = await asyncio.wait({done}, timeout=DISCONNECT_POLL_S)
        if finished:
            return True
        if await request.is_disconnected() and work.cancel():
            log.info("%s: the client closed the connection before its prediction ran; dropped", request.url.path)
            return False


def _status(lv: LoadedVersion) -> dict[str, Any]:
    return {"version": str(lv.version), "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""}}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Every refusal as ``{"error": ...}``; unexpected errors without their text or a traceback."""

    @app.exception_handler(_HttpError)
    async def http_error(_: Request, exc: _HttpError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(GuardError)
    async def guard_error(_: Request, exc: GuardError) -> JSONResponse:
        return _error(exc.status, exc.message, {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else None)

    @app.exception_handler(AccessError)
    async def access_error(_: Request, exc: AccessError) -> JSONResponse:
        return _error(exc.status, exc.message, {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)

    @app.exception_handler(StarletteHTTPException)
    async def starlette_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "request does not match the route's parameters")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("serving HTTP: unexpected %s", type(exc).__name__)
        return _error(500, "internal error of the serving HTTP API; see the server log")


_PREDICT_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "properties": {
        "instances": {"type": "array", "items": {"oneOf": [{"type": "array", "items": {"type": "number"}},
                                                          {"type": "object"}]}},
        "inputs": {"oneOf": [{"type": "object"}, {"type": "array"}]}}}}}}}


def _no_booleans(values: Any, where: str) -> None:
    """JSON ``true`` is not the number 1 here: refuse booleans anywhere in a feature vector."""
    if isinstance(values, bool):
        raise _HttpError(400, f"{where}: booleans are not numbers; send 0/1 as numbers")
    if isinstance(values, list):
        for v in values:
            if isinstance(v, bool | list):
                _no_booleans(v, where)


def create_app(manager: VersionManager, featurization: Featurization, model: str, *,
               keys: KeyTable | None = None, limits: ServeLimits | None = None, owner: str | None = None) -> Any:
    """The FastAPI application serving ``model`` from ``manager``'s loaded versions.

    ``keys`` empty or None: no authentication (the caller binds loopback only). ``owner``: the name keys
    must own to predict (default: the model name); a tenant-scoped process (``STREAMLEARN_TENANT``) serves
    ``model`` under its tenant's namespace, so its owner is ``<tenant>.<model>``.
    """
    keys = keys if keys is not None else KeyTable()
    limits = limits or ServeLimits()
    app = FastAPI(title=f"streamlearn serving: {model}", docs_url=None, redoc_url=None)
    _install_error_handlers(app)
    pool = ThreadPoolExecutor(max_workers=limits.pool_workers, thread_name_prefix=f"http-predict-{model}")
    app.state.pool = pool
    busy = threading.BoundedSemaphore(limits.max_concurrent)
    quota = RateBuckets(limits.tenant_rate, max(limits.tenant_rate, limits.max_instances))

    def who(request: Request, name: str) -> Principal:
        if not keys:
            return ANONYMOUS
        principal = keys.authenticate(request.headers.get("authorization"))
        keys.require(principal, "predict", owner or name)
        return principal

    def count(principal: Principal, status: int) -> None:
        TENANT_REQUESTS.labels(model, keys.tenant_label(principal), str(status)).inc()

    def pick(name: str, version: str | None = None, label: str | None = None) -> LoadedVersion:
        if name != model:
            raise _HttpError(404, f"Servable not found for request: Latest({name[:80]}); "
                                  f"this server serves {model!r}")
        try:
            if version is not None:
                if not _VERSION_RE.match(version):
                    raise _HttpError(400, f"version: {version[:40]!r} is not a number (ASCII digits)")
                return manager.by_version(int(version))
            if label is not None:
                return manager.by_label(label[:64])
            stable = manager.current().stable
            if stable is None:
                raise NoModelVersionError(f"Servable not found for request: Latest({name}); no version loaded yet")
            return stable
        except NoModelVersionError as exc:
            raise _HttpError(404, str(exc)) from exc

    def rows(lv: LoadedVersion, instances: Any) -> np.ndarray:
        if not isinstance(instances, list) or not instances:
            raise _HttpError(400, "instances: must be a non-empty list of feature vectors or raw event objects")
        if len(instances) > limits.max_instances:
            raise _HttpError(413, f"instances: {len(instances)} over the limit of {limits.max_instances} per "
                                  "request; split the request")
        pixels = sum(declared_pixels(inst) for inst in instances)
        if pixels > limits.max_request_pixels:
            raise _HttpError(413, f"instances: the images declare {pixels} pixels in all, over the limit of "
                                  f"{limits.max_request_pixels} per request; send fewer or smaller images")
        out = []
        for i, inst in enumerate(instances):
            try:
                if isinstance(inst, dict) and set(inst) == {"x"}:
                    inst = inst["x"]
                if isinstance(inst, dict):
                    x, _ = featurization.featurize(inst, lv, bytes_are_base64=True)
                else:
                    _no_booleans(inst, f"instances[{i}]")
                    x = featurization.check_features(inst, lv)
            except RequestDecodeError as exc:
                raise _HttpError(400, f"instances[{i}]: {exc}") from exc
            out.append(x)
        return np.stack(out)

    def predict(lv: LoadedVersion, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or ("instances" not in body and "inputs" not in body):
            raise _HttpError(400, 'body: must be a JSON object with "instances" (row format) or "inputs" '
                                  '(columnar format)')
        columnar = "instances" not in body
        data = body["inputs"] if columnar else body["instances"]
        if columnar and isinstance(data, dict):
            if set(data) != {"x"}:
                raise _HttpError(400, f"inputs: the signature has one input 'x', got {sorted(data)[:8]}")
            data = data["x"]
        started = time.monotonic()
        x = rows(lv, data)
        out = lv.predict(x)
        lv.observe_inputs(x)
        metrics.BATCH_SIZE.labels(model).observe(len(x))
        metrics.REQUESTS.labels(model, "ok", "http").inc(len(x))
        metrics.LATENCY.labels(model).observe(time.monotonic() - started)
        values = out.astype(float).tolist()
        return {"outputs": values} if columnar else {"predictions": values}

    async def serve_predict(request: Request, name: str, version: str | None = None,
                            label: str | None = None) -> JSONResponse:
        principal = who(request, name)
        status = 500
        try:
            pick(name, version=version, label=label)  # a wrong name or version is refused before any body
            raw = await request.body()  # counted against the body budget by the middleware
            # The version is chosen once the body is here: a body may take up to the body timeout, and a
            # version promoted (or rolled back) meanwhile answered it with the one picked at its start.
            lv = pick(name, version=version, label=label)
            if not busy.acquire(blocking=False):
                raise _HttpError(429, f"{limits.max_concurrent} predictions are running; retry shortly")
            try:
                # A key named twice is refused, as the gateway and `predict --file` refuse it: Python keeps the
                # last "instances", a proxy in front may have checked the first.
                body = await run_in_threadpool(lambda: loads_guarded(raw, max_depth=limits.max_depth,
                                                                     max_containers=limits.max_instances * 4 + 16,
                                                                     object_pairs_hook=unique_keys))
                data = body.get("instances", body.get("inputs")) if isinstance(body, dict) else None
                n = _instances(data)
                try:
                    quota.take(principal.tenant_label, n, "instances")
                except GuardError as exc:
                    raise GuardError(429, f"tenant {principal.tenant_label!r}: {exc.message}",
                                     exc.retry_after) from None
                work = pool.submit(predict, lv, body)
                if not await _finished_unless_abandoned(request, work):
                    status = 499  # nginx's "client closed request": nobody to answer
                    return JSONResponse({"error": "the client closed the connection"}, 499)
                answer = work.result()
            finally:
                busy.release()
            status = 200
            return JSONResponse(answer)
        except (_HttpError, GuardError) as exc:
            status = exc.status
            raise
        finally:
            count(principal, status)

    @app.get("/v1/models/{name}")
    def status_all(name: str, request: Request) -> dict[str, Any]:
        who(request, name)
        pick(name)
        return {"model_version_status": [_status(lv) for lv in manager.current().versions()]}

    @app.get("/v1/models/{name}/versions/{version}")
    def status_version(name: str, version: str, request: Request) -> dict[str, Any]:
        who(request, name)
        return {"model_version_status": [_status(pick(name, version=version))]}

    @app.get("/v1/models/{name}/labels/{label}")
    def status_label(name: str, label: str, request: Request) -> dict[str, Any]:
        who(request, name)
        return {"model_version_status": [_status(pick(name, label=label))]}

    def metadata(lv: LoadedVersion) -> dict[str, Any]:
        return {"model_spec": {"name": model, "signature_name": "", "version": str(lv.version)},
                "metadata": lv.signature_metadata()}

    @app.get("/v1/models/{name}/metadata")
    def meta(name: str, request: Request) -> dict[str, Any]:
        who(request, name)
        return metadata(pick(name))

    @app.get("/v1/models/{name}/versions/{version}/metadata")
    def meta_version(name: str, version: str, request: Request) -> dict[str, Any]:
        who(request, name)
        return metadata(pick(name, version=version))

    @app.get("/v1/models/{name}/labels/{label}/metadata")
    def meta_label(name: str, label: str, request: Request) -> dict[str, Any]:
        who(request, name)
        return metadata(pick(name, label=label))

    @app.post("/v1/models/{name}:predict", openapi_extra=_PREDICT_BODY)
    async def predict_latest(name: str, request: Request) -> JSONResponse:
        return await serve_predict(request, name)

    @app.post("/v1/models/{name}/versions/{version}:predict", openapi_extra=_PREDICT_BODY)
    async def predict_version(name: str, version: str, request: Request) -> JSONResponse:
        return await serve_predict(request, name, version=version)

    @app.post("/v1/models/{name}/labels/{label}:predict", openapi_extra=_PREDICT_BODY)
    async def predict_label(name: str, label: str, request: Request) -> JSONResponse:
        return await serve_predict(request, name, label=label)

    @app.post("/v1/models/{rest:path}", include_in_schema=False)
    async def other_post(rest: str) -> JSONResponse:
        """TF Serving's other verbs: a POST to ``...:classify`` matched ``GET /v1/models/{name}`` and was a
        405 that said nothing of what this server does serve."""
        verb = rest.rpartition(":")[2] if ":" in rest else ""
        if verb in ("classify", "regress", "multi_inference"):
            return _error(501, f":{verb} is not served here; this server answers TF Serving's Predict API only: "
                               "POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict with "
                               '{"instances": [...]} (each a feature vector or a raw event)')
        return _error(404, "no such endpoint; POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict")

    app.add_middleware(BodyLimitMiddleware, max_body_bytes=limits.max_body_bytes, what="serving HTTP",
                       budget=ByteBudget(2 * limits.max_body_bytes * (limits.max_concurrent + 1)),
                       body_timeout_s=limits.body_timeout_s)
    return app


def start_http(manager: VersionManager, featurization: Featurization, model: str, port: int,
               host: str = "127.0.0.1", timeout_s: float = 15.0, *, settings: Settings | None = None,
               keys: KeyTable | None = None, limits: ServeLimits | None = None) -> Any:
    """Run the app with uvicorn in a daemon thread; returns the ``uvicorn.Server`` once it listens.

    Keys and limits come from ``settings`` when given (``STREAMLEARN_KEYS``/``_FILE``, ``serve_*``);
    without any key the server binds 127.0.0.1 whatever ``host`` says, and logs that it does.
    ``port=0`` binds a free port; the bound one is in ``server.bound_port``. Stop with
    ``server.should_exit = True``.
    """

    if settings is not None:
        keys = keys if keys is not None else load_keys(settings.keys, settings.keys_file)
        limits = limits or ServeLimits.from_settings(settings)
    keys = keys if keys is not None else KeyTable()
    host, warning = bind_host(host, keys, f"serving HTTP for {model}", "--http-host / STREAMLEARN_SERVE_HTTP_HOST")
    if warning:
        log.warning(warning)
    owner = f"{settings.tenant}.{model}" if settings is not None and settings.tenant else None
    app = create_app(manager, featurization, model, keys=keys, limits=limits, owner=owner)
    try:
        threaded = ThreadedServer(app, host=host, port=port, name=f"http-{model}", lifespan="off")
    except OSError as exc:
        raise ServingError(f"http_port: cannot listen on {host}:{port} ({exc}); is the port in use?") from exc
    if not threaded.start(timeout_s):
        raise ServingError(f"http_port: the HTTP server on {host}:{port} did not start; is the port in use?")
    server = threaded.server
    server.bound_port = threaded.port  # type: ignore[attr-defined]
    log.info("TF Serving REST API for %s on http://%s:%d/v1/models/%s (%s)", model, host,
             server.bound_port, model, f"{len(keys)} key(s)" if keys else "no key: loopback only")  # type: ignore[attr-defined]
    return server


def _instances(data: Any) -> int:
    """How many instances a body's ``instances``/``inputs`` holds, for the tenant quota: the rows of the row
    form, or of the longest column of the columnar form (``{"inputs": {"x": [...]}}`` counted as one
    instance, so 1,000 rows a request went through a spent quota)."""
    if isinstance(data, list):
        return len(data)
    if isinstance(data, dict):
        return max((len(v) for v in data.values() if isinstance(v, list)), default=1)
    return 1
