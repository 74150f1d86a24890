"""Guards every streamlearn HTTP server shares: body bytes, JSON shape, slow clients, rate buckets.

Why here, in ``schemas``: the registry REST server (``schemas/server.py``) needs them as much as the
gateway and serving HTTP do, and nothing may import upward. Each guard refuses a request *before*
the expensive step it protects:

* :class:`BodyLimitMiddleware` refuses a body over the size limit as its bytes arrive (413), counts
  every body being received or held (twice its size: chunks plus the joined copy) against one
  process-wide :class:`ByteBudget` (503 when the budget is spent, so N concurrent large bodies cannot
  add up), and times out a body that trickles in (408).
* :func:`scan_json` measures nesting depth, container count and top-level elements of a JSON body
  with numpy, without building it, so ``[[],[],...]`` of 16 MB or 100k levels of ``[`` are refused
  by shape before ``json.loads`` allocates anything.
* :func:`server_config` builds the uvicorn config with a header-read deadline (uvicorn itself only
  times out idle keep-alive connections, not a client that sends one header byte a second), a
  concurrency cap and a header size cap.
* :class:`RateBuckets` is one token bucket per key (tenant quotas).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from starlette.requests import ClientDisconnect

from schemas.exceptions import StreamlearnError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
ErrorBody = Callable[[int, str], dict[str, Any]]


class GuardError(StreamlearnError):
    """A request refused by a guard; ``status`` is the HTTP answer, ``retry_after`` seconds or None."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after

    def __repr__(self) -> str:
        return f"GuardError({self.status}, {self.message!r})"


def tf_error(_: int, message: str) -> dict[str, Any]:
    """TF Serving's and the gateway's error shape."""
    return {"error": message}


# -- JSON shape before parsing -------------------------------------------------------------------
@dataclass(frozen=True)
class JsonShape:
    depth: int  # deepest nesting of arrays/objects
    containers: int  # arrays + objects
    top_level: int  # elements of a top-level array (1 for anything else)


_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_FIRST = re.compile(rb"[^ \t\r\n]")
_CHUNK = 1 << 20
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def scan_json(body: bytes) -> JsonShape:
    """Depth, container count and top-level element count of ``body`` (need not be valid JSON).

    Strings are skipped (escapes removed first, then quotes toggle "inside a string"), so brackets
    in string values do not count. Works in 1 MiB chunks so the temporaries stay small.
    """
    data = _ESCAPE.sub(b"", body) if b"\\" in body else body
    depth = max_depth = containers = commas = 0
    inside = False
    first = _FIRST.search(data)  # no slicing: a slice of a 16 MB body is a 16 MB copy
    top_is_array = first is not None and first.group() == b"["
    second = _FIRST.search(data, first.end()) if first is not None and top_is_array else None
    any_element = second is not None and second.group() != b"]"
    for start in range(0, len(data), _CHUNK):
        arr = np.frombuffer(data, dtype=np.uint8, count=min(_CHUNK, len(data) - start), offset=start)
        quotes = arr == ord('"')
        parity = np.cumsum(quotes, dtype=np.int32) % 2  # after each char: odd = inside a string
        in_string = (parity == 1) if not inside else (parity == 0)
        in_string |= quotes  # the quote chars themselves are not structure
        delta = _OPEN[arr].astype(np.int32)
        delta[in_string] = 0
        levels = depth + np.cumsum(delta, dtype=np.int32)
        if levels.size:
            max_depth = max(max_depth, int(levels.max()))
            containers += int(np.count_nonzero(delta == 1))
            if top_is_array:
                commas += int(np.count_nonzero((arr == ord(",")) & ~in_string & (levels == 1)))
            depth = int(levels[-1])
        inside = inside ^ bool(int(np.count_nonzero(quotes)) % 2)
    top = commas + 1 if any_element else (0 if top_is_array else 1)
    return JsonShape(max_depth, containers, top)


def check_json_shape(body: bytes, *, max_depth: int, max_containers: int, what: str = "body") -> JsonShape:
    """:func:`scan_json`, raising :class:`GuardError` (400 too deep, 413 too many containers)."""
    shape = scan_json(body)
    if shape.depth > max_depth:
        raise GuardError(400, f"{what}: JSON nested {shape.depth} levels deep, over the limit of {max_depth}; "
                              "flatten the request")
    if shape.containers > max_containers:
        raise GuardError(413, f"{what}: {shape.containers} JSON arrays/objects, over the limit of "
                              f"{max_containers}; send fewer or smaller records per request")
    return shape


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON; send finite numbers")


