"""The Kafka-asyncio bridge: a kafka-python send future (its callbacks run on the producer's I/O
thread) or a concurrent future becomes an asyncio future of the request's event loop, so a request
awaits its acks without holding a thread."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future as ConcurrentFuture
from typing import Any


def bridge(loop: asyncio.AbstractEventLoop, future: Any) -> asyncio.Future[Any]:
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


def when_all_done(loop: asyncio.AbstractEventLoop, futures: list[Any]) -> asyncio.Future[None]:
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


def outcome(future: Any) -> tuple[bool, Any, BaseException | None]:
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
