"""Admission control of the ingest gateway: body size, per-token rate, in-flight records, idempotency.

Why each exists:

* :class:`BodyLimitMiddleware` answers 413 before a large body is held in memory. It is a raw ASGI
  middleware so it sees the bytes as they arrive: it refuses at once on a ``Content-Length`` over
  the limit, and for chunked uploads (no length) it counts bytes and stops at the first chunk that
  crosses the limit.
* :class:`RateLimiter` is one token bucket per principal, in records/s with a burst, so one client
  cannot starve the others.
* :class:`InFlightLimiter` bounds records handed to the producer but not yet acked. When Kafka is
  slower than the clients, new requests get 503 + ``Retry-After`` immediately instead of queueing
  without bound in the producer buffer (memory) or in the event loop (latency).
* :class:`OnceMap` is the bounded, TTL'd memory of idempotency keys: event ids (value = where the
  event was acked) and request ``Idempotency-Key`` s (value = the stored response). A key is
  recorded as done only after the ack; a key whose first publish is still in flight is "pending" and
  later claimants wait for that outcome instead of publishing again.

Every class here is thread-safe: records are published from worker threads and their acks arrive
on the Kafka producer's I/O thread.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from ingest.gateway.errors import OverloadedError, RateLimitedError
from schemas.httpguard import BodyLimitMiddleware as GuardedBodyMiddleware
from schemas.httpguard import ByteBudget, send_error

V = TypeVar("V")
Clock = Callable[[], float]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TokenBucket:
    """A token bucket of ``rate`` tokens/s holding at most ``burst`` tokens, starting full.

    A request for ``n`` records needs ``min(n, burst)`` tokens present and then takes all ``n``
    (the bucket may go negative). Why debt instead of refusing ``n > burst`` outright: a batch larger
    than the burst would otherwise never pass, yet the long-run rate still holds because the debt
    is paid back before the next request passes.
    """

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def wait_time(self, n: int = 1) -> float:
        """Seconds until ``n`` records could pass; 0 when they can pass now. Takes nothing."""
        self._refill()
        need = min(float(n), self.burst)
        return 0.0 if self._tokens >= need else (need - self._tokens) / self.rate

    def try_take(self, n: int) -> float:
        """Take ``n`` tokens and return 0, or take nothing and return the seconds to wait."""
        wait = self.wait_time(n)
        if wait == 0.0:
            self._tokens -= n
        return wait


class RateLimiter:
    """One :class:`TokenBucket` per principal name; ``rate <= 0`` disables limiting."""

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, name: str) -> TokenBucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = TokenBucket(self.rate, self.burst, self._clock)
        return bucket

    def check(self, name: str) -> None:
        """Refuse early (before the body is read) when not even one record could pass."""
        if self.rate <= 0:
            return
        with self._lock:
            wait = self._bucket(name).wait_time(1)
        if wait > 0:
            raise self._error(wait)

    def take(self, name: str, n: int) -> None:
        """Charge ``n`` records to ``name``'s bucket or raise :class:`RateLimitedError` (429)."""
        if self.rate <= 0 or n <= 0:
            return
        with self._lock:
            wait = self._bucket(name).try_take(n)
        if wait > 0:
            raise self._error(wait)

    def _error(self, wait: float) -> RateLimitedError:
        return RateLimitedError(
            f"rate limit of {self.rate:g} records/s (burst {self.burst:g}) for this token is spent; "
            f"retry after {math.ceil(wait)} s or send smaller batches",
            retry_after=max(1, math.ceil(wait)),
        )


class InFlightLimiter:
    """Counts records handed to the producer and not yet acked (or failed), across all requests.

    Admission is checked when a request arrives: once ``count >= limit`` every new request gets 503.
    An admitted request then adds its records, so the count may overshoot by at most one request's
    batch; that bound is what keeps the check O(1) and free of queueing.
    """

    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None) -> None:
        if limit < 0:
            raise ValueError(f"max_in_flight must be >= 0, got {limit}")
        self.limit = limit
        self._count = 0
        self._lock = threading.Lock()
        self._on_change = on_change

    @property
    def count(self) -> int:
        return self._count

    def admit(self) -> None:
        """Raise :class:`OverloadedError` (503) when the producer is already behind."""
        if self._count >= self.limit:
            raise OverloadedError(
                f"{self._count} records are waiting for Kafka acknowledgements (limit {self.limit}); "
                "retry shortly",
                retry_after=1,
            )

    def add(self, n: int) -> None:
        self._change(n)

    def release(self, n: int = 1) -> None:
        self._change(-n)

    def _change(self, delta: int) -> None:
        with self._lock:
            self._count += delta
            count = self._count
        if self._on_change is not None:
            self._on_change(count)


Claim = tuple[Literal["new", "pending", "done"], Any]


