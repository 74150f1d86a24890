"""HTTP front end in the TensorFlow Serving REST shape, beside the Kafka loop.

It shares the worker's :class:`~serving.versions.VersionManager` (same loaded versions, same swaps)
and featurizer states, so an HTTP answer and a Kafka answer of the same instant come from the same
version. Routes (TF Serving REST API):

* ``GET /v1/models/{name}`` and ``.../versions/{v}`` -> ``model_version_status``
* ``GET /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata`` -> signature def
* ``POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict`` with ``{"instances": [...]}`` (row
  format) or ``{"inputs": ...}`` (columnar) -> ``{"predictions": [...]}`` / ``{"outputs": [...]}``

Instances are feature vectors (lists, or ``{"x": [...]}``) or raw event objects featurized
server-side. Labels are ``stable`` and ``canary``. Without a version or label the stable version
answers (the canary share applies to Kafka requests, whose ids are hashed). Errors use TF
Serving's ``{"error": "..."}`` with 400 (bad input) or 404 (unknown model/version/label).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from serving import metrics
from serving.exceptions import NoModelVersionError, RequestDecodeError, ServingError
from serving.inputs import Featurization
from serving.model import LoadedVersion
from serving.versions import VersionManager

log = logging.getLogger(__name__)


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _status(lv: LoadedVersion) -> dict[str, Any]:
    return {"version": str(lv.version), "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""}}


def create_app(manager: VersionManager, featurization: Featurization, model: str) -> Any:
    """The FastAPI application serving ``model`` from ``manager``'s loaded versions."""
    app = FastAPI(title=f"streamlearn serving: {model}", docs_url=None, redoc_url=None)

    @app.exception_handler(_HttpError)
    async def _http_error(_: Request, exc: _HttpError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    def pick(name: str, version: str | None = None, label: str | None = None) -> LoadedVersion:
        if name != model:
            raise _HttpError(404, f"Servable not found for request: Latest({name}); this server serves {model!r}")
        try:
            if version is not None:
                if not version.isdigit():
                    raise _HttpError(400, f"version: {version!r} is not a number")
                return manager.by_version(int(version))
            if label is not None:
                return manager.by_label(label)
            stable = manager.current().stable
            if stable is None:
                raise NoModelVersionError(f"Servable not found for request: Latest({name}); no version loaded yet")
            return stable
        except NoModelVersionError as exc:
            raise _HttpError(404, str(exc)) from exc

    def rows(lv: LoadedVersion, instances: Any) -> np.ndarray:
        if not isinstance(instances, list) or not instances:
            raise _HttpError(400, "instances: must be a non-empty list of feature vectors or raw event objects")
        out = []
        for i, inst in enumerate(instances):
            try:
                if isinstance(inst, dict) and set(inst) == {"x"}:
                    inst = inst["x"]
                if isinstance(inst, dict):
                    x, _ = featurization.featurize(inst, lv, bytes_are_base64=True)
                else:
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
                raise _HttpError(400, f"inputs: the signature has one input 'x', got {sorted(data)}")
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

    async def body_of(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError as exc:
            raise _HttpError(400, f"body: not valid JSON ({exc})") from exc

    @app.get("/v1/models/{name}")
    def status(name: str) -> dict[str, Any]:
        pick(name)
        return {"model_version_status": [_status(lv) for lv in manager.current().versions()]}

    @app.get("/v1/models/{name}/versions/{version}")
    def status_version(name: str, version: str) -> dict[str, Any]:
        return {"model_version_status": [_status(pick(name, version=version))]}

    def metadata(lv: LoadedVersion) -> dict[str, Any]:
        return {"model_spec": {"name": model, "signature_name": "", "version": str(lv.version)},
                "metadata": lv.signature_metadata()}

    @app.get("/v1/models/{name}/metadata")
    def meta(name: str) -> dict[str, Any]:
        return metadata(pick(name))

    @app.get("/v1/models/{name}/versions/{version}/metadata")
    def meta_version(name: str, version: str) -> dict[str, Any]:
        return metadata(pick(name, version=version))

    @app.get("/v1/models/{name}/labels/{label}/metadata")
    def meta_label(name: str, label: str) -> dict[str, Any]:
        return metadata(pick(name, label=label))

    @app.post("/v1/models/{name}:predict")
    async def predict_latest(name: str, request: Request) -> dict[str, Any]:
        lv = pick(name)
        return predict(lv, await body_of(request))

    @app.post("/v1/models/{name}/versions/{version}:predict")
    async def predict_version(name: str, version: str, request: Request) -> dict[str, Any]:
        lv = pick(name, version=version)
        return predict(lv, await body_of(request))

    @app.post("/v1/models/{name}/labels/{label}:predict")
    async def predict_label(name: str, label: str, request: Request) -> dict[str, Any]:
        lv = pick(name, label=label)
        return predict(lv, await body_of(request))

    return app


def start_http(manager: VersionManager, featurization: Featurization, model: str, port: int,
               host: str = "127.0.0.1", timeout_s: float = 15.0) -> Any:
    """Run the app with uvicorn in a daemon thread; returns the ``uvicorn.Server`` once it listens.

    ``port=0`` binds a free port; the bound one is in ``server.bound_port``. Stop with
    ``server.should_exit = True``.
    """
    import uvicorn

    config = uvicorn.Config(create_app(manager, featurization, model), host=host, port=port,
                            log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"http-{model}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ServingError(f"http_port: the HTTP server on {host}:{port} did not start; is the port in use?")
        time.sleep(0.02)  # poll interval inside a deadline loop
    sockets = [s for srv in (server.servers or []) for s in srv.sockets]
    server.bound_port = sockets[0].getsockname()[1] if sockets else port  # type: ignore[attr-defined]
    log.info("TF Serving REST API for %s on http://%s:%d/v1/models/%s", model, host, server.bound_port,  # type: ignore[attr-defined]
             model)
    return server
