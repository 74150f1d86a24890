"""Single-process vs N-worker training of one candidate (`train --once` vs `train --once --distributed`).

Both train the same model on the same temp feature store (generated sensor readings, featurized by
the real featurizer into real batch files), each from a fresh registry, each as command-line
processes (TensorFlow import included, as an operator would see it). The workers run on this
machine on localhost ports (gRPC collectives on the CPU); across hosts see docs/DISTRIBUTED.md.

Figures: wall seconds of the whole command (slowest worker for the distributed run), the fit, gate and export
seconds the chief recorded in the version's metadata (``training.seconds``), the holdout score of
each candidate, and ``speedup`` = single wall / distributed wall (> 1: distributed is faster) with
``score_ratio`` = distributed / single primary metric. Writes ``reports/bench/distributed.json``.

    python -m benchmarks.bench_distributed [--readings 2400] [--batch-size 200] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine, write_report

ROOT = Path(__file__).resolve().parents[1]


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env(store: Path, models: Path, home: Path, tf_config: str | None) -> dict[str, str]:
    # The children's own settings only: this run's store and registry, nothing inherited from the shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMLEARN_", "TF_CONFIG"))}
    env.update(PYTHONPATH=str(ROOT), STREAMLEARN_HOME=str(home), STREAMLEARN_FEATURE_STORE=str(store),
               STREAMLEARN_MODEL_DIR=str(models), STREAMLEARN_DISTRIBUTED_TIMEOUT_S="600")
    if tf_config:
        env["TF_CONFIG"] = tf_config
    return env


def _run(cmds: list[tuple[list[str], dict[str, str]]]) -> tuple[float, list[dict[str, Any]]]:
    started = time.monotonic()
    procs = [subprocess.Popen(c, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c, e in cmds]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"{p.args!r} failed ({p.returncode}):\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return time.monotonic() - started, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readings", type=int, default=2400)
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default="sensor_forecaster")
    args = ap.parse_args()
    from ingest.sensors import generate
    from streaming.model_registry import ModelRegistry
    from streaming.store import FeatureStore
    from trainer.synthetic import write_batches

    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        root = Path(tmp)
        store = root / "features"
        batches = write_batches(FeatureStore(store), "sensor", generate(args.readings, n_sensors=6, seed=5),
                                batch_size=args.batch_size, topic="sensor.raw")
        train = [sys.executable, "-m", "streamlearn.cli", "train", args.model, "--once", "--no-events"]
        single_wall, (single,) = _run([(train, _env(store, root / "single", root / "h-single", None))])
        workers = [f"127.0.0.1:{p}" for p in _ports(args.workers)]
        cmds = []
        for i in range(args.workers):
            tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
            cmds.append(([*train, "--distributed"], _env(store, root / f"dist{i}", root / f"h{i}", tf_config)))
        dist_wall, dist = _run(cmds)
        s_meta = ModelRegistry(root / "single").metadata(args.model, single["version"])
        d_meta = ModelRegistry(root / "dist0").metadata(args.model, dist[0]["version"])
    report = {
        "machine": machine(), "model": args.model, "readings": args.readings, "batches": len(batches),
        "workers": args.workers, "metric": s_meta["primary_metric"], "direction": s_meta["direction"],
        "single": {"wall_s": round(single_wall, 2), "fit_s": s_meta["training"]["seconds"],
                   "score": s_meta["scores"]["candidate"], "train_rows": s_meta["scores"]["train_rows"]},
        "distributed": {"wall_s": round(dist_wall, 2), "fit_s": d_meta["training"]["seconds"],
                        "score": d_meta["scores"]["candidate"], "train_rows": d_meta["scores"]["train_rows"],
                        "per_worker_s": [d["seconds"] for d in dist]},
    }
    report["speedup"] = round(single_wall / dist_wall, 3)
    report["fit_speedup"] = round(report["single"]["fit_s"] / max(1e-9, report["distributed"]["fit_s"]), 3)
    report["score_ratio"] = round(report["distributed"]["score"] / report["single"]["score"], 4)
    write_report("distributed", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
