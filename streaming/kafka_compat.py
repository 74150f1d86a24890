"""Fixes for kafka-python 3.0.x: two for group joins that a poll loop with short calls runs into, one for resume,
a receive cap raised for the embedded broker, and reconnects spaced at most a second apart.

Why this exists (the causes of the stalled rebalances behind the IdlePoller, docs/IDLE.md).

**1. A join that completes between two polls is thrown away.**
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

**2. A join that was started is abandoned when the reason for it goes away.** ``poll`` drives a
join only while ``need_rejoin()`` is true. The consumer coordinator's ``need_rejoin`` is also true
while the leader's assignment snapshot differs from the current metadata snapshot (a metadata update
that lands right after a join, common when noida-db follows a static member's rejoin with a second
short rebalance), and false again once the next metadata update makes them equal. A join started
for that reason (partitions already revoked and marked pending revocation, heartbeats disabled) by
a poll call too short to finish it was then never awaited again: the group's answer was never
applied, the member fetched nothing, and the worker stalled for good
(tests/test_stream_faults.py behind the IdlePoller; a plain ``poll(200)`` usually finished the
join inside the call that started it).

:func:`install` wraps ``BaseCoordinator.join_group_async`` so that the cached task is seen through
:class:`_AwaitedJoin`, which never reports ``is_done``: the original method then awaits it, and a
task that already finished resolves at once with its assignment (or raises its error, which the
original handles exactly as if a poll had been waiting). It also makes ``BaseCoordinator.need_rejoin``
true while a join is prepared but not completed (``rejoining``, set when the partitions are revoked
and cleared on success) or a join task is cached, so a started join is always driven to its end.
**3. A partition resumed after a pause can starve for good.** When a fetch answer for a paused
partition is read, ``Fetcher.fetched_records`` parks it (KAFKA-7548) and never fetches that partition
while it is parked; on a later call it restores parked records of a resumed partition only
``if self._next_partition_records is None``. But a drained ``PartitionRecords`` (say, the empty answer
of an idle partition) stays in that slot, falsy yet not None, until the next answer replaces it; on
a topic whose other partitions are idle the slot is such a drained object most of the time, so the
resumed partition's parked records were never restored and it was never fetched again. Measured:
a partition paused with 950 fetched records in hand, next to two empty partitions, returned nothing
after ``resume`` (``tests/test_idle.py``); and a stream worker whose records all sit on one partition
stalled for good after the first retry of a schema-registry outage, which pauses that partition and
resumes it after a back-off (``tests/test_stream_worker.py``). The same pause and resume serve
backpressure and broker restarts. :func:`install` wraps
``fetched_records`` to empty a drained slot (``None``) before the original runs, which is what the
original's own loop does with it anyway (``if not self._next_partition_records``).

**4. The embedded broker answers a fetch with the partitions' whole unread backlog.** noida-db ignores a
fetch's ``max_bytes`` and ``partition_max_bytes`` (measured: a 1 MB / 1 MB fetch of a partition holding
200 MB got one 200,028,952-byte answer). kafka-python refuses any answer over its
``receive_message_max_bytes`` (100 MB by default: ``InvalidReceiveError: Invalid frame length``), drops
the connection and sends the same fetch again, forever: a stream worker, replay or read-back whose
partitions held more than 100 MB past its position never read another record. :func:`install` raises
the default of every ``KafkaConsumer`` made afterwards to :data:`FETCH_RESPONSE_MAX_BYTES` (2 GiB - 1,
librdkafka's own maximum, which :mod:`streaming.cfetch` uses too). Apache Kafka keeps honouring
``fetch_max_bytes`` (32 MiB here), so there the cap changes nothing; on the embedded broker a reader's
memory grows with the backlog it reads in one answer, and a backlog over 2 GiB still stalls (said in the
README's durability notes).

**5. A client gives up on a broker that is back.** kafka-python spaces its reconnects to a broker it cannot
reach at 50 ms doubling up to ``reconnect_backoff_max_ms`` (30 s by default), and its bootstrap too: after
10 s of a broker outage the next try came ~13 s later, then ~26 s. A `replay` started while the embedded
broker was down and restarted 8 s later made its last try at 7 s and gave up at 30 s ("cannot reach the
Kafka broker") with the broker up for 20 s of it; a worker noticed a returned broker as late. :func:`install`
lowers the default of every ``KafkaConsumer``, ``KafkaProducer`` and ``KafkaAdminClient`` made afterwards
to :data:`RECONNECT_BACKOFF_MAX_MS` (1 s: one connection attempt a second per broker while it is down).
It is made sure of by :func:`streaming.kafka_security.kafka_security`, whose kwargs every client of this
code base is built with.

Nothing else of kafka-python changes. Each wrapper is installed only where the installed method
still has the flawed code (checked on its source), so an upgraded kafka-python that fixed it is left
alone.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

log = logging.getLogger(__name__)

_MARK = "_streamlearn_awaits_settled_join"
_BUGGY_TEST = "self._join_task.is_done"
_BARE_NEED_REJOIN = "return self.rejoin_needed"
_PARKED_RESTORE = "if self._next_partition_records is None:"
#: Largest fetch answer a consumer takes (fix 4): the embedded broker sends a partition's whole unread backlog.
FETCH_RESPONSE_MAX_BYTES = 2**31 - 1
#: Longest wait between two connection attempts to a broker that is down (fix 5).
RECONNECT_BACKOFF_MAX_MS = 1000


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


def _fixes() -> tuple[tuple[Any, str, str, Any, str], ...]:
    """Each wrapped method: (owner class, name, its flawed line, the wrapper, what to log when it is not there)."""
    from kafka.consumer.fetcher import Fetcher
    from kafka.coordinator.base import BaseCoordinator

    return ((BaseCoordinator, "join_group_async", _BUGGY_TEST, _await_settled,
             "does not replace a finished join (or has no source); settled-join fix not installed"),
            (BaseCoordinator, "need_rejoin", _BARE_NEED_REJOIN, _finish_started,
             "changed (or has no source); started-join fix not installed"),
            (Fetcher, "fetched_records", _PARKED_RESTORE, _restore_parked,
             "changed (or has no source); resume fix not installed"))


def installed() -> bool:
    """True when kafka-python's ``join_group_async``, ``need_rejoin`` and ``fetched_records`` are the wrapped ones
    and consumers take fetch answers up to :data:`FETCH_RESPONSE_MAX_BYTES`."""
    from kafka import KafkaConsumer

    return all(getattr(getattr(owner, name), _MARK, False) for owner, name, *_ in _fixes()) \
        and KafkaConsumer.DEFAULT_CONFIG["receive_message_max_bytes"] >= FETCH_RESPONSE_MAX_BYTES \
        and KafkaConsumer.DEFAULT_CONFIG["reconnect_backoff_max_ms"] <= RECONNECT_BACKOFF_MAX_MS


def _source_has(func: Any, text: str) -> bool:
    try:
        return text in inspect.getsource(func)
    except (OSError, TypeError):  # no source (zipped install): cannot tell, leave it alone
        return False


@functools.cache
def install() -> bool:
    """Wrap ``BaseCoordinator.join_group_async``, ``need_rejoin`` and ``Fetcher.fetched_records`` once per process,
    raise ``KafkaConsumer``'s default ``receive_message_max_bytes`` (fix 4) and lower every client's default
    ``reconnect_backoff_max_ms`` (fix 5).

    Runs once per process (cached: every client's ``kafka_security()`` call asks for it, and a method whose
    source no longer has the flaw would otherwise be read and logged again each time). Returns True when
    all fixes are active; such a method is left alone, and said so once.
    """
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    defaults = KafkaConsumer.DEFAULT_CONFIG
    defaults["receive_message_max_bytes"] = max(defaults.get("receive_message_max_bytes", 0), FETCH_RESPONSE_MAX_BYTES)
    for client in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
        config = client.DEFAULT_CONFIG
        config["reconnect_backoff_max_ms"] = min(config.get("reconnect_backoff_max_ms", RECONNECT_BACKOFF_MAX_MS),
                                                 RECONNECT_BACKOFF_MAX_MS)
    for owner, name, flaw, wrap, otherwise in _fixes():
        method = getattr(owner, name)
        if getattr(method, _MARK, False):
            continue
        if _source_has(method, flaw):
            setattr(owner, name, wrap(method))
        else:
            log.info("kafka-python's %s %s", name, otherwise)
    return installed()


def _await_settled(original: Any) -> Any:
    @functools.wraps(original)
    async def join_group_async(self: Any, timeout_ms: Any = None) -> Any:
        # Runs on kafka-python's IO thread, as do the task and every other access to _join_task.
        task = self._join_task
        if task is not None and not isinstance(task, _AwaitedJoin):
            self._join_task = _AwaitedJoin(task)
        return await original(self, timeout_ms)

    setattr(join_group_async, _MARK, True)
    return join_group_async


def _finish_started(original: Any) -> Any:
    @functools.wraps(original)
    def need_rejoin(self: Any) -> bool:
        # A prepared join (partitions revoked, heartbeats off) or a cached join task must be finished
        # even if what asked for it (a metadata snapshot mismatch) has gone away meanwhile.
        return bool(original(self) or getattr(self, "rejoining", False) or getattr(self, "_join_task", None))

    setattr(need_rejoin, _MARK, True)
    return need_rejoin


def _restore_parked(original: Any) -> Any:
    @functools.wraps(original)
    def fetched_records(self: Any, max_records: Any = None, update_offsets: bool = True) -> Any:
        current = self._next_partition_records
        if current is not None and not current:  # drained: let the original restore a resumed partition's records
            self._next_partition_records = None
        return original(self, max_records, update_offsets)

    setattr(fetched_records, _MARK, True)
    return fetched_records
