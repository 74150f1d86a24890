"""Request bodies of the control API, the tenant rule, and the command line each request becomes.

Tenants (docs/API.md): a tenant's names are its own, as everywhere (``schemas/access.py``):

* **models** are named ``<tenant>.<model>`` in requests (as serving HTTP names them); the job runs
  ``streamlearn --tenant <tenant> train <model>``, so its topics and groups are the tenant's;
* **stores**: a tenant's feature store and model registry are ``<home>/tenants/<tenant>/features``
  and ``.../models`` (docs/SECURITY.md: every tenant has its own); the default tenant uses the
  platform's. So a tenant's **namespaces** live in its own feature store: two tenants may both have a
  namespace ``rebuild-1`` without meeting, and no name prefix is needed;
* **jobs** carry the tenant that started them; a key sees and cancels only its tenant's jobs (an
  operator key, tenant ``*``, sees all).

Every value that reaches the child's argv is validated here (pattern or enum), so none can start
with ``-`` and be read as a flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.access import Principal
from streaming.config import Settings
from streaming.store import NAMESPACE_PATTERN
from streaming.timeargs import TimeArgError, parse_time
from streamlearn.api.exceptions import BadRequestError

MODEL_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}(\.[A-Za-z][A-Za-z0-9_-]{0,63})?$"
TIME_HELP = ("ISO 8601 (2026-11-22T10:00:00Z; no zone = UTC), epoch milliseconds (1700000000000), epoch with a "
             "unit (1700000000s) or relative to now (-2h, -7d)")


class TrainRequest(BaseModel):
    """``POST /trainModel``: one training run of ``model`` (``train --once`` semantics)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # JSON true is no version 1, "yes" no boolean

    model: str = Field(pattern=MODEL_PATTERN, description="model name; a tenant key names <tenant>.<model>")
    namespace: str = Field("live", pattern=NAMESPACE_PATTERN,
                           description="feature-store namespace to train on (default live)")
    reproduce_version: int | None = Field(None, ge=1, le=10**12, description=(
        "retrain this version from its recorded lineage (`retrain --reproduce model/version`) instead"))


class ProcessRequest(BaseModel):
    """``POST /process``: a replay (re-featurization) into a namespace, or the promotion of one."""

    model_config = ConfigDict(extra="forbid", strict=True)  # JSON true is no version 1, "yes" no boolean

    action: Literal["replay", "promote"] = Field(description=(
        "replay: re-featurize the raw topic over [start, end) into `namespace`; promote: make `namespace` the "
        "live batches (admin scope)"))
    kind: Literal["weblog", "sensor", "image"]
    namespace: str = Field(pattern=NAMESPACE_PATTERN, description="the namespace written (replay) or promoted")
    start: str | None = Field(None, max_length=64, description=f"replay from this record time: {TIME_HELP}")
    end: str | None = Field(None, max_length=64, description=f"replay up to (not including) this time: {TIME_HELP}")
    from_beginning: bool = Field(False, description="replay from each partition's earliest offset")


def parse_body(model: type[BaseModel], value: Any) -> Any:
    """``model`` from a parsed JSON body; a 400 naming the first bad field."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise BadRequestError(f"{where}: {err['msg']}; see the schema in /openapi.json") from None


def parse_when(text: str | None, name: str, *, event_time: bool = False) -> int | None:
    """Epoch ms of a time parameter: bare digits are epoch ms; anything else as ``streaming.timeargs``.

    ``event_time`` (the /query bounds): times before 1970 are kept, and a bare negative number is
    epoch ms too, since backfilled rows go back to 1678; a replay's record times start at 0."""
    if text is None or text == "":
        return None
    text = text.strip()
    if re.fullmatch(r"-?[0-9]{1,15}" if event_time else r"[0-9]{1,15}", text):
        return int(text)
    if re.fullmatch(r"[0-9]{16,}", text):  # parse_time's advice ("say its unit") contradicts the HTTP rule
        raise BadRequestError(f"{name}: {text[:40]} has over 15 digits; over HTTP a bare number is epoch "
                              "milliseconds (13 digits today), or give a time with its unit or as ISO 8601")
    try:
        return parse_time(text, flag=name, event_time=event_time)
    except TimeArgError as exc:
        raise BadRequestError(f"{exc}; over HTTP a bare number is epoch milliseconds") from None


def tenant_settings(settings: Settings, tenant: str) -> Settings:
    """The settings a tenant's job or query runs with (see the module docstring)."""
    if not tenant:
        return settings
    base = Path(settings.home) / "tenants" / tenant
    # A columnar directory set for the API is the operator's: each tenant gets its own folder under it
    # (it was one copy for all, so every tenant's /query read every tenant's rows).
    columnar = {"columnar_dir": Path(settings.columnar_dir) / "tenants" / tenant} if settings.columnar_dir else {}
    return settings.with_(tenant=tenant, feature_store=base / "features", model_dir=base / "models", **columnar)


def own_model(principal: Principal, name: str) -> str:
    """The model name inside the principal's tenant: ``acme.churn`` -> ``churn`` for tenant acme.

    Ownership itself is checked by the key table before this; here a tenant key's name must carry
    its prefix, and the default tenant's names are used as they are.
    """
    if principal.tenant:
        prefix = f"{principal.tenant}."
        if not name.startswith(prefix):
            raise BadRequestError(f"model: {name!r} is not under your tenant; name it {prefix}<model>")
        return name[len(prefix):]
    if principal.all_tenants and "." in name:
        raise BadRequestError("model: an operator key names the default tenant's models only (for jobs and "
                              "queries); use a tenant's key for a tenant's model")
    return name


@dataclass(frozen=True)
class JobSpec:
    """What the runner needs to start a job."""

    kind: str
    resource: str
    args: dict[str, Any]
    argv: list[str]


def train_job(req: TrainRequest, model: str) -> JobSpec:
    if req.reproduce_version is not None:
        argv = ["retrain", "--reproduce", f"{model}/{req.reproduce_version}"]
    else:
        argv = ["train", model, "--once", "--namespace", req.namespace]
    return JobSpec("train", f"model:{model}", req.model_dump(), argv)


def process_job(req: ProcessRequest) -> JobSpec:
    resource = f"namespace:{req.kind}/{req.namespace}"
    if req.action == "promote":
        if req.start or req.end or req.from_beginning:
            raise BadRequestError("start/end/from_beginning: a promote takes kind and namespace only")
        argv = ["store", "promote", req.kind, "--from", req.namespace, "--json"]
        return JobSpec("promote", resource, req.model_dump(), argv)
    if req.namespace == "live":
        raise BadRequestError("namespace: a replay writes a new namespace, not 'live'; promote it afterwards")
    start, end = parse_when(req.start, "start"), parse_when(req.end, "end")
    if (start is None) == (not req.from_beginning):
        raise BadRequestError("start: give start (a time) or from_beginning=true, not both and not neither")
    if start is not None and end is not None and end <= start:
        raise BadRequestError(f"end: {end} ms is not after start {start} ms; give a non-empty time range")
    argv = ["replay", req.kind, "--into", req.namespace, "--progress-interval", "2"]
    argv += ["--from-beginning"] if req.from_beginning else ["--from-timestamp", f"{start}ms"]
    if end is not None:
        argv += ["--to", f"{end}ms"]
    return JobSpec("replay", resource, {**req.model_dump(), "start_ms": start, "end_ms": end}, argv)
