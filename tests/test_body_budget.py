"""The shared request-body budget of every HTTP server (schemas/httpguard.py BodyLimitMiddleware).

Raw ASGI against the middleware itself: connections that sent headers and no body must not hold the
budget (a few `Content-Length` headers that together declared it answered every other client 503 for
30 s), while bodies that really arrive still count against it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from schemas.httpguard import BodyLimitMiddleware, ByteBudget


async def _echo(scope: Any, receive: Any, send: Any) -> None:
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps({"size": size}).encode()})


def _scope(length: int) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/ingest", "headers": [(b"content-length", str(length).encode())]}


async def _request(mw: BodyLimitMiddleware, length: int, chunks: list[bytes] | None,
                   hold: asyncio.Event | None = None) -> int:
    """One request; ``chunks`` None: the client sends headers only and then nothing until ``hold`` is set."""
    sent: list[Any] = []
    queue = list(chunks or [])

    async def receive() -> dict[str, Any]:
        if chunks is None:
            assert hold is not None
            await hold.wait()
            return {"type": "http.disconnect"}
        body = queue.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(queue)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await mw(_scope(length), receive, send)
    return int(next(m["status"] for m in sent if m["type"] == "http.response.start"))


def test_headers_without_a_body_hold_no_budget_and_arriving_bodies_do() -> None:
    async def run() -> tuple[list[int], int, int]:
        budget = ByteBudget(4 * 1024 * 1024)
        mw = BodyLimitMiddleware(_echo, 16 * 1024 * 1024, budget=budget, body_timeout_s=5)
        hold = asyncio.Event()
        silent = [asyncio.create_task(_request(mw, 1024 * 1024, None, hold)) for _ in range(4)]
        await asyncio.sleep(0.05)  # they are all waiting for a body
        small = await _request(mw, 10, [b"0123456789"])
        # a body that arrives counts: 3 MiB held twice (chunks + joined copy) is over a 4 MiB budget
        big = await _request(mw, 3 * 1024 * 1024, [b"x" * (1024 * 1024)] * 3)
        hold.set()
        await asyncio.gather(*silent, return_exceptions=True)
        return [small], big, budget.used

    small, big, left = asyncio.run(run())
    assert small == [200]  # was 503: "holds 4194304 bytes of request bodies already"
    assert big == 503
    assert left == 0  # every reservation returned
