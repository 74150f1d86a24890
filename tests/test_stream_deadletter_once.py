"""Dead letters across stream-worker kills: one per source offset.

A worker dead-letters a bad record when it reads it but records the offset as handled only when
its batch is persisted. Here every worker generation is killed with SIGKILL after its dead letters
were acked and before any batch was persisted, three times; the last one persists. Each generation
re-reads the same records; the dead-letter topic must still hold exactly one dead letter per bad
source offset (streaming/deadletters.py).

Each generation runs in its own consumer group: a SIGKILLed member stays in its group on the
embedded broker for minutes (restart and membership are covered elsewhere), and the store, not the
group's commit, decides where a worker resumes.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections import Counter

import pytest

from streaming.config import Settings
from streaming.deadletters import dedupe, source_key
from streaming.producer import Publisher
from streaming.topics import dead_letter_topic, raw_topic
from tests.helpers import read_topic, streamlearn_cmd, subprocess_env, wait_until
from tests.test_stream_worker import stored_offsets

pytestmark = pytest.mark.slow
GENERATIONS = 3


def _dl_keys(settings: Settings) -> Counter[tuple[str, int, int]]:
    items = read_topic(settings, dead_letter_topic(settings, "sensor"), decode=False)
    return Counter(k for k in (source_key(it.headers) for it in items) if k is not None)


def test_dead_letters_across_worker_kills_are_one_per_source_offset(settings: Settings) -> None:
    topic = raw_topic(settings, "sensor")
    bad: set[tuple[str, int, int]] = set()
    with Publisher(settings) as pub:
        for i in range(80):
            if i % 4 == 3:
                md = pub.send_bytes(topic, b"not an avro record %d" % i, key=f"s{i % 5}").get(timeout=30)
                bad.add((topic, md.partition, md.offset))
            else:
                pub.publish("sensor", {"sensor_id": f"s{i % 5}", "timestamp": 1_700_000_000_000 + i * 1000,
                                       "value": float(i), "unit": "c"}).get(timeout=30)
    no_persist = subprocess_env(settings, STREAMLEARN_BATCH_MAX_RECORDS="100000", STREAMLEARN_BATCH_MAX_SECONDS="600")
    for gen in range(GENERATIONS):
        proc = subprocess.Popen(streamlearn_cmd("stream", "sensor", "--group", settings.group(f"dl-gen{gen}")),
                                env=no_persist, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda p=proc, out=lines: out.extend(p.stdout or []), daemon=True)
        reader.start()
        before = sum(_dl_keys(settings).values())

        def handled(g: int = gen, n: int = before, lines: list[str] = lines) -> bool:
            # generation 0 wrote them; later ones either find them (the read-back) or write them again
            if g == 0:
                return set(_dl_keys(settings)) >= bad
            return any("already have their dead letter" in line for line in lines) or \
                sum(_dl_keys(settings).values()) >= n + len(bad)

        try:
            wait_until(handled, 60, interval=0.2, message=f"generation {gen} handled the bad records")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            reader.join(timeout=10)
        assert stored_offsets(settings, "sensor") == [], "this generation was to die before persisting"
    final = subprocess.Popen(streamlearn_cmd("stream", "sensor", "--group", settings.group("dl-final")),
                             env=subprocess_env(settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: len(stored_offsets(settings, "sensor")) >= 80, 60, message="all offsets persisted")
    finally:
        final.send_signal(signal.SIGTERM)
        out, _ = final.communicate(timeout=60)
    assert final.returncode == 0, out[-3000:]
    keys = _dl_keys(settings)
    assert set(keys) == bad and all(n == 1 for n in keys.values()), \
        f"{sum(keys.values())} dead letters for {len(bad)} bad offsets: {sorted(k for k, n in keys.items() if n > 1)}"
    got = stored_offsets(settings, "sensor")
    assert len(got) == len(set(got)) == 80
    assert {(topic, p, o) for p, o in got} >= bad  # the bad offsets are recorded as dead letters in the store
    assert "already have their dead letter" in out


def test_dedupe_keeps_the_first_dead_letter_per_source_offset() -> None:
    class R:
        def __init__(self, t: str, p: int, o: int, n: int) -> None:
            self.headers = [("dl.source_topic", t.encode()), ("dl.source_partition", str(p).encode()),
                            ("dl.source_offset", str(o).encode())]
            self.n = n

    class FileDL:
        headers = [("dl.source_file", b"/x.log"), ("dl.source_line", b"3")]
        n = 9

    recs = [R("a", 0, 1, 1), R("a", 0, 1, 2), R("a", 1, 1, 3), FileDL(), FileDL()]
    assert [r.n for r in dedupe(recs)] == [1, 3, 9, 9]
