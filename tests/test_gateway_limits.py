"""Pure-logic tests of the gateway's auth, rate limit, in-flight limit, idempotency map and body limit."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ingest.gateway.auth import TokenTable
from ingest.gateway.errors import (
    AuthenticationError,
    ForbiddenError,
    OverloadedError,
    RateLimitedError,
)
from ingest.gateway.limits import BodyLimitMiddleware, InFlightLimiter, OnceMap, RateLimiter, TokenBucket
from streaming.config import ConfigError

SECRET = "s3cret-Token_value"


class FakeClock:
    """A settable clock, so token-bucket and TTL arithmetic is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_table_maps_named_and_bare_tokens_and_never_shows_them() -> None:
    table = TokenTable(f"alice:{SECRET}, other-token ,")
    assert table.authenticate(f"Bearer {SECRET}").name == "alice"
    assert table.authenticate("bearer other-token").name == "token#2"
    assert SECRET not in repr(table) and "other-token" not in repr(table)
    assert len(table) == 2


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer", "Bearer a b", "Token x"])
def test_missing_or_malformed_authorization_is_401(header: str | None) -> None:
    with pytest.raises(AuthenticationError) as info:
        TokenTable(f"a:{SECRET}").authenticate(header)
    assert info.value.status == 401


def test_unknown_token_is_403_and_the_error_does_not_echo_it() -> None:
    with pytest.raises(ForbiddenError) as info:
        TokenTable(f"a:{SECRET}").authenticate("Bearer wrong-token-xyz")
    assert info.value.status == 403
    assert "wrong-token-xyz" not in str(info.value) and "wrong-token-xyz" not in repr(info.value)


@pytest.mark.parametrize("spec", ["bad name:tok", "a:tok,a:tok2", "a:has space"])
def test_bad_token_configuration_names_the_setting_not_the_token(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        TokenTable(spec)
    assert "ingest_tokens" in str(info.value)
    assert "tok2" not in str(info.value) and "has space" not in str(info.value)


def test_token_bucket_allows_burst_then_refills_at_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert bucket.try_take(5) == 0
    assert bucket.try_take(1) == pytest.approx(0.1)
    clock.now += 0.5
    assert bucket.try_take(5) == 0


def test_token_bucket_lets_a_batch_over_the_burst_pass_as_debt() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert bucket.try_take(20) == 0  # full bucket: passes, owes 15
    wait = bucket.try_take(1)
    assert wait == pytest.approx(1.6)  # 15 of debt + 1 token at 10/s
    clock.now += wait
    assert bucket.try_take(1) == 0


def test_rate_limiter_is_per_principal_and_429_carries_retry_after() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2, burst=2, clock=clock)
    limiter.take("a", 2)
    with pytest.raises(RateLimitedError) as info:
        limiter.take("a", 1)
    assert info.value.status == 429 and info.value.retry_after == 1
    with pytest.raises(RateLimitedError):
        limiter.check("a")
    limiter.take("b", 2)  # another token has its own bucket
    clock.now += 1
    limiter.check("a")


def test_in_flight_limiter_refuses_once_at_limit() -> None:
    seen: list[int] = []
    limiter = InFlightLimiter(2, on_change=seen.append)
    limiter.admit()
    limiter.add(2)
    with pytest.raises(OverloadedError) as info:
        limiter.admit()
    assert info.value.status == 503 and info.value.retry_after == 1
    limiter.release(1)
    limiter.admit()
    assert seen == [2, 1]
    with pytest.raises(OverloadedError):
        InFlightLimiter(0).admit()


def test_once_map_claim_complete_duplicate_and_ttl() -> None:
    clock = FakeClock()
    seen: OnceMap[str] = OnceMap(capacity=10, ttl_s=60, clock=clock)
    assert seen.claim("k") == ("new", None)
    state2, pending = seen.claim("k")
    assert state2 == "pending" and seen.claim("k")[1] is pending  # every waiter shares one future
    seen.complete("k", "where")
    assert pending.result(timeout=0) == "where"
    assert seen.claim("k") == ("done", "where")
    clock.now += 61
    assert seen.claim("k")[0] == "new"


def test_once_map_abandon_lets_a_retry_claim_again_and_waiters_see_the_error() -> None:
    seen: OnceMap[str] = OnceMap(capacity=10, ttl_s=60)
    seen.claim("k")
    _, waiter = seen.claim("k")
    seen.abandon("k", RuntimeError("kafka down"))
    with pytest.raises(RuntimeError):
        waiter.result(timeout=0)
    assert seen.claim("k")[0] == "new"


