"""A group member whose JoinGroup the coordinator never answers leaves and re-joins, bounded.

Why (docs/GROUP_JOIN.md): the embedded broker (noida-db 0.2.3) can drop a member's parked JoinGroup.
A JoinGroup that arrives while the group is completing a round restarts the round (as on Kafka),
but a member whose JoinGroup of the completed round was parked and not yet answered at that moment is
never answered: its client waits for that answer (kafka-python gives a JoinGroup ``max_poll_interval
+ 5 s`` = 305 s), never sends another JoinGroup, and the coordinator waits for it to join the new
round. The group sits in PreparingRebalance with every member alive and none assigned -- two stream
workers started 0.3 s apart hit it (the broker's initial rebalance delay is 300 ms, so the second
JoinGroup lands just as the first round completes). Neither a new JoinGroup of another member nor
removing another member completes the round; removing the member whose answer was dropped does, and
its parked JoinGroup is then answered (FENCED_INSTANCE_ID), so its client joins afresh.

No member can tell from outside whether its own answer was dropped or it waits for one that was, so
each member that (1) has owned nothing for longer than the session timeout, (2) has a join under way
and (3) sees its group in PreparingRebalance removes *itself* (KIP-345 RemoveMembersFromConsumerGroup
by its ``group.instance.id``, what a clean stop does) and re-joins. If it was the one dropped, the
round completes; if not, the dropped one does the same at its own check. It is bounded: at most
``MAX_KICKS`` per spell without partitions, the first after ``timeout_s``, each next one after
twice the previous wait, each logged as a WARNING. On Apache Kafka that state means a member is slow
to re-join (the coordinator waits up to its rebalance timeout); a self-removal there costs one extra
join of this member and nothing else, so the rule is the same everywhere.

The removal answers the parked JoinGroup with FENCED_INSTANCE_ID, which kafka-python raises from the
next ``poll``; :meth:`Rejoiner.fenced` tells the caller that this one was our own doing (the next
poll joins again). Any other fencing (a second process with our instance id) is still raised.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from streaming.config import Settings
from streaming.members import Lease, describe_group

log = logging.getLogger(__name__)

MAX_KICKS = 3
#: Each wait is stretched by a random factor up to this. Members started together would otherwise
#: remove themselves, and so re-join, as far apart as they first joined -- ~0.3 s when the wedge came
#: from that gap -- and could hit the same race again (seen in the stress run before the jitter).
JITTER = 0.5
#: How long after our own removal a FencedInstanceIdError from poll is taken as its answer.
FENCE_WINDOW_S = 120.0


def join_under_way(consumer: Any) -> bool:
    """True while ``consumer`` wants to (re-)join its group (kafka-python's ``need_rejoin``).

    With :mod:`streaming.kafka_compat` installed this includes a JoinGroup sent and not yet answered.
    """
    from streaming.consumer import _joining

    return _joining(consumer)


class Rejoiner:
    """Removes this member from its group and lets it re-join when its join is wedged (module doc).

    Call :meth:`check` once per loop with the consumer and what it owns; wrap the loop's ``poll`` so
    a ``FencedInstanceIdError`` for which :meth:`fenced` is true is swallowed.
    """

    def __init__(self, settings: Settings, group: str, lease: Lease, what: str, timeout_s: float = 10.0,
                 max_kicks: int = MAX_KICKS) -> None:
        self.settings, self.group, self.lease, self.what = settings, group, lease, what
        self.timeout_s, self.max_kicks = timeout_s, max_kicks
        self.kicks = 0  # in the current spell without partitions
        self.total_kicks = 0
        self._since: float | None = None
        self._next_at = 0.0
        self._kicked_at: float | None = None
        self._random = random.Random()  # per member; seeded from the OS, so two members differ

    def check(self, consumer: Any, owned: set[Any] | frozenset[Any]) -> bool:
        """One look; True when this call removed the member so that it re-joins."""
        now = time.monotonic()
        if owned:
            if self.kicks:
                log.info("%s owns partitions again after %d self-removal(s)", self.what, self.kicks)
            self._since, self.kicks = None, 0
            return False
        if self._since is None:
            self._since, self._next_at = now, now + self._wait(self.timeout_s)
            return False
        if self.kicks >= self.max_kicks or now < self._next_at:
            return False
        self._next_at = now + self._wait(self.timeout_s)  # look again a timeout later, whatever we find now
        if not join_under_way(consumer):
            return False  # not waiting on a join: nothing of ours to unstick (StuckWatch says why)
        try:
            state, members = describe_group(self.settings, self.group)
        except Exception as exc:  # the broker is unreachable: nothing to do now, look again later
            log.info("%s: could not describe group %s (%s)", self.what, self.group, exc)
            return False
        if state != "PreparingRebalance":
            return False
        try:
            self.lease.leave()
        except Exception as exc:
            log.warning("%s: could not remove itself from group %s to re-join (%s)", self.what, self.group, exc)
            return False
        self.kicks += 1
        self.total_kicks += 1
        self._kicked_at = now
        self._next_at = now + self._wait(self.timeout_s * 2 ** self.kicks)
        log.warning("%s has owned nothing for %.0f s while group %s sat in PreparingRebalance with %d member(s) "
                    "and its own JoinGroup unanswered; it removed itself from the group (%d of at most %d) and "
                    "joins again (a coordinator that dropped a parked JoinGroup, docs/GROUP_JOIN.md)",
                    self.what, now - self._since, self.group, len(members), self.kicks, self.max_kicks)
        return True

    def _wait(self, base_s: float) -> float:
        return base_s * (1.0 + JITTER * self._random.random())

    def fenced(self, exc: BaseException) -> bool:
        """True when ``exc`` is the FencedInstanceIdError that our own removal answered the join with."""
        from kafka.errors import FencedInstanceIdError

        if not isinstance(exc, FencedInstanceIdError) or self._kicked_at is None:
            return False
        if time.monotonic() - self._kicked_at > FENCE_WINDOW_S:
            return False
        log.info("%s: its wedged JoinGroup was answered with %s after its self-removal; joining again",
                 self.what, type(exc).__name__)
        return True
