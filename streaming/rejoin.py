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
and (3) sees its group in PreparingRebalance resets the join: it removes (KIP-345
RemoveMembersFromConsumerGroup by ``group.instance.id``, what a clean stop does) itself and every
other live member of this host whose status file shows no partitions. Their parked JoinGroups are
all answered at once, so they join again within milliseconds of each other, inside one round, and
the round completes. (Removing only itself worked for two workers but not reliably for four: the
re-joins, spread over seconds by each member's own check, made the broker drop a JoinGroup again.)
Members of other hosts are never removed from here. It is bounded: at most ``MAX_KICKS`` resets per
spell without partitions, the first after ``timeout_s``, each next one after twice the previous wait
(each wait stretched by a random 0-50 %), each logged as a WARNING. On Apache Kafka that state means
a member is slow to re-join (the coordinator waits up to its rebalance timeout); a reset there costs
this host's stuck members one extra join and nothing else, so the rule is the same everywhere.

The removal answers each parked JoinGroup with FENCED_INSTANCE_ID, which kafka-python raises from the
next ``poll``; :meth:`Rejoiner.fenced` tells the caller that this one is a reset's answer (the next
poll joins again): while the member owns nothing, a bounded number of times. Any other fencing (a
second process with our instance id elsewhere) is still raised.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from streaming.config import Settings
from streaming.members import Lease, Member, describe_group, local_entries, remove_members

log = logging.getLogger(__name__)

MAX_KICKS = 3
#: Each wait is stretched by a random factor up to this. Members started together would otherwise
#: remove themselves, and so re-join, as far apart as they first joined -- ~0.3 s when the wedge came
#: from that gap -- and could hit the same race again (seen in the stress run before the jitter).
JITTER = 0.5


def join_under_way(consumer: Any) -> bool:
    """True while ``consumer`` wants to (re-)join its group (kafka-python's ``need_rejoin``).

    With :mod:`streaming.kafka_compat` installed this includes a JoinGroup sent and not yet answered.
    """
    from streaming.idlepoll import _joining

    return _joining(consumer)


def held(consumer: Any) -> set[Any]:
    """What ``consumer`` owns for the stuck checks (:class:`streaming.members.StuckWatch`, :class:`Rejoiner`):
    nothing while a join is under way.

    Why: kafka-python keeps the old assignment until a join completes, so a member parked in a rebalance
    that a dead member of this host held open (noida-db never expires it) looked as if it owned its
    partitions: neither check fired, no warning was said and the group sat for minutes. Counted as owning
    nothing, such a member removes the dead members of this host after the session timeout, and a wedged
    join of its own is reset like any other.
    """
    return set() if join_under_way(consumer) else set(consumer.assignment())


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
        self._fences = 0  # FencedInstanceIdErrors taken as a reset's answer in this spell
        self._random = random.Random()  # per member; seeded from the OS, so two members differ

    def check(self, consumer: Any, owned: set[Any] | frozenset[Any]) -> bool:
        """One look; True when this call removed the member so that it re-joins."""
        now = time.monotonic()
        if owned:
            if self.kicks:
                log.info("%s owns partitions again after %d self-removal(s)", self.what, self.kicks)
            self._since, self.kicks, self._fences = None, 0, 0
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
            if state != "PreparingRebalance":
                return False
            targets = self._stuck_local(members)
            remove_members(self.settings, self.group, targets)
        except Exception as exc:  # the broker is unreachable: nothing to do now, look again later
            log.warning("%s: could not reset the join of group %s (%s)", self.what, self.group, exc)
            return False
        self.kicks += 1
        self.total_kicks += 1
        self._kicked_at = now
        self._next_at = now + self._wait(self.timeout_s * 2 ** self.kicks)
        log.warning("%s has owned nothing for %.0f s while group %s sat in PreparingRebalance with %d member(s) "
                    "and its own JoinGroup unanswered; it removed %d stuck member(s) of this host (itself "
                    "included: %s) so that they join again together (%d of at most %d; a coordinator that "
                    "dropped a parked JoinGroup, docs/GROUP_JOIN.md)", self.what, now - self._since, self.group,
                    len(members), len(targets), ", ".join(str(m.instance_id) for m in targets), self.kicks,
                    self.max_kicks)
        return True

    def _stuck_local(self, group_members: list[Member]) -> list[Member]:
        """This member and every other live static member of this host that owns nothing (status file).

        Removed together, their parked JoinGroups are answered at once and they join again within
        milliseconds of each other, inside one round; removed one by one (each at its own check), the
        re-joins were spread over seconds and a later one could make the broker drop a JoinGroup again
        (seen with 4 workers)."""
        status = {e.get("instance_id"): e for e in local_entries(self.settings, self.group)}
        out = []
        for m in group_members:
            if not m.instance_id or not m.local or not m.alive:
                continue
            entry = status.get(m.instance_id) or {}
            if m.instance_id == self.lease.instance_id or not entry.get("partitions"):
                out.append(m)
        if not any(m.instance_id == self.lease.instance_id for m in out):
            out.append(Member("", self.lease.instance_id, "", "", [], None, True, True))
        return out

    def _wait(self, base_s: float) -> float:
        return base_s * (1.0 + JITTER * self._random.random())

    def fenced(self, exc: BaseException) -> bool:
        """True when ``exc`` is a FencedInstanceIdError that a reset of the wedged join answered.

        Ours or a peer's of this host (which removes every stuck member of the host together): it is
        taken as such while this member owns nothing, at most ``2 * max_kicks + 2`` times per spell;
        anything else (a second process with our instance id elsewhere) is still raised."""
        from kafka.errors import FencedInstanceIdError

        if not isinstance(exc, FencedInstanceIdError) or self._since is None:
            return False
        if self._fences >= 2 * self.max_kicks + 2:
            return False
        self._fences += 1
        now = time.monotonic()
        self._next_at = max(self._next_at, now + self._wait(self.timeout_s))  # give the new round its time
        log.info("%s: its wedged JoinGroup was answered with %s after a reset of the group's join; joining again",
                 self.what, type(exc).__name__)
        return True
