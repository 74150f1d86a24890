"""The control API's FastAPI app: ``/query``, ``/trainModel``, ``/process``, ``/jobs`` (``create_app``).

A sibling of the ingest gateway, not an extension of it (docs/API.md): it shares the one key
mechanism (``schemas.access``: the same ``STREAMLEARN_KEYS``, scopes, tenants) and the HTTP guards
(``schemas.httpguard``), but it runs trainers and replays as child processes, which only the command
line layer may do; the gateway sits in ``ingest`` and must stay a lean, always-up intake.

Scopes: ``query`` (GET /query), ``train`` (POST /trainModel, its jobs), ``process`` (POST /process
replay, its jobs), ``admin`` (POST /process promote; implies the other three). Without keys the app
answers everyone, and ``streamlearn api serve`` binds loopback only.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.access import ANONYMOUS, KeyTable, Principal, load_keys
from schemas.exceptions import AccessError
from schemas.httpguard import BodyLimitMiddleware, ByteBudget, GuardError, StatusCounting, loads_guarded
from streaming.config import Settings
from streaming.store import NAMESPACE_PATTERN
from streamlearn.api.compact import Compactor
from streamlearn.api.exceptions import ApiError, BadRequestError, JobConflictError, JobNotFoundError
from streamlearn.api.jobs import STATUSES, Job, JobRunner, progress
from streamlearn.api.query import QueryService
from streamlearn.api.requests import (
    JobSpec,
    ProcessRequest,
    TrainRequest,
    own_model,
    parse_body,
    process_job,
    tenant_settings,
    train_job,
)

log = logging.getLogger(__name__)

#: The scope a job's kind needs to be seen or cancelled.
KIND_SCOPE = {"train": "train", "replay": "process", "promote": "admin"}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "bad parameters or body"}, 401: {"description": "missing or malformed bearer key"},
    403: {"description": "unknown key, missing scope, or another tenant's name"},
    413: {"description": "body (or query) over a limit; the message names it"},
}


def _body_schema(model: Any) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def public(job: Job) -> dict[str, Any]:
    """A job as answered over HTTP: its state, without the owner instance."""
    out = job.to_dict()
    out.pop("owner", None)
    return out


def create_app(settings: Settings, *, keys: KeyTable | None = None, runner: JobRunner | None = None,
               compact: bool = True) -> FastAPI:
    """The control API. ``runner`` defaults to one over ``settings.home``; its orphans are failed at start-up."""
    keys = keys if keys is not None else load_keys(settings.keys, settings.keys_file)
    runner = runner or JobRunner(settings)
    queries = QueryService(settings, tenants=len(keys.tenants))
    runner.tenant_cap = max(1, runner.max_jobs - 1) if keys.tenants else runner.max_jobs  # see FairSlots
    registry = CollectorRegistry()
    requests_total = Counter("streamlearn_api_requests_total", "Control API requests by route and status",
                             ["route", "status"], registry=registry)
    jobs_total = Counter("streamlearn_api_jobs_started_total", "Jobs started by the control API, by kind",
                         ["kind"], registry=registry)
    compactor = Compactor(settings, keys.tenants, settings.api_compact_interval_s if compact else 0, registry)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(runner.recover)
        compactor.start()
        yield
        compactor.stop()
        await run_in_threadpool(runner.close)

    app = FastAPI(title="streamlearn control API", version="1", lifespan=lifespan,
                  description=(__doc__ or "").split("\n\n", 1)[-1])
    app.state.runner = runner
    app.state.compactor = compactor

    def error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else None
        extra = {"job": exc.job_id} if isinstance(exc, JobConflictError) and exc.job_id else {}
        return error(exc.status, exc.message, headers, **extra)

    @app.exception_handler(AccessError)
    async def access_error(_: Request, exc: AccessError) -> JSONResponse:
        return error(exc.status, exc.message, {"WWW-Authenticate": 'Bearer realm="streamlearn-api"'}
                     if exc.status == 401 else None)

    @app.exception_handler(GuardError)
    async def guard_error(_: Request, exc: GuardError) -> JSONResponse:
        return error(exc.status, exc.message, {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return error(400, f"{where}: {first.get('msg', 'invalid')}; see /openapi.json")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("control API: unexpected %s", type(exc).__name__)
        return error(500, "internal error of the control API; see its log")

    def caller(request: Request) -> Principal:
        return keys.authenticate(request.headers.get("authorization")) if keys else ANONYMOUS

    def who(request: Request, scope: str, name: str | None = None) -> Principal:
        principal = caller(request)
        if keys:
            keys.require(principal, scope, name)
        return principal

    def visible(principal: Principal, job: Job) -> bool:
        same = principal.all_tenants or job.tenant == principal.tenant
        return same and principal.allows(KIND_SCOPE.get(job.kind, "admin"))

    def find(principal: Principal, job_id: str) -> Job:
        job = runner.store.load(job_id)
        if not visible(principal, job):  # another tenant's job is "not found", not "forbidden": ids do not leak
            raise JobNotFoundError(f"no job {job_id!r}; list yours with GET /jobs")
        return job

    async def body_of(request: Request) -> Any:
        raw = await request.body()
        return await run_in_threadpool(loads_guarded, raw, max_depth=8, max_containers=64)

    async def started(spec: JobSpec, principal: Principal) -> JSONResponse:
        """Start ``spec`` (a train or process job) for the caller's tenant; 202 with the job."""
        job = await run_in_threadpool(runner.start, spec.kind, principal.tenant, spec.resource, spec.args, spec.argv,
                                      tenant_settings(settings, principal.tenant))
        jobs_total.labels(job.kind).inc()
        if job.status != "running":  # the process could not be started (reason says why)
            return JSONResponse({"error": job.reason, "job": public(job)}, 500)
        return JSONResponse({"job": public(job)}, 202, headers={"Location": f"/jobs/{job.id}"})

    @app.post("/trainModel", status_code=202, openapi_extra=_body_schema(TrainRequest),
              responses={**_ERRORS, 202: {"description": "job started; poll GET /jobs/{id}"},
                         409: {"description": "the model has a training job running (named in `job`)"},
                         429: {"description": "api_max_jobs jobs running; see Retry-After"}},
              summary="Start a training run of a model (train --once) as a job")
    async def train_model(request: Request) -> Response:
        who(request, "train")
        req = parse_body(TrainRequest, await body_of(request))
        principal = who(request, "train", req.model)
        model = own_model(principal, req.model)
        from trainer.spec import spec_sources

        known = spec_sources(tenant_settings(settings, principal.tenant))
        if model not in known:  # was a 202 and a job that failed with "unknown model"
            raise BadRequestError(f"model: {req.model!r} is not a model this platform knows; known: "
                                  f"{sorted(known)[:20]} (custom models come from the config file's [models])")
        holder = await run_in_threadpool(_leader, tenant_settings(settings, principal.tenant), model)
        if holder is not None:  # was a 202 and a job that failed with "another trainer leads this model"
            raise JobConflictError(
                f"model: {req.model!r} has a periodic trainer leading it (pid {holder.pid} on {holder.host}, "
                f"lease epoch {holder.epoch}); it retrains on its own cadence. Stop that trainer to train "
                "on demand, or wait for its next version")
        return await started(train_job(req, model), principal)

    @app.post("/process", status_code=202, openapi_extra=_body_schema(ProcessRequest),
              responses={**_ERRORS, 202: {"description": "job started; poll GET /jobs/{id}"},
                         409: {"description": "the namespace has a job running (named in `job`)"},
                         429: {"description": "api_max_jobs jobs running; see Retry-After"}},
              summary="Replay (re-featurize) a time range into a namespace, or promote a namespace to live")
    async def process(request: Request) -> Response:
        who(request, "process")
        req = parse_body(ProcessRequest, await body_of(request))
        principal = who(request, "admin" if req.action == "promote" else "process")
        return await started(process_job(req), principal)

    @app.get("/jobs", responses=_ERRORS, summary="The caller's tenant's jobs, newest first")
    async def list_jobs(request: Request,
                        status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
                        limit: int = Query(100, ge=1, le=1000)) -> Response:
        principal = caller(request)
        if keys and not any(principal.allows(s) for s in ("train", "process", "admin")):
            keys.require(principal, "train")  # the 403 names a scope to use
        jobs = await run_in_threadpool(runner.store.jobs, limit, lambda j: visible(principal, j)
                                       and (status is None or j.status == status))
        return JSONResponse({"jobs": [public(j) for j in jobs], "statuses": list(STATUSES)})

    @app.get("/jobs/{job_id}", responses={**_ERRORS, 404: {"description": "no such job (of your tenant)"}},
             summary="A job's status, progress, result (version, gate decision) and the end of its log")
    async def show_job(request: Request, job_id: str, tail_bytes: int = Query(4096, ge=0, le=65536)) -> Response:
        job = find(caller(request), job_id)
        return JSONResponse({"job": public(job), "progress": progress(runner.store, job),
                             "log_tail": runner.store.tail(job.id, tail_bytes)})

    @app.delete("/jobs/{job_id}", responses={**_ERRORS, 404: {"description": "no such job (of your tenant)"},
                                             409: {"description": "the job is over already"}},
                summary="Cancel a job: SIGTERM its process group, SIGKILL after api_cancel_grace_s")
    async def cancel_job(request: Request, job_id: str) -> Response:
        principal = caller(request)
        job = find(principal, job_id)
        job = await run_in_threadpool(runner.cancel, job.id, f"key {principal.name!r} over the API")
        return JSONResponse({"job": public(job)})

    @app.get("/query", responses={**_ERRORS, 406: {"description": "Accept names no supported format"},
                                  429: {"description": "too many queries at once"},
                                  501: {"description": "no columnar query engine installed"}},
             summary="Feature rows (what=features) or predictions (what=predictions) from the columnar store")
    async def query(request: Request, what: Literal["features", "predictions"],
                    kind: Literal["weblog", "sensor", "image"] | None = None,
                    namespace: str = Query("live", pattern=NAMESPACE_PATTERN),
                    start: str | None = Query(None, max_length=64), end: str | None = Query(None, max_length=64),
                    key: str | None = Query(None, max_length=256), batch: str | None = Query(None, max_length=128),
                    model: str | None = Query(None, max_length=129), version: int | None = Query(None, ge=1),
                    request_id: str | None = Query(None, max_length=256), limit: int = Query(1000, ge=1, le=100_000),
                    cursor: str | None = Query(None, max_length=2048)) -> Response:
        principal = who(request, "query", model if what == "predictions" and model else None)
        params: dict[str, Any] = {"what": what, "kind": kind, "namespace": namespace, "start": start, "end": end,
                                  "key": key, "batch": batch, "version": version, "request_id": request_id,
                                  "limit": limit, "cursor": cursor,
                                  "model": own_model(principal, model) if model else None}
        return await queries.answer(request, principal, params)

    @app.get("/healthz", summary="The API answers, and how many jobs it runs")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok", "running_jobs": len(runner.active())})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(StatusCounting, count=lambda route, status: requests_total.labels(route, str(status)).inc())

    def count_refusal(path: str, status: int) -> None:
        requests_total.labels("refused", str(status)).inc()

    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.api_max_body_bytes, what="control API",
                       budget=ByteBudget(16 * settings.api_max_body_bytes), on_reject=count_refusal)
    return app


def _leader(settings: Settings, model: str) -> Any:
    """The live lease record of ``model``'s leading trainer, or None (streaming.lease.live_holder)."""
    from streaming.lease import live_holder
    from streaming.model_registry import ModelRegistry

    return live_holder(ModelRegistry(settings.model_dir), model)
