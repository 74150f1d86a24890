"""The gateway's journal of sends (streaming/ackjournal.py): frames, torn tails, the lock, dropping
confirmed segments, and recovery over the real session broker (the broker is not killed here; the
crash itself is tests/test_broker_crash_ingest.py::test_gateway_and_broker_killed_together_*)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from streaming.ackjournal import (
    AckJournal,
    JournalLockedError,
    JournalRecord,
    attach,
    encode,
    read_segment,
    recover,
)
from streaming.config import Settings
from streaming.producer import Publisher
from streaming.topics import raw_topic
from tests.helpers import read_topic, wait_until


def test_frames_round_trip_and_a_torn_tail_ends_the_read(tmp_path: Path) -> None:
    recs = [JournalRecord(1, "t.a", None, b"v1", []), JournalRecord(2, "t.b", b"", b"", [("h", b"x"), ("e", b"")]),
            JournalRecord(3, "t.c", b"k" * 300, b"\x00" * 70_000, [("sl.event_id", b"id")])]
    seg = tmp_path / "0.seg"
    data = b"".join(encode(r) for r in recs)
    seg.write_bytes(data + encode(JournalRecord(4, "t.d", b"k", b"torn", []))[:-2])
    assert list(read_segment(seg)) == recs
    junk = b"\xff" * 7
    seg.write_bytes(data + struct.pack(">II", len(junk), zlib.crc32(junk)) + junk)  # a whole frame, not a record
    assert list(read_segment(seg)) == recs
    flipped = bytearray(data)
    flipped[-1] ^= 1  # a corrupt last frame: its crc says so
    seg.write_bytes(bytes(flipped))
    assert list(read_segment(seg)) == recs[:2]


def test_one_journal_per_directory(tmp_path: Path) -> None:
    first = AckJournal(tmp_path / "j")
    with pytest.raises(JournalLockedError, match="in use by another process"):
        AckJournal(tmp_path / "j")
    first.close(settled=False)
    AckJournal(tmp_path / "j").close(settled=True)


def test_confirmed_segments_are_dropped_and_a_clean_close_leaves_none(settings: Settings, tmp_path: Path) -> None:
    topic = raw_topic(settings, "weblog")
    with Publisher(settings) as pub:
        journal = attach(pub, tmp_path / "j")
        assert journal is not None
        journal.segment_s = 0.05
        for i in range(30):
            pub.send_bytes(topic, b"r%d" % i, key=b"k")
        journal.sync()
        pub.flush()
        wait_until(lambda: len(list((tmp_path / "j").glob("*.seg"))) <= 1, 30, message="confirmed segments gone")
        pub.send_bytes(topic, b"last", key=b"k")
        assert pub.settle(timeout=30)
    assert not list((tmp_path / "j").glob("*.seg"))


def test_recover_sends_again_only_what_the_topic_lacks(settings: Settings, tmp_path: Path) -> None:
    """A journal a crashed gateway left: two records on the topic, one lost by the broker, one sent twice
    (the client's resend after a failure) and one whose send failed for good, one for a deleted topic."""
    topic = raw_topic(settings, "weblog")
    with Publisher(settings) as pub:
        on_topic = [pub.send_bytes(topic, b"kept-%d" % i, key=b"k", headers=[("sl.event_id", b"%d" % i)])
                    for i in range(2)]
        assert pub.settle(timeout=30) and all(f.succeeded() for f in on_topic)
    jdir = tmp_path / "j"
    jdir.mkdir()
    now = on_topic[0].value.timestamp
    frames = [JournalRecord(now, topic, b"k", b"kept-0", [("sl.event_id", b"0")]),
              JournalRecord(now, topic, b"k", b"kept-1", [("sl.event_id", b"1")]),
              JournalRecord(now, topic, b"k", b"lost", [("sl.event_id", b"2")]),
              JournalRecord(now, topic, b"k", b"twice", [])]
    from streaming.ackguard import record_digest
    from streaming.ackjournal import FAILED

    failed = JournalRecord(now, FAILED, None, record_digest(b"k", b"twice", []).encode(), [])
    gone = JournalRecord(now, f"{topic}.deleted", b"k", b"gone", [])
    (jdir / "7.seg").write_bytes(b"".join(encode(f) for f in frames) + encode(frames[3]) + encode(failed)
                                 + encode(gone))
    with Publisher(settings) as pub:
        journal = attach(pub, jdir)
        assert journal is not None and journal.leftover == [jdir / "7.seg"]
        done = recover(pub, journal)
        assert done == {"journaled": 6, "resent": 2, "gone": 1}
        assert not (jdir / "7.seg").exists()
        assert pub.settle(timeout=30)
    values = sorted(r.raw for r in read_topic(settings, topic, decode=False, expect=4))
    assert values == [b"kept-0", b"kept-1", b"lost", b"twice"]


def test_a_gateway_whose_journal_cannot_be_written_answers_503_not_accepted(settings: Settings,
                                                                            tmp_path: Path) -> None:
    """Sent and acked, but not in the journal (a full disk): the answer must not say "accepted"."""
    import errno

    from fastapi.testclient import TestClient

    from ingest.gateway.routes import create_app
    from tests.test_gateway_http import AUTH, gateway_settings, weblog

    app = create_app(gateway_settings(settings))
    journal = attach(app.state.gateway.publisher, tmp_path / "j")
    assert journal is not None

    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    journal.sync = full  # type: ignore[method-assign]
    with TestClient(app) as tc:
        r = tc.post("/ingest/weblog", json=[weblog(1), weblog(2)], headers=AUTH)
        assert r.status_code == 503 and r.headers["Retry-After"], r.text
        body = r.json()
        assert body["accepted"] == 0 and all(x["retryable"] for x in body["results"])
        assert "could not write its journal" in body["results"][0]["error"]
        assert "No space left" in body["results"][0]["error"]


def test_recover_when_every_journaled_topic_is_gone(settings: Settings, tmp_path: Path) -> None:
    """The embedded broker killed with -9 can lose a topic created a moment before (a worker's dead-letter
    topic): recovery counts its records gone and returns, instead of failing on an empty read-back span
    (the restarted worker died on ``min()`` of nothing, every time, before)."""
    jdir = tmp_path / "j"
    jdir.mkdir()
    topic = f"{raw_topic(settings, 'weblog')}.lost-in-the-crash"
    (jdir / "3.seg").write_bytes(b"".join(encode(JournalRecord(1_700_000_000_000 + i, topic, b"k", b"v%d" % i, []))
                                          for i in range(3)))
    with Publisher(settings) as pub:
        journal = attach(pub, jdir)
        assert journal is not None
        assert recover(pub, journal) == {"journaled": 3, "resent": 0, "gone": 3}
        assert not (jdir / "3.seg").exists()


def test_recover_creates_a_lost_topic_of_its_own_again_and_sends_all_its_records(bare_settings: Settings,
                                                                                tmp_path: Path) -> None:
    """The embedded broker killed together with a stream worker lost the worker's dead-letter topic
    whole (created a moment before); recovery took it for a deleted one and dropped 39 dead letters whose
    source offsets were already committed. A topic the caller names in ``recreate`` is created again, as
    declared, and gets every journaled record back; another missing topic still counts as deleted."""
    from streaming.offsets import topic_names
    from streaming.topics import dead_letter_topic, declared_topics

    settings = bare_settings
    dlq = dead_letter_topic(settings, "image")
    other = dead_letter_topic(settings, "sensor")
    assert not {dlq, other} & topic_names(settings)
    jdir = tmp_path / "j"
    jdir.mkdir()
    now = 1_700_000_000_000
    (jdir / "5.seg").write_bytes(b"".join(
        [encode(JournalRecord(now + i, dlq, b"k%d" % i, b"letter-%d" % i, [("dl.reason", b"corrupt")]))
         for i in range(4)] + [encode(JournalRecord(now, other, b"k", b"not ours", []))]))
    with Publisher(settings) as pub:
        journal = attach(pub, jdir)
        assert journal is not None
        assert recover(pub, journal, recreate={dlq}) == {"journaled": 5, "resent": 4, "gone": 1}
        assert pub.settle(timeout=30)
    assert dlq in topic_names(settings) and other not in topic_names(settings)
    spec = next(s for s in declared_topics(settings) if s.name == dlq)
    from streaming.topics import describe

    assert describe(settings, [dlq])[0]["partitions"] == spec.partitions
    letters = read_topic(settings, dlq, decode=False, expect=4)
    assert sorted(r.raw for r in letters) == [b"letter-%d" % i for i in range(4)]
    assert not (jdir / "5.seg").exists()


def test_a_stream_worker_whose_dead_letter_topic_was_lost_creates_it_and_sends_its_letters(
        bare_settings: Settings) -> None:
    """The worker end of the test above: its start recovers its journal with its own dead-letter topic
    to re-create (a worker killed with the broker; seen with the image worker, 39 dead letters lost)."""
    from streaming.offsets import topic_names
    from streaming.topics import dead_letter_topic, declared_topics, ensure_topics
    from streaming.worker import StreamWorker

    settings = bare_settings
    ensure_topics(settings, [s for s in declared_topics(settings) if s.name == raw_topic(settings, "sensor")])
    dlq = dead_letter_topic(settings, "sensor")
    worker = StreamWorker(settings, "sensor", instance_id="slot0")
    jdir = worker.publisher.ledger.journal.directory
    worker.close()
    assert dlq not in topic_names(settings), "the worker created its dead-letter topic; the test cannot lose it"
    (jdir / "9.seg").write_bytes(b"".join(encode(JournalRecord(1_700_000_000_000 + i, dlq, b"k", b"bad-%d" % i, []))
                                          for i in range(3)))
    worker = StreamWorker(settings, "sensor", instance_id="slot0")  # the same command, restarted
    try:
        assert worker.publisher.settle(timeout=30)
    finally:
        worker.close()
    assert sorted(r.raw for r in read_topic(settings, dlq, decode=False, expect=3)) == [b"bad-0", b"bad-1", b"bad-2"]


def test_under_steady_traffic_every_finished_segment_is_marked_at_each_collect(tmp_path: Path) -> None:
    """A segment got its mark only once the one before it was deleted, so at most one segment went per
    loss window (5 s) whatever the traffic: a gateway under steady load kept 675 segments and their
    records in memory after 20 minutes. Every segment whose sends are done is marked at each collect."""
    from types import SimpleNamespace

    from streaming.ackjournal import AckJournal

    class Ledger:
        acked, confirmed = 0, 0

        def acked_mark(self) -> int:
            return self.acked

        def confirmed_mark(self) -> int:
            return self.confirmed

    journal, ledger = AckJournal(tmp_path / "j", segment_s=0.0), Ledger()
    sends = [SimpleNamespace(topic="t", key=b"k", record_value=b"v%d" % i, headers=[], is_done=True)
             for i in range(6)]
    for fut in sends:
        journal.append(fut)  # segment_s 0: every send after the first closes the one before
    ledger.acked = 10
    journal.collect(ledger)  # closes the sixth too; all six finished: all marked 10, none confirmed yet
    assert len(list((tmp_path / "j").glob("*.seg"))) == 7  # and a new, empty open segment
    ledger.acked, ledger.confirmed = 20, 10  # one loss window later: everything up to 10 is kept
    journal.collect(ledger)
    assert len(list((tmp_path / "j").glob("*.seg"))) == 1  # only the open segment (was: one segment per window)
    journal.close(settled=True)