def loads_guarded(body: bytes, *, max_depth: int, max_containers: int, what: str = "body",
                  object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """``json.loads`` after :func:`check_json_shape`; NaN/Infinity refused; 400 on bad JSON, including what
    ``object_pairs_hook`` refuses with ValueError (``streaming.limits.unique_keys``: a key named twice)."""
    check_json_shape(body, max_depth=max_depth, max_containers=max_containers, what=what)
    try:
        return json.loads(body, parse_constant=_reject_constant, object_pairs_hook=object_pairs_hook)
    except (ValueError, RecursionError) as exc:
        raise GuardError(400, f"{what}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); "
                                  "send UTF-8 JSON") from exc


# -- body bytes ----------------------------------------------------------------------------------
class ByteBudget:
    """Bytes of request bodies being received or held, across every request of a process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used = max(0, self.used - n)


async def send_error(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    """Answer from raw ASGI with a JSON body and ``Connection: close``."""
    raw = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                   (b"connection", b"close")]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": raw, "more_body": False})


class BodyLimitMiddleware:
    """Raw ASGI middleware: 413 over ``max_body_bytes``, 503 over the shared budget, 408 on a slow body,
    415 for a compressed body (``Content-Encoding`` other than identity).

    ``Content-Length`` is checked against the limit before the app runs; every body is counted and
    reserved from the budget chunk by chunk as it arrives (a declared length costs nothing until its
    bytes come). The reservation is returned when the request is answered, so a body the app still
    holds (parsing, publishing) keeps counting.
    """

    #: Bytes a received body costs: Starlette keeps the chunks and then joins them into one copy.
    COPIES = 2

    def __init__(self, app: ASGIApp, max_body_bytes: int, *, budget: ByteBudget | None = None,
                 body_timeout_s: float = 30.0, error_body: ErrorBody = tf_error,
                 on_reject: Callable[[str, int], None] | None = None, what: str = "server") -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.budget = budget
        self.body_timeout_s = body_timeout_s
        self.error_body = error_body
        self.on_reject = on_reject
        self.what = what

    def too_large_message(self) -> str:
        return (f"request body is larger than the {self.what} limit of {self.max_body_bytes} bytes; "
                "split the batch into smaller requests")

    async def _refuse(self, scope: Scope, send: Send, error: GuardError) -> None:
        if self.on_reject is not None:
            self.on_reject(str(scope.get("path", "")), error.status)
        headers = {"Retry-After": str(math.ceil(error.retry_after))} if error.retry_after else None
        await send_error(send, error.status, self.error_body(error.status, error.message), headers)

    def _busy(self) -> GuardError:
        limit = self.budget.limit if self.budget else 0
        return GuardError(503, f"the {self.what} holds {limit} bytes of request bodies already; retry shortly",
                          retry_after=1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, budget = self.max_body_bytes, self.budget
        reserved = 0
        for name, value in scope.get("headers", []):
            if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                # Not decompressed (no gzip bomb to bound): read as it is, a gzip body was answered 400 "not
                # valid UTF-8 JSON" by every server, which named the wrong problem.
                coding = value.decode("latin-1").strip().lower()
                await self._refuse(scope, send, GuardError(
                    415, f"Content-Encoding {coding!r:.40} is not accepted; send the body uncompressed (the "
                         "request size limit applies to it as sent)"))
                return
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._refuse(scope, send, GuardError(400, "Content-Length header is not an integer"))
                    return
                if declared > limit:
                    await self._refuse(scope, send, GuardError(413, self.too_large_message()))
                    return
                # Nothing is reserved for a declared length: bytes count as they arrive. Reserving it up
                # front let a few connections that sent headers only (Content-Length: 16 MiB, no body) hold
                # the whole budget for the body timeout, and every other client got 503 meanwhile.
        received = 0
        started = False
        deadline: float | None = None  # the whole body, from its first read: 1 byte a minute does not reset it

        body_done = False

        async def counting_receive() -> Message:
            nonlocal received, reserved, deadline, body_done
            if body_done:  # e.g. waiting for a disconnect: no body deadline any more
                return await receive()
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self.body_timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError as exc:
                raise GuardError(408, f"the request body did not arrive within {self.body_timeout_s:g} s; "
                                      "send it at once") from exc
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > limit:
                    raise GuardError(413, self.too_large_message())
                if budget is not None and received * self.COPIES > reserved:
                    if not budget.take(received * self.COPIES - reserved):
                        raise self._busy()
                    reserved = received * self.COPIES
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except GuardError as exc:
            if started:
                raise
            await self._refuse(scope, send, exc)
        except ClientDisconnect:
            # The client went away before its body was whole (a short body and a half-close, a dropped
            # connection): nobody is left to answer, and it is not the server's error. It was a
            # 40-line "Exception in ASGI application" traceback per request.
            log.info("%s %s: the client disconnected after %d of its body's bytes; nothing was done",
                     scope.get("method", "?"), str(scope.get("path", ""))[:200], received)
        finally:
            if budget is not None and reserved:
                budget.give(reserved)


class StatusCounting:
    """Raw ASGI middleware: ``count(route template, status)`` once per answered request (bounded labels).

    Raw ASGI, not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs the app in a task
    group, so a :class:`GuardError` raised while the body is read (a chunked body over the limit, a slow
    body) reached :class:`BodyLimitMiddleware` wrapped in an ExceptionGroup, missed its handler and was
    answered 500 instead of 413/408 (the control API). Refusals of ``passthrough`` types are left to the
    middleware that answers them (and counts them there).
    """

    def __init__(self, app: ASGIApp, count: Callable[[str, int], None],
                 passthrough: tuple[type[BaseException], ...] = (GuardError,)) -> None:
        self.app, self.count, self.passthrough = app, count, passthrough

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except self.passthrough:
            raise
        except Exception:
            status = status or 500
            raise
        finally:
            if status:
                self.count(getattr(scope.get("route"), "path", None) or "unmatched", status)


# -- rate buckets --------------------------------------------------------------------------------
class RateBuckets:
    """One token bucket per key (``rate`` units/s, ``burst`` size); ``rate <= 0`` disables it.

    A take of ``n`` needs ``min(n, burst)`` tokens present and then takes all ``n`` (debt), so a
    batch larger than the burst can pass while the long-run rate still holds.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, max(burst, 1.0), clock
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, n: float, what: str = "requests") -> None:
        """Charge ``n`` to ``key`` or raise :class:`GuardError` 429 with the seconds to wait."""
        if self.rate <= 0 or n <= 0:
            return
        with self._lock:
            now = self._clock()
            tokens, stamp = self._state.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - stamp) * self.rate)
            need = min(float(n), self.burst)
            if tokens < need:
                self._state[key] = (tokens, now)
                wait = (need - tokens) / self.rate
                raise GuardError(429, f"quota of {self.rate:g} {what}/s (burst {self.burst:g}) is spent; retry "
                                      f"after {math.ceil(wait)} s", retry_after=max(1, math.ceil(wait)))
            self._state[key] = (tokens - n, now)


