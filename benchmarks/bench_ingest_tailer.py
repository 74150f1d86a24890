"""Web-log file tailer throughput against reading + parsing the same file, same run.

* tailer: ``FileTailer`` (once mode) over a log file: read, parse, publish every line to Kafka
  (acks=all, idempotence, snappy), checkpoint only past confirmed lines; timed until every line is
  acked (the same end point as the publish loop). After that, on the embedded broker, the tailer waits
  for the ack ledger to confirm the last lines (``broker_loss_window_s``, 5 s) before its final
  checkpoint: a fixed wait whatever the file's size, reported on its own, not in lines/s.
  Fresh topics and checkpoint per round.
* baseline ``parse``: read the same file and parse every line, nothing published (the issue's
  baseline: what the tailer costs over the parsing it cannot avoid).
* baseline ``publish``: parse + ``Publisher.publish`` of every line and wait for all acks, no
  checkpoint or read-back (what the durability machinery costs over a plain publish loop).

Input: the shared 10,000 real combined-log lines repeated to ``LINES`` lines (or generated demo
traffic when the shared file is absent). Each side runs ``ROUNDS`` times, in alternating order; best of each kept.
Goal (the issue was silent; chosen here): the tailer reaches >= 0.8x of the plain publish loop.
The ratio against parse-only is reported, not gated: publishing to Kafka dominates it.

    python -m benchmarks.bench_ingest_tailer
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import bench_settings, fresh, machine, write_report
from ingest.tailer import FileTailer
from ingest.weblog import parse_line
from streaming.config import Settings
from streaming.producer import Publisher
from streaming.topics import raw_topic

LINES = 30_000  # 3 rounds of ~2-4 s per side: enough for a stable ratio within the 3-min budget
ROUNDS = 3
GOAL = 0.8
APACHE_LOGS = Path(__file__).resolve().parents[2] / "shared/data/weblogs/apache_logs"


def _make_log(directory: Path) -> tuple[Path, str]:
    path = directory / "access.log"
    if APACHE_LOGS.is_file():
        lines = APACHE_LOGS.read_bytes().splitlines(keepends=True)
        source = "shared apache_logs (10,000 real lines, repeated)"
    else:
        from ingest.generators import web_traffic
        from ingest.weblog import format_combined

        lines = [(format_combined(r) + "\n").encode() for r in web_traffic(10_000, seed=1)]
        source = "generated demo traffic (shared apache_logs absent)"
    with path.open("wb") as fh:
        for i in range(LINES):
            fh.write(lines[i % len(lines)])
    return path, source


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process incl. the producer's I/O thread) since ``start``."""
    return time.perf_counter() - start[0], time.process_time() - start[1]


def _parse_only(path: Path) -> tuple[float, float]:
    start = _clock()
    offset = 0
    with path.open("rb") as fh:
        for raw in fh:
            parse_line(raw, source=str(path), position=offset)
            offset += len(raw)
    return _since(start)


def _publish_loop(settings: Settings, path: Path) -> tuple[float, float]:
    with Publisher(settings) as pub:
        pub.serializer(raw_topic(settings, "weblog"), "WebLogEvent")  # registration is setup
        start = _clock()
        futures = []
        offset = 0
        with path.open("rb") as fh:
            for raw in fh:
                futures.append(pub.publish("weblog", parse_line(raw, source=str(path), position=offset)))
                offset += len(raw)
        pub.flush()
        for f in futures:
            f.get(timeout=60)
        return _since(start)


def _tailer(settings: Settings, path: Path) -> tuple[float, float, float]:
    """(wall s, CPU s) until every line is acked, and the wall s of the final confirmation wait."""
    with Publisher(settings) as pub:
        pub.serializer(raw_topic(settings, "weblog"), "WebLogEvent")
        tailer = FileTailer(settings, pub, path)  # start-up (floors, checkpoint) is setup
        acked: list[tuple[float, float]] = []
        settle = pub.settle

        def timed_settle(*args: Any, **kwargs: Any) -> bool:  # the runner settles once every line is acked
            if not acked:
                acked.append(_since(start))
            return settle(*args, **kwargs)

        pub.settle = timed_settle  # type: ignore[method-assign]
        start = _clock()
        stats = tailer.run()
        took = _since(start)
    if stats.published != LINES:
        raise RuntimeError(f"tailer published {stats.published} of {LINES} lines")
    until_acked = acked[0] if acked else took
    return until_acked[0], until_acked[1], took[0] - until_acked[0]


def run(settings: Settings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-tailer-") as tmp:
        path, source = _make_log(Path(tmp))
        inf = (float("inf"), float("inf"))
        parse_t, publish_t, tail_t = inf, inf, inf
        waits: list[float] = []
        for round_no in range(ROUNDS):  # alternate the sides and keep the best of each: less noise
            parse_t = min(parse_t, _parse_only(path))
            # The embedded broker rewrites its data file after writes, so whichever side runs
            # second meets more stored data; swap the order in the second round to be fair.
            if round_no % 2 == 0:
                publish_t = min(publish_t, _publish_loop(fresh(settings), path))
            tailed = _tailer(fresh(settings), path)
            tail_t = min(tail_t, tailed[:2])
            waits.append(tailed[2])
            if round_no % 2 == 1:
                publish_t = min(publish_t, _publish_loop(fresh(settings), path))
        size = path.stat().st_size
    out: dict[str, Any] = {
        "benchmark": "ingest_tailer",
        "machine": machine(),
        "input": source,
        "lines": LINES,
        "bytes": size,
        "tailer_lines_per_s": round(LINES / tail_t[0]),
        "parse_only_lines_per_s": round(LINES / parse_t[0]),
        "publish_loop_lines_per_s": round(LINES / publish_t[0]),
        "ratio_vs_parse_only": round(parse_t[0] / tail_t[0], 3),
        "ratio_vs_publish_loop": round(publish_t[0] / tail_t[0], 3),
        # CPU seconds are steadier than wall time on a shared machine; reported, not gated.
        "tailer_lines_per_cpu_s": round(LINES / tail_t[1]),
        "publish_loop_lines_per_cpu_s": round(LINES / publish_t[1]),
        "cpu_ratio_vs_publish_loop": round(publish_t[1] / tail_t[1], 3),
        "final_confirmation_wait_s": round(sorted(waits)[len(waits) // 2], 2),
        "broker_loss_window_s": settings.broker_loss_window_s,
        "goal_vs_publish_loop": GOAL,
    }
    out["table"] = [
        {
            "figure": "tailer lines/s (parse + publish + ack + checkpoint)",
            "value": out["tailer_lines_per_s"],
            "baseline": out["parse_only_lines_per_s"],
            "ratio": out["ratio_vs_parse_only"],
            "goal": "reported (baseline: read + parse, no Kafka)",
        },
        {
            "figure": "tailer lines/s vs plain publish loop",
            "value": out["tailer_lines_per_s"],
            "baseline": out["publish_loop_lines_per_s"],
            "ratio": out["ratio_vs_publish_loop"],
            "goal": f">= {GOAL}",
        },
        {
            "figure": "tailer's wait for the ack ledger before its final checkpoint, s (median)",
            "value": out["final_confirmation_wait_s"],
            "baseline": settings.broker_loss_window_s,
            "ratio": None,
            "goal": "reported (about the loss window: a fixed wait at the end of a file, not per line)",
        },
    ]
    out["ok"] = out["ratio_vs_publish_loop"] >= GOAL
    write_report("ingest_tailer", out)
    return out


if __name__ == "__main__":
    with bench_settings() as s:
        print(json.dumps(run(s), indent=2))
