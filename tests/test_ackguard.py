"""The publishers' ack ledger on the session broker (no broker is killed here; see test_broker_crash_*).

A broker restart is stood in for by bumping the ledger's epoch: the read-back and re-send paths are
the same ones a real restart takes.
"""

from __future__ import annotations

from streaming.ackguard import record_digest
from streaming.config import Settings
from streaming.producer import Publisher
from streaming.topics import raw_topic
from tests.helpers import read_topic, wait_until


def test_acks_are_confirmed_after_the_window_and_settle_waits_for_them(settings: Settings) -> None:
    s = settings.with_(broker_loss_window_s=0.5)
    topic = raw_topic(s, "weblog")
    with Publisher(s) as pub:
        futs = [pub.send_bytes(topic, b"v%d" % i, key=b"k") for i in range(20)]
        pub.flush()
        assert all(f.succeeded() for f in futs) and pub.ledger.pending() == 20
        assert pub.settle(timeout=30)
        assert pub.ledger.pending() == 0 and pub.ledger.stats.confirmed == 20
        assert pub.ledger.stats.resent_lost == 0
    assert len(read_topic(s, topic, decode=False, expect=20)) == 20


def test_after_an_epoch_change_a_record_missing_at_its_offset_is_sent_again_once(settings: Settings) -> None:
    s = settings.with_(broker_loss_window_s=60.0)  # nothing is confirmed by the window during this test
    topic = raw_topic(s, "weblog")
    with Publisher(s) as pub:
        kept = pub.send_bytes(topic, b"kept", key=b"k")
        lost = pub.send_bytes(topic, b"other", key=b"k")
        pub.flush()
        assert kept.succeeded() and lost.succeeded()
        mark = pub.ledger.acked_mark()
        assert pub.ledger.confirmed_mark() < mark  # acked is not confirmed
        with pub.ledger._cond:
            # what a broker restart with offset reuse looks like from the ledger: the record we acked at this
            # offset ("lost") is not the one the topic holds there ("other"); both acks are older than the window
            for e in pub.ledger._entries:
                e.acked_at -= 120.0
            next(e for e in pub.ledger._entries if e.value == b"other").value = b"lost"
            pub.ledger._watch.epoch += 1
        stats = pub.ledger.stats
        wait_until(lambda: stats.resent_lost == 1 and stats.verified_by_read == 1, 30, message="read back")
        pub.flush()
        assert pub.ledger.pending() == 1  # the re-sent record, until its own window has passed
        # the "kept" record is confirmed, but the mark stays below the lost one's first ack until its re-send is
        assert pub.ledger.confirmed_mark() < mark
        with pub.ledger._cond:
            for e in pub.ledger._entries:
                e.acked_at -= 120.0
        wait_until(lambda: pub.ledger.confirmed_mark() >= mark, 30, message="the re-send confirmed")
        assert pub.ledger.pending() == 0 and not pub.ledger._holds
    values = sorted(r.raw for r in read_topic(s, topic, decode=False, expect=3))
    assert values == [b"kept", b"lost", b"other"]


def test_record_digest_covers_key_value_and_headers() -> None:
    base = record_digest(b"k", b"v", [("h", b"1")])
    assert base == record_digest(b"k", b"v", [("h", b"1")])
    assert len({base, record_digest(b"k", b"v", []), record_digest(b"k", b"w", [("h", b"1")]),
                record_digest(None, b"kv", [("h", b"1")]), record_digest(b"kv", b"", [("h", b"1")])}) == 5