# -- uvicorn -------------------------------------------------------------------------------------
#: Seconds a client has to send a request's complete headers.
HEADER_TIMEOUT_S = 10.0


def _protocol_class(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline for the request head (slow-header clients)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.cycle is None or self.cycle.response_complete:
                if not self.transport.is_closing():
                    self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # the head arrived; the body has its own deadline (BodyLimitMiddleware)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.our_state is not h11.MUST_CLOSE:
                self._arm()

    return GuardedH11Protocol


def server_config(app: Any, *, host: str | None = None, port: int | None = None,
                  header_timeout_s: float = HEADER_TIMEOUT_S, limit_concurrency: int = 256,
                  log_level: str = "warning", access_log: bool = False,
                  lifespan: Literal["auto", "on", "off"] = "auto") -> Any:
    """A ``uvicorn.Config`` with the guards every streamlearn server uses.

    ``limit_concurrency`` answers 503 beyond that many connections + tasks; the head of a request
    is capped at 64 KiB and must arrive within ``header_timeout_s``; an idle keep-alive connection
    is closed after 5 s.
    """
    import uvicorn

    kwargs: dict[str, Any] = {}
    if host is not None:
        kwargs["host"] = host
    if port is not None:
        kwargs["port"] = port
    return uvicorn.Config(app, http=_protocol_class(header_timeout_s), limit_concurrency=limit_concurrency,
                          h11_max_incomplete_event_size=64 * 1024, timeout_keep_alive=5,
                          log_level=log_level, access_log=access_log, server_header=False, lifespan=lifespan,
                          **kwargs)


class ThreadedServer:
    """uvicorn with :func:`server_config`'s guards in a daemon thread: the one way every streamlearn
    HTTP surface (registry, gateway, serving) runs in-process.

    Why one home: the listening socket is bound in ``__init__``, before the thread starts, so a busy
    port fails at once with ``OSError`` and ``port=0`` is read back without a race; ``start`` waits
    (bounded) for uvicorn's own ``started`` flag rather than for a guessed delay.
    """

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, name: str = "http",
                 **config: Any) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.host, self.port = host, int(self.sock.getsockname()[1])
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(server_config(app, **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"{name}:{self.port}", daemon=True)

    def start(self, timeout_s: float) -> bool:
        """Start the thread; True once uvicorn listens, False (and asked to exit) when it died or
        did not start within ``timeout_s``."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                return False
            time.sleep(0.01)  # bounded poll of a flag set by uvicorn's own thread
        return True

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout_s)
        self.sock.close()