def test_once_map_is_bounded_oldest_first() -> None:
    seen: OnceMap[int] = OnceMap(capacity=3, ttl_s=60)
    for i in range(5):
        seen.claim(i)
        seen.complete(i, i)
    assert len(seen) == 3
    assert seen.claim(0)[0] == "new" and seen.claim(4) == ("done", 4)


def test_once_map_concurrent_claims_give_exactly_one_owner() -> None:
    seen: OnceMap[int] = OnceMap(capacity=100, ttl_s=60)
    owners: list[int] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        if seen.claim("same")[0] == "new":
            owners.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(owners) == 1


async def _run_asgi(app: BodyLimitMiddleware, headers: list[tuple[bytes, bytes]], chunks: list[bytes]):
    """Drive the middleware with a scripted request; returns (status, body, chunks the app read)."""
    pending = list(chunks)
    sent: list[dict] = []

    async def receive() -> dict:
        body = pending.pop(0) if pending else b""
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/ingest/weblog", "headers": headers, "method": "POST"}
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, len(chunks) - len(pending)


def _echo_app():
    async def app(scope, receive, send) -> None:
        total = b""
        while True:
            message = await receive()
            total += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(total)).encode()})

    return app


def test_body_limit_refuses_content_length_without_reading() -> None:
    refused: list[tuple[str, int]] = []
    app = BodyLimitMiddleware(_echo_app(), 100, on_reject=lambda p, s: refused.append((p, s)))
    status, body, read = asyncio.run(_run_asgi(app, [(b"content-length", b"101")], [b"x" * 101]))
    assert status == 413 and read == 0 and b"100 bytes" in body
    assert refused == [("/ingest/weblog", 413)]


def test_body_limit_counts_chunked_bodies_and_stops_at_the_crossing_chunk() -> None:
    app = BodyLimitMiddleware(_echo_app(), 100)
    chunks = [b"x" * 40] * 10
    status, _, read = asyncio.run(_run_asgi(app, [(b"transfer-encoding", b"chunked")], chunks))
    assert status == 413 and read == 3


def test_body_limit_passes_bodies_at_the_limit() -> None:
    app = BodyLimitMiddleware(_echo_app(), 100)
    status, body, _ = asyncio.run(_run_asgi(app, [], [b"x" * 50, b"y" * 50]))
    assert status == 200 and body == b"100"


def test_once_map_bounds_the_bytes_of_what_it_stores_oldest_first() -> None:
    """Idempotency-Key answers were bounded by count alone: 10,000 keys each holding a 10,000-result answer
    grew the gateway by 10-22 MB a request (an exploratory run: 246 -> 295 MB in three requests)."""
    clock = FakeClock()
    answers: OnceMap[bytes] = OnceMap(capacity=100, ttl_s=60, clock=clock, max_bytes=1000, size=len)
    for key in "abcd":
        answers.claim(key)
        answers.complete(key, b"x" * 300)
    assert answers.bytes == 900 and len(answers) == 3
    assert answers.claim("a")[0] == "new" and answers.claim("d")[0] == "done"  # the oldest went first
    answers.complete("d", b"y" * 100)  # completed again: its old bytes are not counted twice
    assert answers.bytes == 700
    answers.claim("huge")
    answers.complete("huge", b"z" * 5000)  # over the whole budget: not kept, and the rest is dropped
    assert answers.bytes == 0 and len(answers) == 0
    clock.now += 61
    answers.claim("e")
    answers.complete("e", b"e" * 10)
    assert answers.bytes == 10
    with pytest.raises(ValueError, match="go together"):
        OnceMap(capacity=1, ttl_s=1, max_bytes=10)


def test_a_client_gone_before_its_body_is_whole_is_one_info_line_not_a_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    """A body shorter than its Content-Length and a half-close: starlette raises ClientDisconnect from
    ``request.body()``, and uvicorn logged a 40-line "Exception in ASGI application" for it."""
    from starlette.requests import Request

    async def app(scope, receive, send) -> None:
        await Request(scope, receive).body()
        raise AssertionError("the body was whole")

    messages = [{"type": "http.request", "body": b'[{"a":1', "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/ingest/sensor", "method": "POST",
             "headers": [(b"content-length", b"1000")]}
    with caplog.at_level("INFO", logger="schemas.httpguard"):
        asyncio.run(BodyLimitMiddleware(app, 10_000)(scope, receive, send))
    assert sent == []  # nobody to answer
    assert "the client disconnected after 7 of its body's bytes" in caplog.text
