"""HTTP ingest gateway: events over HTTP into the raw topics, answered only after Kafka acked them.

Routes (OpenAPI at ``/openapi.json``, UI at ``/docs``):

* ``POST /ingest/{kind}`` (kind: weblog, sensor, image). Body: one JSON object or a JSON array of
  objects (``application/json``; image ``data`` is base64), or one Confluent-framed Avro record
  (``application/vnd.streamlearn.avro`` or ``application/octet-stream``) whose writer schema's
  record name must match the kind.
* ``POST /ingest/images``: multipart upload of one or more image files (+ optional ``label``).
* ``GET /healthz`` (the producer can fetch Kafka metadata) and ``GET /metrics`` (Prometheus).

Answer: ``{"results": [{"index", "status": accepted|duplicate|rejected, "error"?, "id", "topic",
"partition", "offset"}], "accepted", "duplicates", "rejected"}`` with 200 when nothing was rejected,
207 when some records were, 422 when none was valid, 400 when the body as a whole is unusable.
Rejected records are dead-lettered (original bytes, reason headers, ``dl.stage=gateway``). A record
Kafka did not acknowledge is reported ``rejected`` with ``"retryable": true`` and the whole answer
is 503 + ``Retry-After``: resend it, the idempotency keys make that safe.

Order of admission, cheapest first, so a refused request costs almost nothing: body size by
``Content-Length`` and the process-wide budget of body bytes held (413/503, raw ASGI middleware,
before auth) -> key (401/403) -> the key's scope ``ingest.<kind>`` (403) -> rate budget not empty
(429) -> in-flight records under the limit (503) -> body read while counting bytes (413/408) ->
JSON shape scanned without parsing (depth, arrays/objects, top-level elements) -> rate charge for
those elements, also when the body is then refused (429) -> shape limits (400/413) ->
``Idempotency-Key`` replay -> parse -> publish and wait.

Tenants (docs/SECURITY.md): a key of tenant ``acme`` publishes into ``<prefix>acme.<kind>.raw``;
rate limits are per key and, with ``ingest_tenant_rate``, per tenant.

Idempotency window: per key (a key can only ever dedupe its own events, so one key holder cannot
make another's event a "duplicate"), per gateway process, in memory, bounded (``GatewayLimits.idempotency_capacity``
keys, ``idempotency_ttl_s``). By default it is NOT seeded from the topic: a restart, or more distinct
events than the capacity within the TTL, forgets keys, and a resend is then published again
(consumers dedupe by event id downstream). ``Gateway.seed_idempotency(window_s)`` (CLI
``--idempotency-seed-minutes``) re-reads the last minutes of the raw topics at start-up so a restart
keeps the events acked in that window; request-level ``Idempotency-Key`` answers are never seeded.
Event keys: weblog ``event_id`` (derived from the content when absent), sensor
``event_id`` or ``sensor_id:timestamp``, image ``image_id`` (sha256 of the bytes when absent). A key
is remembered only after its ack; while in flight, a second sender waits for the first outcome.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future as ConcurrentFuture
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Path, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from kafka.errors import KafkaError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ingest.exceptions import InputRejectedError
from ingest.gateway_auth import Principal, gateway_keys
from ingest.gateway_errors import (
    BadRequestError,
    GatewayError,
    IdempotencyConflictError,
    OverloadedError,
    PayloadTooLargeError,
    RateLimitedError,
    UnsupportedMediaTypeError,
)
from ingest.gateway_limits import BodyLimitMiddleware, GatewayLimits, InFlightLimiter, OnceMap, RateLimiter
from ingest.gateway_metrics import GatewayMetrics, RequestMetrics
from ingest.gateway_records import (
    AVRO_TYPES,
    AvroBodies,
    Item,
    TimeRules,
    describe,
    event_key,
    fingerprint,
    image_file_item,
    is_json,
    media_type,
    now_ms,
    parse_json_body,
)
from schemas.exceptions import RegistryUnavailableError, SchemaError
from schemas.httpguard import ByteBudget, GuardError, JsonShape, RateBuckets, scan_json
from schemas.registry import SchemaRegistry
from streaming.config import Settings
from streaming.exceptions import RecordTooLargeError
from streaming.producer import KEY_FIELDS, Publisher
from streaming.topics import KINDS, raw_topic

log = logging.getLogger(__name__)

Stored = tuple[str, int, dict[str, Any]]  # request fingerprint, status, body
_EPOCH_MS = re.compile(r"[0-9]{1,15}")
#: Owner of idempotency keys re-read from the raw topics at start-up (no key is recorded there).
SEEDED = "\x00seeded"


@dataclass(frozen=True)
class Answer:
    """What a request is answered with; kept as data so an Idempotency-Key can replay it."""

    status: int
    body: dict[str, Any]
    retry_after: int | None = None

    def response(self, **extra_headers: str) -> JSONResponse:
        headers = dict(extra_headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return JSONResponse(self.body, self.status, headers=headers)


#: After this long without a broker connection, requests get 503 at once instead of waiting for acks.
BROKER_DOWN_503_S = 1.0


def _bridge(loop: asyncio.AbstractEventLoop, future: Any) -> asyncio.Future[Any]:
    """A kafka-python future (callbacks on its I/O thread) or a concurrent future -> asyncio future."""
    if isinstance(future, ConcurrentFuture):
        return asyncio.wrap_future(future, loop=loop)
    result: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, ok: bool) -> None:
        if not result.done():
            result.set_result(value) if ok else result.set_exception(value)

    future.add_callback(lambda value: loop.call_soon_threadsafe(settle, value, True))
    future.add_errback(lambda exc: loop.call_soon_threadsafe(settle, exc, False))
    return result


def _all_done(loop: asyncio.AbstractEventLoop, futures: list[Any]) -> asyncio.Future[None]:
    """One asyncio future that completes when every kafka/concurrent future in ``futures`` is done.

    Why not one asyncio bridge per record: a batch of 500 would wake the event loop 500 times from
    the producer's I/O thread; a countdown wakes it once.
    """
    done: asyncio.Future[None] = loop.create_future()
    remaining = [len(futures)]
    lock = threading.Lock()

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    def one_done(*_: Any) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            try:
                loop.call_soon_threadsafe(finish)
            except RuntimeError:  # the loop is gone (server stopped): nobody waits any more
                pass

    if not futures:
        finish()
    for future in futures:
        if isinstance(future, ConcurrentFuture):
            future.add_done_callback(one_done)
        else:
            future.add_both(one_done)
    return done


def _outcome(future: Any) -> tuple[bool, Any, BaseException | None]:
    """(done, value, error) of a kafka-python or concurrent future that may not be done yet."""
    if isinstance(future, ConcurrentFuture):
        if not future.done():
            return False, None, None
        if future.cancelled():
            return True, None, RuntimeError("cancelled")
        error = future.exception()
        return True, None if error else future.result(), error
    if not future.is_done:
        return False, None, None
    return True, future.value, future.exception if future.failed() else None


class Gateway:
    """The request-independent state of the gateway and the processing of one request."""

    def __init__(self, settings: Settings, publisher: Publisher, registry: SchemaRegistry,
                 limits: GatewayLimits, time_rules: TimeRules | None = None) -> None:
        self.settings = settings
        self.publisher = publisher
        self.limits = limits
        self.tokens = gateway_keys(settings)
        self.metrics = GatewayMetrics()
        self.rate = RateLimiter(limits.rate_records_per_s, limits.burst_records)
        self.tenant_rate = RateBuckets(limits.tenant_rate_records_per_s,
                                       max(limits.burst_records, limits.tenant_rate_records_per_s))
        self.inflight = InFlightLimiter(limits.max_in_flight, on_change=self.metrics.in_flight.set)
        self.seen: OnceMap[dict[str, Any]] = OnceMap(limits.idempotency_capacity, limits.idempotency_ttl_s)
        self.responses: OnceMap[Stored] = OnceMap(limits.request_key_capacity, limits.idempotency_ttl_s)
        #: Event-time rules of every entry of this gateway (unit, window, backfill run header).
        self.time_rules = time_rules or TimeRules.from_settings(settings)
        self.avro = AvroBodies(registry, self.time_rules)
        self._tenant_publishers: dict[str, Publisher] = {}
        self._health_lock = asyncio.Lock()

    def seed_idempotency(self, window_s: float, timeout_s: float = 120.0) -> int:
        """Remember the event keys of the last ``window_s`` seconds of every raw topic; return how many.

        Why: the window is in memory, so a restarted gateway would republish an event a client
        resends after a lost answer. Re-reading the recent tail of the raw topics at start-up closes
        that gap for events acked within ``window_s`` (start-up time grows with the data read, so it
        is opt-in: ``ingest serve --idempotency-seed-minutes``). Records that do not decode are skipped.
        """
        from streaming.consumer import Record, Subscriber
        from streaming.exceptions import OffsetOutOfRangeError

        kinds = {raw_topic(self.tenant_settings(t), k): (t, k) for k in KINDS for t in ("", *self.tokens.tenants)}
        since = now_ms() - int(window_s * 1000)
        try:
            sub = Subscriber(self.settings, list(kinds), start={"timestamp": since}, until="end")
        except OffsetOutOfRangeError:  # retention already dropped part of the window: read what is left
            sub = Subscriber(self.settings, list(kinds), start="beginning", until="end")
        seeded = 0
        deadline = time.monotonic() + timeout_s
        with sub:
            for item in sub.iterate(idle_timeout_s=5.0):
                if isinstance(item, Record) and isinstance(item.value, dict):
                    tenant, kind = kinds[item.topic]
                    # A seeded id is not tied to a key (the topic does not say who sent it): it
                    # matches any resend of that event by a key of the topic's tenant.
                    self.seen.complete((SEEDED, tenant, kind, event_key(kind, item.value)),
                                       {"topic": item.topic, "partition": item.partition, "offset": item.offset})
                    seeded += 1
                if time.monotonic() > deadline:
                    log.warning("idempotency seeding stopped after %d records (%g s limit)", seeded, timeout_s)
                    break
        return seeded

    def tenant_settings(self, tenant: str) -> Settings:
        """Settings whose topic names are the tenant's (``<prefix><tenant>.``)."""
        if not tenant:
            return self.settings
        return self.settings.with_(topic_prefix=f"{self.settings.topic_prefix}{tenant}.")

    def publisher_for(self, tenant: str) -> Publisher:
        """The publisher whose dead letters go to ``tenant``'s dead-letter topics.

        A shallow copy with the tenant's settings: it shares the one producer and serializer cache,
        so a tenant costs no connection, and ``Publisher.dead_letter`` (sizing, headers) is reused.
        """
        if not tenant:
            return self.publisher
        view = self._tenant_publishers.get(tenant)
        if view is None:
            view = copy.copy(self.publisher)
            view.settings = self.tenant_settings(tenant)
            self._tenant_publishers[tenant] = view
        return view

    # -- admission ----------------------------------------------------------------------------
    def admit(self, request: Request, kind: str | None = None) -> Principal:
        """Checks that need no body: key (401/403), scope, rate budget (429), in-flight bound (503)."""
        principal = self.tokens.authenticate(request.headers.get("authorization"))
        if kind in KINDS:
            self.tokens.require(principal, f"ingest.{kind}")
        self.rate.check(principal.name)
        self.inflight.admit()
        ledger = getattr(self.publisher, "ledger", None)
        down = ledger.broker_down_for() if ledger is not None else 0.0
        if down > BROKER_DOWN_503_S:  # fail fast: no ack can come, and a 2xx must mean "kept"
            raise OverloadedError(f"Kafka is unreachable (for {down:.0f} s); retry", retry_after=1)
        return principal

    def charge(self, principal: Principal, n: int) -> None:
        """Charge ``n`` records to the key and its tenant before the body is parsed (429 when spent)."""
        self.rate.take(principal.name, n)
        try:
            self.tenant_rate.take(principal.tenant_label, n, "records")
        except GuardError as exc:
            raise RateLimitedError(f"tenant {principal.tenant_label!r}: {exc.message}",
                                   retry_after=exc.retry_after) from None

    def check_shape(self, shape: JsonShape) -> None:
        """Depth and container limits of a scanned JSON body (400/413), after it was charged."""
        if shape.depth > self.limits.max_json_depth:
            raise BadRequestError(f"request body: JSON nested {shape.depth} levels deep, over the limit of "
                                  f"{self.limits.max_json_depth}; events are flat objects")
        if shape.containers > self.limits.max_containers:
            raise PayloadTooLargeError(f"request body: {shape.containers} JSON arrays/objects, over the limit "
                                       f"of {self.limits.max_containers}; send fewer or smaller records")

    async def with_request_key(self, request: Request, principal: Principal, fp: str,
                               work: Callable[[], Awaitable[Answer]]) -> JSONResponse:
        """Run ``work`` once per ``Idempotency-Key``; a repeat gets the stored answer replayed."""
        header = request.headers.get("idempotency-key")
        if header is None:
            return (await work()).response()
        if not 1 <= len(header) <= 255 or not header.isprintable():
            raise BadRequestError("Idempotency-Key must be 1-255 printable characters, e.g. a UUID")
        key = (principal.name, request.url.path, header)
        state, got = self.responses.claim(key)
        if state == "pending":
            try:
                # shield: a timeout here must not cancel the owner's future other waiters share
                got = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(got)), self.limits.ack_timeout_s + 5)
            except Exception as exc:
                raise OverloadedError("an earlier request with this Idempotency-Key did not complete; "
                                      "retry it", retry_after=1) from exc
        if state != "new":
            stored_fp, status, body = got
            if stored_fp != fp:
                raise IdempotencyConflictError("this Idempotency-Key was used with a different request body; "
                                               "use a new key for a new request")
            return Answer(status, body).response(**{"Idempotent-Replayed": "true"})
        try:
            answer = await work()
        except BaseException as exc:
            self.responses.abandon(key, exc)
            raise
        if answer.retry_after is not None:  # a retryable outcome is not the request's final answer
            self.responses.abandon(key, OverloadedError("the first attempt must be retried"))
        else:
            self.responses.complete(key, (fp, answer.status, answer.body))
        return answer.response()

    # -- publishing (worker thread) -------------------------------------------------------------
    def _send(self, kind: str, items: list[Item], remote: str,
              principal: Principal, charged: int = 0) -> list[tuple[Item, str, Any]]:
        """Charge what was not charged yet, then send the valid items and dead-letter the rejected ones.

        Runs in a worker thread (encoding is CPU work and ``send`` may block on a full buffer).
        Returns ``(item, what, future)`` with ``what`` in ack | pending | dead_letter.
        """
        if len(items) > charged:
            self.charge(principal, len(items) - charged)
        topic, record_name = raw_topic(self.tenant_settings(principal.tenant), kind), KINDS[kind]
        source: dict[str, Any] = {"remote": remote}
        if principal.tenant:
            source["tenant"] = principal.tenant
        waits: list[tuple[Item, str, Any]] = []
        for item in items:
            if item.record is not None:
                self._send_one(kind, topic, record_name, item, waits, principal)
            if item.status == "rejected" and not item.retryable:
                try:
                    future = self.publisher_for(principal.tenant).dead_letter(kind, item.original, stage="gateway",
                                                        error=item.error or "",
                                                        source={**source, "index": item.index,
                                                                **item.reason_fields()})
                    waits.append((item, "dead_letter", future))
                except (KafkaError, RecordTooLargeError) as exc:
                    item.retryable, item.error = True, f"could not keep the rejected record ({describe(exc)})"
        return waits

    def _send_one(self, kind: str, topic: str, record_name: str, item: Item,
                  waits: list[tuple[Item, str, Any]], principal: Principal) -> None:
        record = item.record or {}
        try:
            value = self.publisher.encode(topic, record_name, record)
        except SchemaError as exc:
            item.reject(exc)
            return
        seeded = self.seen.done_value((SEEDED, principal.tenant, kind, item.key))
        if seeded is not None:
            item.status, item.meta = "duplicate", dict(seeded)
            return
        key = (principal.name, kind, item.key)
        state, got = self.seen.claim(key)
        if state == "done":
            item.status, item.meta = "duplicate", dict(got)
            return
        if state == "pending":
            waits.append((item, "pending", got))
            return
        self.inflight.add(1)
        try:
            future = self.publisher.send_bytes(topic, value, record.get(KEY_FIELDS[record_name]),
                                               self.time_rules.policy.headers() or None)
        except RecordTooLargeError as exc:
            self.inflight.release(1)
            self.seen.abandon(key, exc)
            item.reject(exc)
            return
        except KafkaError as exc:
            self.inflight.release(1)
            self.seen.abandon(key, exc)
            item.status, item.retryable = "rejected", True
            item.error = f"Kafka refused the record ({describe(exc)})"
            return
        sent = time.perf_counter()
        latency = self.metrics.ack_latency.labels(kind=kind)

        def acked(md: Any) -> None:
            latency.observe(time.perf_counter() - sent)
            self.seen.complete(key, {"topic": md.topic, "partition": md.partition, "offset": md.offset})
            self.inflight.release(1)

        def failed(exc: BaseException) -> None:
            self.seen.abandon(key, exc)
            self.inflight.release(1)

        future.add_callback(acked)
        future.add_errback(failed)
        waits.append((item, "ack", future))

    async def settle(self, kind: str, items: list[Item], waits: list[tuple[Item, str, Any]],
                     principal: Principal | None = None) -> Answer:
        """Wait (bounded) for every ack and dead letter, then build the per-record answer."""
        if waits:
            all_done = _all_done(asyncio.get_running_loop(), [fut for _, _, fut in waits])
            await asyncio.wait([all_done], timeout=self.limits.ack_timeout_s)
        for item, what, fut in waits:
            done, value, error = _outcome(fut)
            if not done:  # the ack callbacks still settle the idempotency key and in-flight count later
                item.status, item.retryable = "rejected", True
                item.error = f"Kafka did not acknowledge within {self.limits.ack_timeout_s:g} s; resend"
            elif error is not None:
                item.status, item.retryable = "rejected", True
                item.error = {"ack": "Kafka did not acknowledge the record",
                              "pending": "the same event was in flight from another request and failed",
                              "dead_letter": "could not keep the rejected record"}[what]
                item.error += f" ({describe(error)}); resend"
            elif what in ("ack", "pending"):
                item.status = "accepted" if what == "ack" else "duplicate"
                item.meta = dict(value) if isinstance(value, dict) else {
                    "topic": value.topic, "partition": value.partition, "offset": value.offset}
        return self.answer(kind, items, principal)

    def answer(self, kind: str, items: list[Item], principal: Principal | None = None) -> Answer:
        counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
        retry = False
        for item in items:
            counts[item.status] += 1
            retry = retry or item.retryable
            outcome = "failed" if item.retryable else item.status
            self.metrics.records.labels(kind=kind, status=outcome).inc()
            if principal is not None:
                tenant = self.tokens.tenant_label(principal)
                self.metrics.tenant_records.labels(tenant=tenant, kind=kind, status=outcome).inc()
        body = {"results": [item.result() for item in items], "accepted": counts["accepted"],
                "duplicates": counts["duplicate"], "rejected": counts["rejected"]}
        if retry:
            status = 503
        elif counts["rejected"] == 0:
            status = 200
        elif counts["rejected"] < len(items):
            status = 207
        else:
            status = 422
        return Answer(status, body, 1 if retry else None)

    async def publish(self, kind: str, items: list[Item], request: Request, principal: Principal,
                      charged: int = 0) -> Answer:
        remote = request.client.host if request.client else "unknown"
        waits = await run_in_threadpool(self._send, kind, items, remote, principal, charged)
        return await self.settle(kind, items, waits, principal)

    async def reject_body(self, kind: str, body: bytes, request: Request, exc: GatewayError,
                          principal: Principal | None = None) -> Answer:
        """A body that is unusable as a whole: dead-letter it once (authenticated callers only), 400."""
        remote = request.client.host if request.client else "unknown"
        kept = True
        if body:
            try:
                publisher = self.publisher_for(principal.tenant if principal else "")
                future = await run_in_threadpool(publisher.dead_letter, kind, body, stage="gateway",
                                                 error=exc, source={"remote": remote, "index": "body"})
                await asyncio.wait_for(_bridge(asyncio.get_running_loop(), future), self.limits.ack_timeout_s)
            except (KafkaError, RecordTooLargeError, TimeoutError):
                kept = False
        self.metrics.records.labels(kind=kind, status="rejected").inc()
        if not kept:
            raise OverloadedError(f"{exc.message}; and the body could not be kept in the dead-letter topic, "
                                  "retry", retry_after=1)
        return Answer(exc.status, {"error": exc.message, "results": []})

    def _metadata_round_trip(self, timeout_s: float) -> int:
        """Make the producer fetch fresh cluster metadata now; return the raw topic's partitions.

        Why not ``producer.partitions_for``: it answers from cached metadata, so it says "healthy"
        long after the broker went away. kafka-python has no public "refresh now", so this asks
        its cluster metadata for an update and wakes the sender, as ``partitions_for`` does itself
        on a cache miss; the future fails or times out when no broker answers.
        """
        producer = self.publisher.producer
        cluster, sender = getattr(producer, "_metadata", None), getattr(producer, "_sender", None)
        if cluster is not None and sender is not None and hasattr(cluster, "request_update"):
            updated = threading.Event()
            future = cluster.request_update()
            future.add_both(lambda *_: updated.set())
            sender.wakeup()
            if not updated.wait(timeout_s):
                raise TimeoutError(f"no metadata answer from Kafka within {timeout_s:g} s")
            if future.failed():
                raise future.exception
        return len(producer.partitions_for(raw_topic(self.settings, "weblog")) or [])

    async def health(self) -> JSONResponse:
        """Kafka reachable = the producer gets a metadata answer from the cluster within 5 s."""
        async with self._health_lock:
            try:
                partitions = await asyncio.wait_for(run_in_threadpool(self._metadata_round_trip, 5.0), 6.0)
            except Exception as exc:  # any failure means "not healthy"; the class name says why
                return JSONResponse({"status": "unavailable", "kafka": type(exc).__name__}, 503,
                                    headers={"Retry-After": "5"})
        # The bootstrap address is not shown: /healthz needs no key, and the address is a map of
        # the network behind the gateway.
        return JSONResponse({"status": "ok", "kafka": {"partitions": partitions},
                             "in_flight_records": self.inflight.count})


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
            await run_in_threadpool(pub.settle)  # acked answers given must survive a broker kill
            await run_in_threadpool(pub.close)

    app = FastAPI(title="streamlearn ingest gateway", version="1", lifespan=lifespan,
                  description=(__doc__ or "").split("\n\n", 1)[1])
    app.state.gateway = gw
    bearer = HTTPBearer(auto_error=False, description="a token of STREAMLEARN_INGEST_TOKENS")

    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="streamlearn-ingest"'
        return JSONResponse({"error": exc.message}, exc.status, headers=headers)

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
        async with request.form(max_files=limits.max_records_per_request, max_fields=16) as form:
            files = [(v.filename, await v.read()) for _, v in form.multi_items() if isinstance(v, UploadFile)]
            fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        unknown = sorted(set(fields) - {"label", "timestamp"})
        if unknown or not files:
            raise BadRequestError(f"form fields {unknown} are unknown (use label, timestamp)" if unknown
                                  else "no files in the upload; send one or more image files")
        stamp = now_ms()
        if fields.get("timestamp"):
            try:
                stamp = gw.time_rules.read(fields["timestamp"].strip())
            except InputRejectedError as exc:
                raise BadRequestError(f"form field timestamp: {exc}") from exc
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
                                                gw.time_rules)
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
