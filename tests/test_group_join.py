"""A group whose coordinator dropped a parked JoinGroup recovers (streaming.rejoin, docs/GROUP_JOIN.md).

The wedge is made on the real embedded broker with two real kafka-python static members: the
second one's JoinGroup is sent about 300 ms (noida-db's initial rebalance delay) after the first,
so it lands while the first round completes; in a good share of tries the broker then never
answers the first member's JoinGroup and the group sits in PreparingRebalance. The test retries
that start until the wedge is there (each try about a second), shows that it holds, and only then
lets each member's Rejoiner look at it: both must own partitions soon after.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import FencedInstanceIdError

from benchmarks.stress_group_join import JoinSent
from streaming import members
from streaming.config import Settings
from streaming.consumer import consumer_config
from streaming.kafka_security import kafka_security
from streaming.polling import poll_until
from streaming.rejoin import Rejoiner
from streaming.topics import raw_topic

TRIES = 40
BUDGET_S = 20.0  # of tries; a try costs about a second
#: Second member's start after the first one's JoinGroup went out; the wedge needs its JoinGroup to
#: arrive right when the first round completes (the broker's 300 ms initial delay).
GAPS_S = (0.305, 0.31, 0.315, 0.32, 0.30, 0.325)
HELD_S = 2.5  # a round of two fresh members completes in ~0.3 s; this long in PreparingRebalance is the wedge


@dataclass
class _Member:
    settings: Settings
    group: str
    topic: str
    slot: int
    lease: members.Lease = field(init=False)
    consumer: KafkaConsumer = field(init=False)
    rejoiner: Rejoiner = field(init=False)
    owned: frozenset[Any] = frozenset()
    errors: list[BaseException] = field(default_factory=list)
    recover: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.lease = members.claim(self.settings, self.group, "test-join", slot=self.slot)
        self.consumer = KafkaConsumer(**consumer_config(
            self.settings, group_id=self.group, group_instance_id=self.lease.instance_id,
            client_id=f"join{self.slot}-{self.group}"))
        self.consumer.subscribe([self.topic])
        self.consumer.poll(0)  # find the coordinator now, so the JoinGroup goes out as soon as the loop starts
        self.rejoiner = Rejoiner(self.settings, self.group, self.lease, f"member {self.slot}", timeout_s=1.0)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name=f"member{self.slot}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.consumer.poll(50)
            except FencedInstanceIdError as exc:
                if not self.rejoiner.fenced(exc):
                    self.errors.append(exc)
                    return
            self.owned = frozenset(self.consumer.assignment())
            if self.recover.is_set():
                self.rejoiner.check(self.consumer, self.owned)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(30)
        self.consumer.close(timeout_ms=2000)
        self.lease.release()  # static members stay in a group after close; leave it explicitly


@pytest.fixture()
def admin(settings: Settings) -> Iterator[KafkaAdminClient]:
    client = KafkaAdminClient(bootstrap_servers=settings.bootstrap, **kafka_security(settings))
    yield client
    client.close()


def _state(admin: KafkaAdminClient, group: str) -> str:
    return str(admin.describe_groups([group])[group].get("group_state"))


def _wedge(settings: Settings, admin: KafkaAdminClient, sent: JoinSent,
           trace: list[tuple[float, float | None, bool]]) -> tuple[list[_Member], str] | None:
    """Start pairs of members until the broker drops a JoinGroup; the wedged pair (running) or None.

    ``trace`` gets (intended gap, JoinGroup gap seen, wedged) per try, for the messages."""
    end = time.monotonic() + BUDGET_S
    for attempt in range(TRIES):
        if time.monotonic() > end:
            break
        group = f"{settings.topic_prefix}join{uuid.uuid4().hex[:8]}"
        topic = group + ".t"
        admin.create_topics([NewTopic(topic, 3, 1)])
        pair = [_Member(settings, group, topic, slot) for slot in (0, 1)]
        try:
            sent.at.clear()
            pair[0].start()
            key = f"kafka-io-join0-{group}"

            def joined(key: str = key) -> float | None:
                return sent.at.get(key)

            def both_own(pair: list[_Member] = pair) -> bool:
                return all(m.owned for m in pair)

            first = poll_until(joined, 10, interval_s=0.001)
            assert first, "the first member sent no JoinGroup within 10 s"
            gap = GAPS_S[attempt % len(GAPS_S)]
            while time.monotonic() < first + gap:
                pass  # a busy wait of < 0.3 s: the start offset is what is under test
            pair[1].start()
            settled = poll_until(both_own, HELD_S, interval_s=0.05)
            second = sent.at.get(f"kafka-io-join1-{group}")
            wedged = not settled and _state(admin, group) == "PreparingRebalance" and not any(m.owned for m in pair)
            trace.append((gap, None if second is None else round(second - first, 3), wedged))
            if wedged:
                return pair, group
        except BaseException:
            for m in pair:
                m.close()
            raise
        for m in pair:
            m.close()
    return None


def test_a_group_wedged_by_a_dropped_join_recovers(settings: Settings, admin: KafkaAdminClient) -> None:
    """~10 s on a quiet box: making the wedge takes 1-20 s (random per try), recovering a few seconds.

    Fails without the Rejoiner (the group stays in PreparingRebalance, checked by hand)."""
    sent = JoinSent()
    trace: list[tuple[float, float | None, bool]] = []
    coordinator_log = logging.getLogger("kafka.coordinator")
    old_level = coordinator_log.level
    coordinator_log.setLevel(logging.DEBUG)
    coordinator_log.addHandler(sent)
    try:
        made = _wedge(settings, admin, sent, trace)
    finally:
        coordinator_log.removeHandler(sent)
        coordinator_log.setLevel(old_level)
    if made is None:
        pytest.skip(f"noida-db answered every JoinGroup in {len(trace)} tries (the race needs the second JoinGroup "
                    f"to land as the first round completes; tries: {trace}); nothing to recover from")
    pair, group = made
    try:
        # The wedge holds: still nobody assigned, still PreparingRebalance, a while later.
        held = poll_until(lambda: any(m.owned for m in pair) or _state(admin, group) != "PreparingRebalance",
                          HELD_S, interval_s=0.2)
        assert not held, "the group settled by itself; not the wedge this test is about"
        for m in pair:
            m.recover.set()
        def split() -> bool:  # each owns some, none twice (a member alone in a round briefly owns all three)
            parts = [sorted(p.partition for p in m.owned) for m in pair]
            return all(parts) and sorted(parts[0] + parts[1]) == [0, 1, 2]

        ok = poll_until(split, 25, interval_s=0.1)
        kicks = [m.rejoiner.total_kicks for m in pair]
        assert ok, (f"still wedged 25 s after the Rejoiners started: state {_state(admin, group)}, "
                    f"owned {[sorted(p.partition for p in m.owned) for m in pair]}, self-removals {kicks}, "
                    f"errors {[m.errors for m in pair]}; tries to make the wedge: {trace}")
        assert sum(kicks) >= 1 and not any(m.errors for m in pair)
    finally:
        for m in pair:
            m.close()


def test_rejoiner_leaves_a_member_alone_outside_a_wedge(settings: Settings) -> None:
    """An assigned member, or one not in a join, is never removed (no admin call is even needed)."""
    lease = members.claim(settings, "g-alone", "test-join")
    try:
        r = Rejoiner(settings, "g-alone", lease, "m", timeout_s=0.0)
        # A consumer with manually assigned partitions never joins a group.
        manual = KafkaConsumer(**consumer_config(settings))
        tp = TopicPartition(raw_topic(settings, "sensor"), 0)
        manual.assign([tp])
        try:
            assert not r.check(manual, {tp}) and not r.check(manual, {tp})  # owns something
            assert not r.check(manual, set()) and not r.check(manual, set())  # owns nothing, joins nothing
        finally:
            manual.close()
        assert r.total_kicks == 0
        assert not r.check(manual, {tp})  # owns something again: the spell is over
        assert not r.fenced(FencedInstanceIdError())  # a fence outside a spell without partitions is real
    finally:
        lease.release(leave=False)
