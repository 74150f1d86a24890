"""A fix for kafka-python 3.0.x: a group join that completes between two polls is thrown away.

Why this exists (the cause of the stalled rebalances behind the IdlePoller, docs/IDLE.md):
kafka-python runs a member's JoinGroup -> SyncGroup round trip as a task on its IO thread and
caches it in ``BaseCoordinator._join_task``, so that a ``poll(timeout_ms)`` that gives up while the
broker still holds the JoinGroup re-awaits the same task on the next poll instead of sending a
second JoinGroup. But ``join_group_async`` starts a *new* task when the cached one ``is_done``::

    if self._join_task is None or self._join_task.is_done:
        ...
        self._join_task = self._manager.call_soon(self._do_join_and_sync_async)

A task that finished while no poll was awaiting it (the SyncGroup answer arrived during the
caller's sleep, or while the caller processed records, or while another consumer of the same
thread polled) is therefore discarded together with its assignment, and the member sends a fresh
JoinGroup. To the coordinator that is a member rejoining a group that just settled: a new
rebalance, which every other member must join again, and each of them can lose its own answer the
same way. A member that polls in short calls with gaps between them (the IdlePoller: a 2 ms read,
then a back-off sleep) hits this almost every time, so the group cycles through generations and
never settles; a plain ``poll(200)`` loop hits it only when a join outlasts one poll, which is why
plain polling hid it. Every path that consumes a task's outcome sets ``_join_task = None`` (the
task's own comment says "Cleared on success or non-retriable failure"), so the ``is_done`` test is
the bug: a finished task must be awaited (its outcome applied), not replaced.

:func:`install` wraps ``BaseCoordinator.join_group_async`` so that the cached task is seen through
:class:`_AwaitedJoin`, which never reports ``is_done``: the original method then awaits it, and a
task that already finished resolves at once with its assignment (or raises its error, which the
original handles exactly as if a poll had been waiting). Nothing else of kafka-python changes. The
wrapper is installed only where the installed ``join_group_async`` still has that test (checked on
its source), so an upgraded kafka-python that fixed it is left alone.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

log = logging.getLogger(__name__)

_MARK = "_streamlearn_awaits_settled_join"
_BUGGY_TEST = "self._join_task.is_done"


class _AwaitedJoin:
    """The cached join task as ``join_group_async`` sees it: never "done", so it is always awaited.

    ``KafkaConnectionManager.wait_for`` only calls ``add_callback``/``add_errback``; on a finished
    kafka ``Future`` those fire at once with its value or exception.
    """

    __slots__ = ("task",)
    is_done = False

    def __init__(self, task: Any) -> None:
        self.task = task

    def add_callback(self, f: Any, *args: Any, **kwargs: Any) -> _AwaitedJoin:
        self.task.add_callback(f, *args, **kwargs)
        return self

    def add_errback(self, f: Any, *args: Any, **kwargs: Any) -> _AwaitedJoin:
        self.task.add_errback(f, *args, **kwargs)
        return self


def installed() -> bool:
    """True when kafka-python's ``join_group_async`` is the wrapped one."""
    from kafka.coordinator.base import BaseCoordinator

    return bool(getattr(BaseCoordinator.join_group_async, _MARK, False))


def install() -> bool:
    """Wrap ``BaseCoordinator.join_group_async`` once per process; True when the fix is active.

    Idempotent. Returns False (and changes nothing) when the installed kafka-python does not have
    the discarding test any more.
    """
    from kafka.coordinator.base import BaseCoordinator

    original = BaseCoordinator.join_group_async
    if getattr(original, _MARK, False):
        return True
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):  # no source (zipped install): cannot tell, leave it alone
        log.info("kafka-python's join_group_async has no readable source; settled-join fix not installed")
        return False
    if _BUGGY_TEST not in source:
        log.info("kafka-python's join_group_async no longer replaces a finished join; fix not needed")
        return False

    @functools.wraps(original)
    async def join_group_async(self: Any, timeout_ms: Any = None) -> Any:
        # Runs on kafka-python's IO thread, as do the task and every other access to _join_task.
        task = self._join_task
        if task is not None and not isinstance(task, _AwaitedJoin):
            self._join_task = _AwaitedJoin(task)
        return await original(self, timeout_ms)

    setattr(join_group_async, _MARK, True)
    BaseCoordinator.join_group_async = join_group_async
    return True
