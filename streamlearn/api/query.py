"""``GET /query``: feature rows and predictions from the columnar store (``streaming.query``).

The query engine is imported when a query arrives, not when the app is built: the control API's
jobs work without it, and an installation without it answers 501 naming what is missing instead of
failing at start-up. A query runs in a worker thread (it reads Parquet files), at most
:data:`MAX_CONCURRENT_QUERIES` at once (429 beyond), bounded by the engine's own
``QueryLimits.from_settings`` (rows, scanned rows, bytes, time): a query over a limit is a 413
whose message names the setting.

Formats by ``Accept``: JSON (default, ``application/json``), Arrow IPC stream
(``application/vnd.apache.arrow.stream``) or Parquet (``application/vnd.apache.parquet`` or
``application/x-parquet``); anything else is 406. Pagination: ``limit`` rows a page, and the
``next_cursor`` of a page (JSON body, or the ``X-Next-Cursor`` header of Arrow/Parquet answers) as
``cursor`` of the next request.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from schemas.access import Principal
from streaming.config import Settings
from streaming.exceptions import ColumnarChangedError
from streamlearn.api.exceptions import (
    BadRequestError,
    NotAcceptableError,
    RetryLaterError,
    TooLargeError,
    TooManyJobsError,
    UnavailableError,
)
from streamlearn.api.requests import parse_when, tenant_settings

MAX_CONCURRENT_QUERIES = 4
ARROW = "application/vnd.apache.arrow.stream"
PARQUET = "application/vnd.apache.parquet"
_FORMATS = {"application/json": "json", "application/*": "json", "*/*": "json", ARROW: "arrow",
            PARQUET: "parquet", "application/x-parquet": "parquet"}


def negotiate(accept: str | None) -> str:
    """``json`` | ``arrow`` | ``parquet`` for an ``Accept`` header (first listed match wins; q ignored)."""
    if accept is None or not accept.strip():
        return "json"
    for part in accept.split(",")[:16]:
        media = part.split(";", 1)[0].strip().lower()
        if media in _FORMATS:
            return _FORMATS[media]
    raise NotAcceptableError(f"Accept {accept[:80]!r}: answers are application/json (default), {ARROW} or {PARQUET}")


def engine() -> Any:
    """The ``streaming.query`` module, or 501 when this installation has no columnar store."""
    try:
        return importlib.import_module("streaming.query")
    except ImportError as exc:
        raise UnavailableError(f"this installation has no columnar query engine (streaming.query: {exc}); "
                               "install a streamlearn with the columnar store") from None


class FairSlots:
    """``total`` slots shared by every caller; with ``shared`` (keys of more than one tenant) one tenant holds
    at most ``total - 1`` of them, so another tenant always finds one. Why: four loops of one tenant's slow
    query answered 142 of another tenant's 143 queries 429."""

    def __init__(self, total: int, shared: bool = False) -> None:
        self.total = total
        self.per_tenant = max(1, total - 1) if shared else total
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, tenant: str) -> str | None:
        """Take a slot for ``tenant``; None when taken, else why not."""
        with self._lock:
            if sum(self._held.values()) >= self.total:
                return f"{self.total} queries are running"
            if self._held.get(tenant, 0) >= self.per_tenant:
                return f"your tenant runs {self.per_tenant} queries already (one slot is kept for other tenants)"
            self._held[tenant] = self._held.get(tenant, 0) + 1
            return None

    def release(self, tenant: str) -> None:
        with self._lock:
            left = self._held.get(tenant, 0) - 1
            if left > 0:
                self._held[tenant] = left
            else:
                self._held.pop(tenant, None)


class QueryService:
    """Runs queries for the routes: bounded concurrency (fair between tenants), errors mapped to HTTP statuses."""

    def __init__(self, settings: Settings, *, tenants: int = 0) -> None:
        self.settings = settings
        # tenants: how many tenants the keys name besides the default one; more than one tenant shares
        self._slots = FairSlots(MAX_CONCURRENT_QUERIES, shared=tenants >= 1)

    async def answer(self, request: Request, principal: Principal, params: dict[str, Any]) -> Response:
        fmt = negotiate(request.headers.get("accept"))
        q = engine()
        what = params["what"]
        settings = tenant_settings(self.settings, principal.tenant)
        limits = q.QueryLimits.from_settings(settings)
        common = {"start_ms": parse_when(params.get("start"), "start", event_time=True),
                  "end_ms": parse_when(params.get("end"), "end", event_time=True),
                  "limit": params["limit"], "cursor": params.get("cursor"), "limits": limits}
        if what == "features":
            if not params.get("kind"):
                raise BadRequestError("kind: required for what=features (weblog, sensor or image)")
            call = {"kind": params["kind"], "namespace": params.get("namespace") or "live",
                    "key": params.get("key"), "batch": params.get("batch"), **common}
            run = q.query_features
        else:
            if not params.get("model"):
                raise BadRequestError("model: required for what=predictions")
            call = {"model": params["model"], "version": params.get("version"),
                    "request_id": params.get("request_id"), **common}
            run = q.query_predictions
        busy = self._slots.acquire(principal.tenant)
        if busy is not None:
            raise TooManyJobsError(f"{busy}; retry shortly", retry_after=1)
        try:
            page = await run_in_threadpool(lambda: run(settings, **call))
            body = await run_in_threadpool(_render, page, fmt)
        except q.QueryTooLargeError as exc:
            raise TooLargeError(str(exc)) from None
        except q.QueryError as exc:
            raise BadRequestError(str(exc)) from None
        except (ColumnarChangedError, FileNotFoundError) as exc:  # a compaction rebuilt the copy meanwhile
            raise RetryLaterError(f"the columnar copy was rebuilt while this query read it; repeat the query "
                                  f"({str(exc)[:300]})", retry_after=1) from None
        finally:
            self._slots.release(principal.tenant)
        headers = {"X-Next-Cursor": page.next_cursor} if page.next_cursor else {}
        headers["X-Scanned-Rows"] = str(page.scanned_rows)
        media = {"json": "application/json", "arrow": ARROW}.get(fmt, PARQUET)
        return Response(body, media_type=media, headers=headers)


def _render(page: Any, fmt: str) -> bytes:
    """The page's body, built in the worker thread (a JSON page is encoded there too, column-wise:
    ``QueryPage.to_json_bytes``, not by ``JSONResponse`` on the event loop)."""
    if fmt == "arrow":
        body: bytes = page.to_arrow_ipc()
    elif fmt == "parquet":
        body = page.to_parquet()
    else:
        body = page.to_json_bytes()
    return body
