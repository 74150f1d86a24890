"""Replay throughput against a raw consume, the cost of progress reporting, and a promotion's duration.

On one pre-published sensor topic, per round:

* baselines: a plain kafka-python consumer counting the records (``bench_stream._raw_consume``), and a
  live ``StreamWorker`` doing the same work in a consumer group (``bench_stream._worker``);
* replay, quiet: ``streaming.replay.replay(--from-beginning)`` into a fresh namespace (decode, featurize,
  write durable batches), no progress sink;
* replay, progress: the same with ``streaming.progress`` in line mode (the off-terminal path) at a 0.5 s
  interval, so its cost shows;
* replay, kafka-python: the quiet replay with ``fast_reader=False``, so the fetch is kafka-python's: what
  librdkafka (streaming/cfetch.py) buys a replay, reported, not a goal;
* promote: ``streaming.promote.promote`` of the last namespace (renames + fsyncs + one offset commit).

Two rounds, best of each kept. Goals: replay >= 0.8x the stream worker (the same decode + featurize +
persist, without a group); progress costs <= 5 % (ratio progress/quiet >= 0.95). Wall and CPU seconds of
this process are both reported: on a shared, overloaded box wall time mostly measures waiting for a core.

    python -m benchmarks.bench_replay     # JSON to stdout and reports/bench/replay.json
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

from benchmarks.bench_stream import _publish, _raw_consume, _worker
from benchmarks.common import bench_settings, fresh, machine, write_report
from streaming.config import Settings

N = 20_000
ROUNDS = 2
GOAL_REPLAY = 0.8
GOAL_PROGRESS = 0.95


def _replay(settings: Settings, namespace: str, with_progress: bool) -> tuple[float, float]:
    from streaming.progress import progress
    from streaming.replay import replay

    sink = io.StringIO()
    factory = (lambda total: progress(total, "bench replay", False, unit="records", interval=0.5, tty=False,
                                      stream=sink)) if with_progress else None
    start, cpu = time.perf_counter(), time.process_time()
    result = replay(settings, "sensor", from_beginning=True, namespace=namespace, progress=factory)
    elapsed, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    if result.records != N:
        raise RuntimeError(f"replay read {result.records} of {N} records")
    if with_progress and "done" not in sink.getvalue():
        raise RuntimeError("progress sink got no closing line")
    return elapsed, cpu_s


def run(settings: Settings) -> dict[str, Any]:
    from streaming.promote import promote

    s = fresh(settings)
    _publish(s, "sensor", N)
    inf = float("inf")
    best: dict[str, list[float]] = {k: [inf, inf] for k in ("raw", "worker", "quiet", "progress", "kafka_python")}

    def keep(key: str, wall: float, cpu: float) -> None:
        best[key] = [min(best[key][0], wall), min(best[key][1], cpu)]

    promote_s = inf
    for r in range(ROUNDS):
        keep("raw", *_raw_consume(s, "sensor", N))
        wall, cpu, _info = _worker(s, "sensor", N, r)
        keep("worker", wall, cpu)
        keep("quiet", *_replay(s, f"quiet{r}", False))
        keep("progress", *_replay(s, f"progress{r}", True))
        keep("kafka_python", *_replay(s.with_(fast_reader=False), f"kp{r}", False))
        start = time.perf_counter()
        promote(s, "sensor", f"progress{r}")
        promote_s = min(promote_s, time.perf_counter() - start)
    rate = {k: round(N / v[0]) for k, v in best.items()}
    replay_ratio = round(best["worker"][0] / best["quiet"][0], 3)
    replay_cpu_ratio = round(best["worker"][1] / best["quiet"][1], 3)
    progress_ratio = round(best["quiet"][0] / best["progress"][0], 3)
    progress_cpu_ratio = round(best["quiet"][1] / best["progress"][1], 3)
    fetch_ratio = round(best["kafka_python"][0] / best["quiet"][0], 3)
    fetch_cpu_ratio = round(best["kafka_python"][1] / best["quiet"][1], 3)
    return {
        "machine": machine(), "records": N, "batch_max_records": s.batch_max_records,
        "records_per_s": rate, "cpu_s": {k: round(v[1], 3) for k, v in best.items()},
        "promote_s": round(promote_s, 3), "load_average": [round(x, 2) for x in os.getloadavg()],
        "table": [
            {"figure": "sensor replay records/s", "value": rate["quiet"], "baseline": rate["worker"],
             "baseline_is": "stream worker, same run", "ratio": replay_ratio, "cpu_ratio": replay_cpu_ratio,
             "goal": GOAL_REPLAY, "meets_goal": replay_ratio >= GOAL_REPLAY},
            {"figure": "replay records/s with progress lines", "value": rate["progress"],
             "baseline": rate["quiet"], "baseline_is": "replay --quiet, same run", "ratio": progress_ratio,
             "cpu_ratio": progress_cpu_ratio, "goal": GOAL_PROGRESS, "meets_goal": progress_ratio >= GOAL_PROGRESS},
            {"figure": "replay records/s, librdkafka fetch (the default)", "value": rate["quiet"],
             "baseline": rate["kafka_python"], "baseline_is": "replay with STREAMLEARN_FAST_READER=false, same run",
             "ratio": fetch_ratio, "cpu_ratio": fetch_cpu_ratio, "goal": "reported"},
        ],
    }


def main() -> None:
    with bench_settings() as settings:
        result = run(settings)
    write_report("replay", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
