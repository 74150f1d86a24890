"""Scaling out stream workers: 1, 2 and 4 processes in one consumer group on the same backlog.

What `streamlearn up --workers stream.sensor=N` does, measured: one sensor backlog (``RECORDS``
readings of ``SENSORS`` sensors, keyed by sensor id, on a topic of ``PARTITIONS`` partitions) is
consumed from the beginning by N ``streamlearn stream sensor --group G`` processes (a fresh group
and feature store per N), until the store holds every offset. Reported per N:

* ``records_per_s``: records / seconds from the first persisted batch to the last (group joins and
  interpreter start-up left out; ``wall_records_per_s`` keeps them);
* ``ratio_vs_1``: that rate over the 1-worker rate of the same run (the baseline);
* per-partition records (the key hash decides them) and per-worker records (the partitions each
  worker owned at the end), with ``worker_balance`` = max / mean worker records (1.0 = even);
* CPU seconds of each worker process (``os.wait4`` rusage) and the load average, because on a shared
  2-core box wall time mostly measures waiting for a core.

``saturates_at`` is the first N whose next step (2N) adds less than ``SATURATION_GAIN`` to the rate:
beyond it the machine, not the group, is the limit.

    python -m benchmarks.bench_scaling      # JSON to stdout and reports/bench/scaling.json (< 3 min)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import bench_settings, child_env, fresh, machine, write_report
from streaming.config import Settings
from streaming.members import local_entries
from streaming.polling import poll_until
from streaming.producer import Publisher
from streaming.store import FeatureStore
from streaming.topics import raw_topic

WORKERS = (1, 2, 4)
PARTITIONS = 4
RECORDS = 12_000
SENSORS = 200  # enough keys that murmur2 spreads them over every partition
SATURATION_GAIN = 1.2
DEADLINE_S = 150.0


def _publish(settings: Settings) -> None:
    from ingest.sensors import generate

    with Publisher(settings) as pub:
        for event in generate(RECORDS, n_sensors=SENSORS, seed=16):
            pub.publish("sensor", event)
        pub.flush()


def _per_partition(store: FeatureStore, topic: str) -> dict[int, int]:
    return {p: sum(last - first + 1 for first, last in store.ranges("sensor", topic, p)) for p in range(PARTITIONS)}


def _run(settings: Settings, n_workers: int) -> dict[str, Any]:
    features = settings.home / f"features-{n_workers}"
    name = f"bench-scaling-{n_workers}"
    group = settings.group(name)  # what the CLI makes of --group NAME
    store, topic = FeatureStore(features), raw_topic(settings, "sensor")
    # A short batch timer: each partition's last partial batch must not wait out the default 5 s.
    env = child_env(settings, STREAMLEARN_FEATURE_STORE=str(features), STREAMLEARN_METRICS_PORT="-1",
                    STREAMLEARN_BATCH_MAX_SECONDS="0.25", PYTHONUNBUFFERED="1")
    log_dir = settings.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    procs = []
    for i in range(n_workers):
        with open(log_dir / f"w{n_workers}-{i}.log", "wb") as log:
            cmd = [sys.executable, "-m", "streamlearn.cli", "stream", "sensor", "--group", name]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    first: list[float] = []

    def done() -> bool:
        n = sum(_per_partition(store, topic).values())
        if n and not first:
            first.append(time.perf_counter())
        return n >= RECORDS

    finished = poll_until(done, DEADLINE_S, interval_s=0.05)
    end = time.perf_counter()
    owners = {e["pid"]: sorted(e.get("partitions") or []) for e in local_entries(settings, group) if e.get("alive")}
    cpu: list[float] = []
    for proc in procs:  # SIGTERM: each leaves the group cleanly (noida-db never expires a killed member)
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pid, _status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                cpu.append(round(usage.ru_utime + usage.ru_stime, 2))
                proc.returncode = 0
                break
            time.sleep(0.1)
        else:
            proc.kill()
            proc.wait()
    parts = _per_partition(store, topic)
    if not finished:
        raise RuntimeError(f"{n_workers} workers persisted {sum(parts.values())} of {RECORDS} records in "
                           f"{DEADLINE_S} s; logs in {log_dir}")
    per_worker = [sum(parts[p] for p in ps) for ps in owners.values()]
    steady = end - (first[0] if first else start)
    return {
        "workers": n_workers, "records": RECORDS, "seconds": round(steady, 2), "wall_seconds": round(end - start, 2),
        "records_per_s": round(RECORDS / steady), "wall_records_per_s": round(RECORDS / (end - start)),
        "per_partition_records": parts, "partitions_per_worker": list(owners.values()),
        "per_worker_records": per_worker,
        "worker_balance": round(max(per_worker) / (sum(per_worker) / len(per_worker)), 3) if per_worker else None,
        "worker_cpu_s": cpu, "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def run(settings: Settings) -> dict[str, Any]:
    s = fresh(settings, partitions=PARTITIONS)
    t0 = time.perf_counter()
    _publish(s)
    publish_s = time.perf_counter() - t0
    runs = [_run(s, n) for n in WORKERS]
    base = runs[0]["records_per_s"]
    for r in runs:
        r["ratio_vs_1"] = round(r["records_per_s"] / base, 3)
    # CPU cost model from the three runs: cpu(N) = N * start_cpu + RECORDS / records_per_cpu_s (least squares);
    # the per-core capacity of one worker, free of the box's load (wall rates are not: other tenants).
    xs, ys = [r["workers"] for r in runs], [sum(r["worker_cpu_s"]) for r in runs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    work_cpu = my - slope * mx
    saturates_at = next((a["workers"] for a, b in zip(runs, runs[1:], strict=False)
                         if b["records_per_s"] < a["records_per_s"] * SATURATION_GAIN), runs[-1]["workers"])
    return {
        "what": "N `streamlearn stream sensor` processes in one group on one backlog (docs/SCALING.md)",
        "machine": machine(), "partitions": PARTITIONS, "records": RECORDS, "sensors": SENSORS,
        "publish_records_per_s": round(RECORDS / publish_s), "runs": runs,
        "saturates_at": saturates_at, "saturation_rule": f"next doubling adds < {SATURATION_GAIN}x",
        "cpu_model": {"start_cpu_s_per_worker": round(slope, 2), "work_cpu_s": round(work_cpu, 2),
                      "records_per_cpu_s": round(RECORDS / work_cpu) if work_cpu > 0 else None,
                      "note": "least-squares fit of total worker CPU seconds over N; a worker on a core of its own "
                              "would reach about records_per_cpu_s"},
        "table": [{"figure": f"{r['workers']} stream workers records/s", "value": r["records_per_s"],
                   "baseline": base, "ratio": r["ratio_vs_1"]} for r in runs],
    }


def main() -> None:
    with bench_settings() as settings:
        result = run(settings)
    path: Path = write_report("scaling", result)
    print(json.dumps(result, indent=2))
    print(f"report: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
