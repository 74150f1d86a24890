"""The embedded broker's loss window under ``kill -9``, without and with the publisher's ack ledger.

What is measured (each mode on its own embedded broker in a temp home, started and killed here,
never the broker of the other benchmarks):

* a sender publishes numbered records at ``RATE`` records/s through ``streaming.producer.Publisher``;
* every ``PERIOD_S`` the broker is killed with SIGKILL and started again on the same data dir,
  ``KILLS`` times;
* at the end the publisher settles and the topic is read back.

Figures per mode: acked records missing from the topic (total and per kill), duplicates on the
topic, and the *loss window*: for each kill, the time between the oldest lost ack and the kill.
Baseline mode ``unguarded`` is ``broker_loss_window_s = 0`` (no ledger: what the broker loses);
``guarded`` is the default ledger (re-sends what the broker lost). Goal: 0 acked records lost and
0 duplicates with the ledger (the ratio is lost-with / lost-without, goal 0).

    python -m benchmarks.bench_broker_crash
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import machine, write_report
from streaming import config
from streaming.broker import EmbeddedBroker, free_port
from streaming.consumer import Subscriber
from streaming.producer import Publisher
from streaming.topics import ensure_topics, raw_topic

RATE = 2000
KILLS = 4
PERIOD_S = 3.0
DOWN_S = 0.5


def _mode(window_s: float) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="streamlearn-bench-crash-"))
    s = config.load({"home": home, "broker_port": free_port(), "metrics_port": -1,
                     "broker_loss_window_s": window_s}, environ={})
    broker = EmbeddedBroker(s)
    broker.start(detach=False)
    ensure_topics(s)
    topic = raw_topic(s, "weblog")
    acks: dict[bytes, tuple[int, int, float]] = {}
    failed: list[str] = []
    stop = threading.Event()
    pub = Publisher(s)

    def send() -> None:
        i = 0
        start = time.monotonic()
        while not stop.is_set():
            value = b"rec-%09d" % i
            fut = pub.send_bytes(topic, value, key=b"k%d" % (i % 7))
            fut.add_callback(lambda md, v=value: acks.__setitem__(v, (md.partition, md.offset, time.monotonic())))
            fut.add_errback(lambda exc: failed.append(type(exc).__name__))
            i += 1
            delay = start + i / RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing of a load generator

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    kills: list[float] = []
    try:
        for _ in range(KILLS):
            time.sleep(PERIOD_S)  # load runs between kills
            broker.kill()
            kills.append(time.monotonic())
            time.sleep(DOWN_S)  # the broker stays down a moment
            broker = EmbeddedBroker(s)
            broker.start(detach=False)
        time.sleep(PERIOD_S)
        stop.set()
        sender.join()
        settled = pub.settle(timeout=120)
        pub.close()
        with Subscriber(s, topic, start="beginning", until="end", decode=False) as sub:
            seen = Counter(rec.raw for rec in sub)
    finally:
        stop.set()
        broker.stop()
    lost = [v for v in acks if v not in seen]
    dups = sum(n - 1 for n in seen.values() if n > 1)
    windows = []
    for i, k in enumerate(kills):
        since = kills[i - 1] if i else 0.0
        lost_here = [acks[v][2] for v in lost if since < acks[v][2] <= k]
        windows.append(round(k - min(lost_here), 3) if lost_here else 0.0)
    # what the broker itself dropped in the guarded mode: the ledger's tally of lost-and-re-sent records
    resent = pub.ledger.stats.resent_lost
    return {"broker_loss_window_s": window_s, "sent_acked": len(acks), "send_failures": len(failed),
            "acked_lost": len(lost), "acked_lost_per_kill": round(len(lost) / KILLS, 1), "duplicates": dups,
            "ledger_resent_lost": resent, "ledger_stats": vars(pub.ledger.stats), "settled": settled,
            "loss_window_s_per_kill": windows, "on_topic": sum(seen.values())}


def run(settings: Any = None) -> dict[str, Any]:
    """``settings`` is ignored: this benchmark kills brokers, so it starts its own."""
    unguarded = _mode(0.0)
    guarded = _mode(5.0)
    before = unguarded["acked_lost"]
    result = {
        "benchmark": "broker_crash", "machine": machine(), "rate": RATE, "kills": KILLS, "period_s": PERIOD_S,
        "unguarded": unguarded, "guarded": guarded,
        "table": [
            {"figure": "acked records lost per kill (no ledger)", "value": unguarded["acked_lost_per_kill"],
             "baseline": "-", "ratio": "-", "goal": "measured"},
            {"figure": "loss window per kill, s (no ledger)", "value": max(unguarded["loss_window_s_per_kill"]),
             "baseline": "-", "ratio": "-", "goal": "measured"},
            {"figure": "acked records lost per kill (ledger)", "value": guarded["acked_lost_per_kill"],
             "baseline": unguarded["acked_lost_per_kill"],
             "ratio": round(guarded["acked_lost"] / before, 3) if before else 0.0, "goal": 0},
            {"figure": "duplicates on the topic (ledger)", "value": guarded["duplicates"], "baseline": 0,
             "ratio": "-", "goal": 0},
        ],
    }
    return result


def main() -> int:
    result = run()
    path = write_report("bench_broker_crash", result)
    print(json.dumps({k: result[k] for k in ("unguarded", "guarded")}, indent=2, default=str))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
