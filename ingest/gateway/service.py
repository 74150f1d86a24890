"""The gateway service: the request-independent state (publishers per tenant, limits, idempotency,
metrics) and the processing of one request: admit, charge, send, answer. HTTP routing lives in
``routes.py``; see the package docstring for the contract."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from kafka.errors import KafkaError
from starlette.concurrency import run_in_threadpool

from ingest.gateway.auth import Principal, gateway_keys
from ingest.gateway.bridge import bridge, outcome, when_all_done
from ingest.gateway.errors import (
    BadRequestError,
    GatewayError,
    IdempotencyConflictError,
    OverloadedError,
    PayloadTooLargeError,
    RateLimitedError,
)
from ingest.gateway.limits import GatewayLimits, InFlightLimiter, OnceMap, RateLimiter
from ingest.gateway.metrics import GatewayMetrics
from ingest.gateway.records import (
    AvroBodies,
    Item,
    TimeRules,
    describe,
    event_key,
    now_ms,
)
from schemas.exceptions import SchemaError
from schemas.httpguard import GuardError, JsonShape, RateBuckets
from schemas.registry import SchemaRegistry
from schemas.serde import AvroSerializer
from streaming.config import Settings
from streaming.cproduce import CProducer
from streaming.exceptions import RecordTooLargeError
from streaming.limits import InputLimitError
from streaming.producer import KEY_FIELDS, Publisher
from streaming.topics import KINDS, raw_topic

log = logging.getLogger(__name__)

Stored = tuple[str, int, bytes]  # request fingerprint, status, the rendered JSON body
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
        return _AsciiJSONResponse(self.body, self.status, headers=headers)


class _AsciiJSONResponse(JSONResponse):
    """JSON that renders whatever text the answer echoes: an answer echoes ids built from the client's
    own text, and a lone surrogate there (JSON ``"\\ud800"``, valid to parse, not encodable as UTF-8)
    made starlette's UTF-8 rendering fail with a 500 after the record had been dead-lettered.

    orjson first (a 500-event answer took ~3 % of the gateway's CPU in ``json.dumps``); it refuses such
    text (and integers over 64 bits), and then the answer is ASCII JSON with the text escaped. A
    non-finite number, which no answer field holds, would become ``null`` rather than a 500."""

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:  # orjson.JSONEncodeError: a lone surrogate, an integer over 64 bits
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


#: After this long without a broker connection, requests get 503 at once instead of waiting for acks.
BROKER_DOWN_503_S = 1.0



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
        self._ack_latency: dict[str, Any] = {}  # the ack latency histogram's child per kind
        self.seen: OnceMap[dict[str, Any]] = OnceMap(limits.idempotency_capacity, limits.idempotency_ttl_s)
        self.responses: OnceMap[Stored] = OnceMap(limits.request_key_capacity, limits.idempotency_ttl_s,
                                                  max_bytes=limits.request_key_max_bytes,
                                                  size=lambda stored: len(stored[2]) + 200)
        #: Event-time rules of every entry of this gateway (unit, window, backfill run header).
        self.time_rules = time_rules or TimeRules.from_settings(settings)
        self.avro = AvroBodies(registry, self.time_rules)
        self._tenant_publishers: dict[str, Publisher] = {}
        self._health_check: asyncio.Future[int] | None = None  # the /healthz check in flight (shared)

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
                               work: Callable[[], Awaitable[Answer]]) -> Response:
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
            return Response(body, status, headers={"Idempotent-Replayed": "true"}, media_type="application/json")
        try:
            answer = await work()
        except BaseException as exc:
            self.responses.abandon(key, exc)
            raise
        if answer.retry_after is not None:  # a retryable outcome is not the request's final answer
            self.responses.abandon(key, OverloadedError("the first attempt must be retried"))
            return answer.response()
        response = answer.response()  # stored as rendered: a dict of 10,000 results held ~20 MB, its JSON ~2
        self.responses.complete(key, (fp, answer.status, bytes(response.body)))
        return response

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
        serializer = self.publisher.serializer(topic, record_name)  # looked up once a request, not per event
        for item in items:
            if item.record is not None:
                self._send_one(kind, topic, serializer, record_name, item, waits, principal)
            if item.status == "rejected" and not item.retryable:
                try:
                    future = self.publisher_for(principal.tenant).dead_letter(kind, item.original, stage="gateway",
                                                        error=item.error or "",
                                                        source={**source, "index": item.index,
                                                                **item.reason_fields()})
                    waits.append((item, "dead_letter", future))
                except (KafkaError, RecordTooLargeError) as exc:
                    item.retryable, item.error = True, f"could not keep the rejected record ({describe(exc)})"
        try:
            self.sync_journal()
        except OSError as exc:  # sent, but not durable here: the client must not take it as accepted
            log.error("gateway journal: %s; answering 503 until it can be written", exc)
            for item, what, _ in waits:
                if what == "ack":
                    item.journal_error = f"the gateway could not write its journal ({describe(exc)}); resend"
        return waits

    def sync_journal(self) -> None:
        """Make the journal of what was sent durable (streaming/ackjournal.py) before any answer says
        "accepted": on the embedded broker an ack alone does not survive a kill -9 of broker and gateway.
        Runs while the acks are on their way, so it adds no wait when the fsync is the faster."""
        journal = self.publisher.ledger.journal
        if journal is not None:
            journal.sync()

    def _send_one(self, kind: str, topic: str, serializer: AvroSerializer, record_name: str, item: Item,
                  waits: list[tuple[Item, str, Any]], principal: Principal) -> None:
        record = item.record or {}
        try:
            value = serializer(record)  # validates, then encodes (Publisher.encode without its lookups)
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
        except (RecordTooLargeError, InputLimitError) as exc:  # InputLimitError: a key over MAX_KEY_BYTES
            self.inflight.release(1)
            self.seen.abandon(key, exc)
            item.reject(exc)
            return
        except (KafkaError, OSError) as exc:  # OSError: the journal could not be written (disk full?)
            self.inflight.release(1)
            self.seen.abandon(key, exc)
            item.status, item.retryable = "rejected", True
            item.error = f"{'Kafka refused the record' if isinstance(exc, KafkaError) else 'not kept'} " \
                         f"({describe(exc)})"
            return
        sent = time.perf_counter()
        latency = self._ack_latency.get(kind) or self._ack_latency.setdefault(
            kind, self.metrics.ack_latency.labels(kind=kind))  # labels() per event cost ~3 % of the gateway

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
            all_done = when_all_done(asyncio.get_running_loop(), [fut for _, _, fut in waits])
            await asyncio.wait([all_done], timeout=self.limits.ack_timeout_s)
        for item, what, fut in waits:
            done, value, error = outcome(fut)
            if not done:  # the ack callbacks still settle the idempotency key and in-flight count later
                item.status, item.retryable = "rejected", True
                item.error = f"Kafka did not acknowledge within {self.limits.ack_timeout_s:g} s; resend"
            elif error is not None:
                item.status, item.retryable = "rejected", True
                item.error = {"ack": "Kafka did not acknowledge the record",
                              "pending": "the same event was in flight from another request and failed",
                              "dead_letter": "could not keep the rejected record"}[what]
                item.error += f" ({describe(error)}); resend"
            elif item.journal_error:
                item.status, item.retryable, item.error = "rejected", True, item.journal_error
            elif what in ("ack", "pending"):
                item.status = "accepted" if what == "ack" else "duplicate"
                item.meta = dict(value) if isinstance(value, dict) else {
                    "topic": value.topic, "partition": value.partition, "offset": value.offset}
        return self.answer(kind, items, principal)

    def answer(self, kind: str, items: list[Item], principal: Principal | None = None) -> Answer:
        counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
        outcomes = {"accepted": 0, "duplicate": 0, "rejected": 0, "failed": 0}
        retry = False
        for item in items:
            counts[item.status] += 1
            retry = retry or item.retryable
            outcomes["failed" if item.retryable else item.status] += 1
        # one counter update per outcome, not per record (two label lookups per record were ~2 % of a run)
        tenant = self.tokens.tenant_label(principal) if principal is not None else None
        for what, n in outcomes.items():
            if n:
                self.metrics.records.labels(kind=kind, status=what).inc(n)
                if tenant is not None:
                    self.metrics.tenant_records.labels(tenant=tenant, kind=kind, status=what).inc(n)
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
                await asyncio.wait_for(bridge(asyncio.get_running_loop(), future), self.limits.ack_timeout_s)
                await run_in_threadpool(self.sync_journal)
            except (KafkaError, RecordTooLargeError, TimeoutError, OSError):
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
        on a cache miss; the future fails or times out when no broker answers. librdkafka's
        (:class:`streaming.cproduce.CProducer`) ``partitions_for`` asks the cluster itself, within ``timeout_s``.
        """
        producer = self.publisher.producer
        if isinstance(producer, CProducer):
            return len(producer.partitions_for(raw_topic(self.settings, "weblog"), timeout_s=timeout_s))
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
        """Kafka reachable = the producer gets a metadata answer from the cluster within 5 s.

        One check at a time, shared: a probe that arrives while a check runs waits for that check's
        answer. The checks used to queue behind a lock, one 5 s timeout each while Kafka was down, so
        twelve monitors waited up to 60 s (and probes whose clients had left still held their place,
        and held up the gateway's shutdown). /healthz needs no key, so anybody could grow that queue.
        """
        if self._health_check is None or self._health_check.done():
            self._health_check = asyncio.ensure_future(
                asyncio.wait_for(run_in_threadpool(self._metadata_round_trip, 5.0), 6.0))
        try:
            # shield: a probe whose client leaves does not cancel the check the others wait for
            partitions = await asyncio.shield(self._health_check)
        except Exception as exc:  # any failure means "not healthy"; the class name says why
            return JSONResponse({"status": "unavailable", "kafka": type(exc).__name__}, 503,
                                headers={"Retry-After": "5"})
        # The bootstrap address is not shown: /healthz needs no key, and the address is a map of
        # the network behind the gateway.
        return JSONResponse({"status": "ok", "kafka": {"partitions": partitions},
                             "in_flight_records": self.inflight.count})

