"""Idle back-off for kafka-python consumers on a broker that answers empty fetches at once (docs/IDLE.md).

Split out of :mod:`streaming.consumer` (which re-exports every name here) to keep that module about the
Subscriber. Used by the Subscriber (``idle_backoff=True``), the serving worker and its side readers.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from streaming.end_offsets import EndOffsetProbe

IDLE_MAX_S = 0.064  # back-off cap: ~15 empty polls/s idle, first record after idle within about one cap
IDLE_CAP_LIMIT_S = 0.5  # no back-off cap above this: a record after idle waits at most about one cap
FULL_POLL_S = 1.0  # with the end-offset probe, a real fetch still at least this often (rebalances, poll interval)
#: the same for a consumer outside any group (assigned partitions): it has no rebalance, heartbeat or poll
#: interval for a fetch to keep up, so only the probe's own blind spots are left (see ``IdlePoller``)
FULL_POLL_MANUAL_S = 10.0


def _joining(consumer: KafkaConsumer) -> bool:
    """True while this group member wants to (re-)join: a rebalance is under way for it.

    Reads kafka-python's coordinator state (``need_rejoin``); False for consumers with manually
    assigned partitions, which never join, and wherever that state is not there.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    subscription = getattr(consumer, "_subscription", None)
    if coordinator is None or subscription is None or getattr(coordinator, "group_id", None) is None:
        return False
    try:
        return bool(subscription.partitions_auto_assigned() and coordinator.need_rejoin())
    except Exception:  # an internal we do not know: behave as outside a rebalance
        return False