class OnceMap(Generic[V]):
    """Bounded (LRU by completion order) and TTL'd map of keys whose work is done, plus keys in flight.

    ``claim(key)`` answers one of:

    * ``("new", None)``: the caller owns the key and must later call :meth:`complete` or
      :meth:`abandon`. The future other claimants wait on is made when the first of them comes: a
      ``Future`` builds a ``Condition``, and most keys (one per event) never get a second claimant.
    * ``("pending", future)``: someone else owns it; ``future`` resolves to their value or raises.
    * ``("done", value)``: finished within the window; ``value`` is what :meth:`complete` stored.

    The window is per process and bounded by ``capacity`` and ``ttl_s``: a restart or an evicted key
    forgets, and the same event sent again after that is published again (at-least-once).
    """

    def __init__(self, capacity: int, ttl_s: float, clock: Clock = time.monotonic, *,
                 max_bytes: int | None = None, size: Callable[[V], int] | None = None) -> None:
        """``max_bytes`` with ``size`` (a value's bytes) bounds the stored values' bytes too, evicting the
        oldest: a count alone let 10,000 stored answers of 10,000 results each grow to gigabytes."""
        if capacity < 1 or ttl_s <= 0:
            raise ValueError(f"capacity must be >= 1 and ttl_s > 0, got {capacity}, {ttl_s}")
        if (max_bytes is None) != (size is None):
            raise ValueError("max_bytes and size go together")
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.max_bytes, self._size = max_bytes, size
        self.bytes = 0
        self._clock = clock
        self._done: OrderedDict[Any, tuple[float, V]] = OrderedDict()
        self._pending: dict[Any, Future[V] | None] = {}  # None: owned, nobody waiting yet
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._done)

    def _expire(self, now: float) -> None:
        while self._done:
            key, (expires, _) = next(iter(self._done.items()))
            if expires > now:
                break
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, (_, value) = self._done.popitem(last=False)
        if self._size is not None:
            self.bytes -= self._size(value)

    def claim(self, key: Any) -> Claim:
        with self._lock:
            self._expire(self._clock())
            if key in self._done:
                return "done", self._done[key][1]
            if key in self._pending:
                pending = self._pending[key]
                if pending is None:
                    pending = self._pending[key] = Future()
                return "pending", pending
            self._pending[key] = None
            return "new", None

    def done_value(self, key: Any) -> V | None:
        """The stored value of a finished key, or None; claims nothing."""
        with self._lock:
            self._expire(self._clock())
            entry = self._done.get(key)
        return None if entry is None else entry[1]

    def complete(self, key: Any, value: V) -> None:
        """Record ``key`` as done with ``value`` and wake its waiters."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            if key in self._done:  # completed again: its old value's bytes leave first
                self._done.move_to_end(key, last=False)
                self._drop_oldest()
            self._done[key] = (now + self.ttl_s, value)
            if self._size is not None:
                self.bytes += self._size(value)
            while len(self._done) > self.capacity or (self.max_bytes is not None and self.bytes > self.max_bytes
                                                      and self._done):
                self._drop_oldest()
            future = self._pending.pop(key, None)
        if future is not None and not future.done():
            future.set_result(value)

    def abandon(self, key: Any, error: BaseException) -> None:
        """Forget an in-flight key whose work failed, so a retry may try again; waiters get ``error``."""
        with self._lock:
            future = self._pending.pop(key, None)
        if future is not None and not future.done():
            future.set_exception(error)


async def send_json_error(send: Send, status: int, message: str,
                          headers: dict[str, str] | None = None) -> None:
    """Answer a request from raw ASGI with ``{"error": message}``."""
    await send_error(send, status, {"error": message}, headers)


class BodyLimitMiddleware(GuardedBodyMiddleware):
    """The shared body guard (:class:`schemas.httpguard.BodyLimitMiddleware`) with the gateway's wording.

    ``on_reject(path, status)`` lets the app count refusals it never sees as a route; ``budget`` is
    the process-wide bound of body bytes held at once (503 beyond it).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, on_reject: Callable[[str, int], None] | None = None,
                 budget: ByteBudget | None = None, body_timeout_s: float = 30.0) -> None:
        super().__init__(app, max_body_bytes, budget=budget, body_timeout_s=body_timeout_s,
                         on_reject=on_reject, what="gateway")


@dataclass(frozen=True)
class GatewayLimits:
    """Admission limits. Defaults where the issue was silent; every one is a ``serve`` flag.

    Defined here, not in ``ingest.gateway``, so the CLI can build ``serve``'s flags without importing
    FastAPI: every `streamlearn` command (and every worker restart) would pay for it.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    max_records_per_request: int = 10_000
    rate_records_per_s: float = 10_000.0  # per token; <= 0 disables rate limiting
    burst_records: float = 20_000.0
    max_in_flight: int = 50_000  # un-acked records across all requests before 503
    ack_timeout_s: float = 30.0
    idempotency_capacity: int = 500_000
    idempotency_ttl_s: float = 24 * 3600.0
    request_key_capacity: int = 10_000
    #: Bytes of stored Idempotency-Key answers (their rendered JSON), oldest evicted first: an evicted
    #: key's request is run again if resent, and its events are still deduplicated by their own ids.
    request_key_max_bytes: int = 64 * 1024 * 1024
    body_budget_bytes: int = 128 * 1024 * 1024  # body bytes held at once (x2 per body), all requests; 503 beyond
    max_json_depth: int = 32
    containers_per_record: int = 8  # arrays/objects a record may use (sensor values, weblog fields)
    tenant_rate_records_per_s: float = 0.0  # per tenant across its keys; <= 0: no tenant quota

    @property
    def max_containers(self) -> int:
        return self.max_records_per_request * self.containers_per_record + 64