class IdlePoller:
    """``consumer.poll`` that sleeps between empty polls instead of spinning on an idle topic.

    kafka-python sends the next fetch as soon as an empty one returns and relies on the broker to
    hold it for ``fetch_max_wait_ms``. The embedded broker (noida-db) answers empty fetches at once,
    so a plain ``poll(200)`` on an idle topic re-fetches in a tight loop and burns most of a core.

    This never touches ``pause()``/``resume()`` (the first version paused idle partitions during the
    back-off; that raced with the workers' own pauses and rebalance repositioning, see docs/IDLE.md).
    With partitions assigned and fetchable it calls ``poll(read_ms)`` -- a short poll that sends a
    fetch and reads its answer, so what it sees is fresh, not one back-off old -- and, when nothing
    came, sleeps a back-off that doubles from ``min_idle_s`` to ``max_idle_s`` (at most
    ``IDLE_CAP_LIMIT_S``). Records or an assignment change reset the back-off (a change also ends the
    call, so the caller sees the rebalance before any record of the new assignment). With nothing
    assigned, everything paused by the caller, or a group (re-)join under way, it is kafka-python's
    own ``poll(timeout_ms)``: the fetcher is idle or the call waits on the join, so kafka-python does
    not spin, and a join completes inside the call rather than one back-off later. Group joins
    that finish between two calls are kept by :mod:`streaming.kafka_compat` (installed on import);
    without it kafka-python threw them away and the short polls kept a group rebalancing forever.
    Heartbeats run on kafka-python's IO thread; a join under way is polled through in the call that
    sees it, and an idle consumer fetches at least once per back-off cap (the back-off keeps its own
    schedule across calls, so a call that ends inside it returns ``{}`` without a fetch), so rebalance
    callbacks and ``max_poll_interval_ms`` behave as with a plain poll. A call never lasts
    longer than ``timeout_ms`` (plus one fetch), and a set ``wake`` event ends its back-off at once
    (the workers pass their stop event, so SIGTERM is not delayed by a sleep). On Apache Kafka it
    only adds a short sleep between empty polls.

    Once a back-off is under way (an empty fetch since the last records), a due check first asks
    :class:`streaming.end_offsets.EndOffsetProbe` whether any fetchable partition's last stable
    offset differs from the consumer's position: one ListOffsets round trip on a private socket,
    ~10x cheaper than an empty ``poll``. Only "yes" or "cannot tell" leads to the real fetch; "no"
    counts as an empty poll. A real fetch still happens at least every ``full_poll_s``: by default
    ``FULL_POLL_S`` for a group member and ``FULL_POLL_MANUAL_S`` for a consumer outside any group (the
    serving worker's model-updates follower, a Subscriber without a group). Such a consumer needs no
    fetch for a rebalance or a poll interval, and a fetch a second was ~40 % of an idle follower's CPU.
    ``probe=False`` turns it off.
    """

    def __init__(self, consumer: KafkaConsumer, min_idle_s: float = 0.001, max_idle_s: float = IDLE_MAX_S,
                 read_ms: int = 2, wake: threading.Event | None = None, probe: bool = True,
                 full_poll_s: float | None = None) -> None:
        if not 0 < min_idle_s <= max_idle_s <= IDLE_CAP_LIMIT_S:
            raise ValueError(f"IdlePoller needs 0 < min_idle_s <= max_idle_s <= {IDLE_CAP_LIMIT_S} s (a longer cap "
                             f"delays the first record after idle); got min_idle_s={min_idle_s}, "
                             f"max_idle_s={max_idle_s}")
        self.consumer = consumer
        self.min_idle_s, self.max_idle_s, self.read_ms = min_idle_s, max_idle_s, read_ms
        self.wake = wake
        self._idle_s = min_idle_s
        #: monotonic time before which no fetch is sent (one back-off after the last empty poll); 0: none.
        self._next_fetch_at = 0.0
        self._assigned: frozenset[TopicPartition] = frozenset()
        self.probe = EndOffsetProbe(consumer) if probe else None
        if full_poll_s is None:
            grouped = getattr(consumer, "config", {}).get("group_id") is not None
            full_poll_s = FULL_POLL_S if grouped else FULL_POLL_MANUAL_S
        self.full_poll_s = full_poll_s
        self._polled_at = 0.0  # monotonic time of the last real fetch
        self.fetches = 0  # real fetches made (tests and docs/IDLE.md read it)

    def close(self) -> None:
        """Close the probe's socket (the consumer is the caller's to close)."""
        if self.probe is not None:
            self.probe.close()

    def reset(self) -> None:
        """Forget the back-off (the next poll fetches at once; an empty one then sleeps ``min_idle_s``)."""
        self._idle_s = self.min_idle_s
        self._next_fetch_at = 0.0

    def poll(self, timeout_ms: int = 200, max_records: int | None = None) -> dict[TopicPartition, list[Any]]:
        """Like ``KafkaConsumer.poll``: records as soon as there are some, else ``{}`` after ``timeout_ms``."""
        deadline = time.monotonic() + max(0, timeout_ms) / 1000
        while True:
            assigned = frozenset(self.consumer.assignment())
            if assigned != self._assigned:
                first, self._assigned = not self._assigned, assigned
                self.reset()
                if not first and time.monotonic() < deadline and assigned:
                    # A rebalance happened inside this call: hand control back before fetching more,
                    # so the caller repositions the new partitions first (as after a plain poll).
                    return {}
            if not assigned or assigned <= set(self.consumer.paused()) or _joining(self.consumer):
                remaining_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
                records = self._got(self.consumer.poll(timeout_ms=remaining_ms, max_records=max_records))
                if records or remaining_ms == 0 or frozenset(self.consumer.assignment()) == assigned:
                    return records
                continue  # the join ended inside the poll: apply the assignment change above
            # The back-off runs on its own clock, across calls: the next fetch is due one back-off after
            # the last empty one, however the caller slices its time. (When each call started with a
            # fetch and ended with one at its deadline, a worker polling in 100 ms calls fetched ~30
            # times a second with a 64 ms cap instead of ~15, doubling its idle CPU.)
            now = time.monotonic()
            if now < self._next_fetch_at:
                pause_s = min(self._next_fetch_at, deadline) - now  # a back-off, not a wait for an event
                if pause_s > 0:
                    if self.wake is None:
                        time.sleep(pause_s)
                    elif self.wake.wait(pause_s):
                        return {}
                if time.monotonic() >= deadline and time.monotonic() < self._next_fetch_at:
                    return {}  # the call's time ran out inside the back-off: no fetch is due yet
                continue  # re-check the assignment and joins, then fetch
            if self._nothing_new(assigned, now):
                records = {}
            else:
                # Not poll(0): that returns the answer to the fetch sent one back-off ago and costs as much.
                # A full read_ms even at the deadline: a call may end one short fetch late, never early.
                records = self.consumer.poll(timeout_ms=self.read_ms, max_records=max_records)
                self._polled_at = time.monotonic()
                self.fetches += 1
                if records:
                    return self._got(records)
            self._next_fetch_at = time.monotonic() + self._idle_s
            self._idle_s = min(self.max_idle_s, self._idle_s * 2)
            if time.monotonic() >= deadline:
                return {}

    def _nothing_new(self, assigned: frozenset[TopicPartition], now: float) -> bool:
        """True when the probe says no fetchable partition has anything past its position (so no fetch is
        needed now); False to fetch: no probe, no back-off under way yet, a real fetch due, or the probe
        saw news or could not tell."""
        if self.probe is None or self._idle_s <= self.min_idle_s or now - self._polled_at >= self.full_poll_s:
            return False
        return self.probe.has_news(assigned - set(self.consumer.paused())) is False

    def _got(self, records: Any) -> dict[TopicPartition, list[Any]]:
        if records:
            self.reset()
        return dict(records)
