"""Stress: N stream workers of one group started near-simultaneously; count groups that never settle.

Why: `tests/test_scaling.py::test_up_workers_runs_two_processes_in_one_group` once saw two static
members of one group sit in PreparingRebalance, alive and unassigned, for 90 s (docs/GROUP_JOIN.md).
One run rarely shows it; this script repeats the start-up on one embedded broker (a fresh topic
prefix, home and group per run) with small random start offsets and optional CPU load, and reports
how many runs did not settle (every worker alive, the partitions split between them) within
``--stall-s``. A stalled run keeps its workers' logs, with kafka-python's ``kafka.coordinator`` at
DEBUG, under the printed directory.

    python -m benchmarks.stress_group_join --runs 20 --workers 2 --load 2     # processes; JSON to stdout
    python -m benchmarks.stress_group_join --inprocess --runs 25 --stall-s 40 [--no-rejoin]

``--inprocess`` runs real ``StreamWorker`` loops in threads and starts each a random ``--gap-s`` after
the previous one's JoinGroup went out: process start-up varies by seconds, so processes rarely hit the
~0.3 s gap that makes noida-db drop a JoinGroup; this mode hits it in a good share of runs, and
``--no-rejoin`` (workers without their Rejoiner) gives the figure before the fix.

``--worker LOG ARGS...`` is the child form: ``streamlearn ARGS`` with the coordinator's DEBUG log in LOG.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import bench_settings, child_env, fresh, machine, write_report
from streaming.config import Settings
from streaming.members import describe_group, local_entries
from streaming.polling import poll_until


def _worker(log_path: str, args: list[str]) -> int:
    """Child: the CLI with kafka-python's coordinator (and consumer group) log at DEBUG in ``log_path``."""
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(threadName)s %(name)s %(levelname)s "
                                           "%(message)s", "%H:%M:%S"))
    for name in ("kafka.coordinator", "kafka.consumer.group", "streaming.members", "streaming.group_join"):
        lg = logging.getLogger(name)
        lg.setLevel(logging.DEBUG)
        lg.addHandler(handler)
    from streamlearn.cli import main

    return main(args)


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def _split(settings: Settings, group: str, n: int) -> bool:
    alive = [e for e in local_entries(settings, group) if e.get("alive") and e.get("partitions")]
    if len(alive) != n:
        return False
    sets = [set(e["partitions"]) for e in alive]
    union = set().union(*sets)
    return sum(len(s) for s in sets) == len(union) == settings.partitions


def _one(base: Settings, i: int, n: int, jitter_s: float, stall_s: float, out: Path) -> dict[str, Any]:
    settings = fresh(base, partitions=max(n, base.partitions), batch_max_seconds=1.0)
    group = settings.group("stream.sensor")
    env = child_env(settings, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    run_dir = out / f"run{i:03d}"
    run_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    offsets = sorted(random.uniform(0, jitter_s) for _ in range(n))
    t0 = time.monotonic()
    for k, at in enumerate(offsets):
        delay = t0 + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the random start offset under test
        with open(run_dir / f"w{k}.out", "wb") as log:
            cmd = [sys.executable, "-m", "benchmarks.stress_group_join", "--worker", str(run_dir / f"w{k}.kafka.log"),
                   "stream", "sensor"]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    settled = poll_until(lambda: _split(settings, group, n), stall_s, interval_s=0.2)
    took = time.monotonic() - t0
    state, members = "?", []  # type: tuple[str, list[Any]]
    try:
        state, members = describe_group(settings, group)
    except Exception as exc:  # the report must still come
        state = f"describe failed: {exc}"
    entries = local_entries(settings, group)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    result = {"run": i, "settled": bool(settled), "seconds": round(took, 1),
              "offsets_s": [round(x, 2) for x in offsets],
              "state": state, "members": [m.describe() for m in members],
              "warnings": [e.get("warning") for e in entries if e.get("warning")],
              "exit_codes": [p.returncode for p in procs]}
    if settled:
        for f in run_dir.iterdir():
            f.unlink()
        run_dir.rmdir()
    else:
        result["logs"] = str(run_dir)
    return result


class JoinSent(logging.Handler):
    """Monotonic time each client (kafka-python IO thread ``kafka-io-<client_id>``) first sent a JoinGroup."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.at: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Sending JoinGroup"):
            self.at.setdefault(record.threadName or "", time.monotonic())


def _one_inprocess(base: Settings, i: int, n: int, gap_s: tuple[float, float], stall_s: float, out: Path,
                   rejoin: bool) -> dict[str, Any]:
    """N StreamWorkers in threads of this process; each starts a random gap after the previous one's
    JoinGroup went out (the broker's 300 ms initial delay makes ~0.30-0.33 s the dangerous gap)."""
    import threading

    from streaming.worker import StreamWorker

    settings = fresh(base, partitions=max(n, base.partitions), batch_max_seconds=1.0)
    group = settings.group("stream.sensor")
    log_path = out / f"run{i:03d}.kafka.log"
    file_handler = logging.FileHandler(log_path)
    file_handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(threadName)s %(name)s %(message)s",
                                                "%H:%M:%S"))
    sent = JoinSent()
    coordinator = logging.getLogger("kafka.coordinator")
    coordinator.setLevel(logging.DEBUG)
    for h in (sent, file_handler):
        coordinator.addHandler(h)
    logging.getLogger("streaming.rejoin").addHandler(file_handler)
    workers: list[Any] = []
    stops = [threading.Event() for _ in range(n)]
    threads: list[threading.Thread] = []
    gaps: list[float] = []
    t0 = time.monotonic()
    try:
        for k in range(n):
            w = StreamWorker(settings, "sensor", client_id=f"stress{k}-{group}", session_timeout_ms=6000)
            if not rejoin:
                w.rejoin.max_kicks = 0  # the "before" measurement: the worker without its Rejoiner
            workers.append(w)
        t0 = time.monotonic()
        for k, w in enumerate(workers):
            if k:
                key = f"kafka-io-stress{k - 1}-{group}"

                def joined(key: str = key) -> float | None:
                    return sent.at.get(key)

                first = poll_until(joined, 30, interval_s=0.001) or time.monotonic()
                gaps.append(random.uniform(*gap_s))
                while time.monotonic() < first + gaps[-1]:
                    pass  # a busy wait under 0.5 s: the offset is what is under test
            t = threading.Thread(target=w.run, args=(stops[k],), name=f"worker{k}", daemon=True)
            t.start()
            threads.append(t)
        settled = poll_until(lambda: _split(settings, group, n), stall_s, interval_s=0.2)
        took = time.monotonic() - t0
        try:
            state, members = describe_group(settings, group)
        except Exception as exc:
            state, members = f"describe failed: {exc}", []
        kicks = [w.rejoin.total_kicks for w in workers]
    finally:
        for ev in stops:
            ev.set()
        for t in threads:
            t.join(60)
        for w in workers[len(threads):]:
            w.close()  # built but never run
        for h in (sent, file_handler):
            coordinator.removeHandler(h)
        logging.getLogger("streaming.rejoin").removeHandler(file_handler)
        file_handler.close()
    result: dict[str, Any] = {"run": i, "settled": bool(settled), "seconds": round(took, 1),
                              "gaps_s": [round(g, 3) for g in gaps], "state": state,
                              "members": len(members), "self_removals": kicks}
    if settled and not any(kicks):
        log_path.unlink()
    else:
        result["logs"] = str(log_path)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker(argv[1], argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--jitter-s", type=float, default=0.5, help="start offsets are uniform in [0, this]")
    ap.add_argument("--stall-s", type=float, default=45.0, help="a run not settled by then is a stall")
    ap.add_argument("--load", type=int, default=0, help="busy-loop processes running meanwhile")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--inprocess", action="store_true",
                    help="workers as threads of this process, each started a --gap-s after the previous JoinGroup")
    ap.add_argument("--gap-s", default="0.29:0.34", help="LOW:HIGH of the random gap (--inprocess)")
    ap.add_argument("--no-rejoin", action="store_true", help="disable the workers' Rejoiner (--inprocess; 'before')")
    args = ap.parse_args(argv)
    low, _, high = args.gap_s.partition(":")
    gap = (float(low), float(high or low))
    random.seed(args.seed)
    out = Path(tempfile.mkdtemp(prefix="stress-join-"))
    loaders = [subprocess.Popen([sys.executable, "-c", f"from benchmarks.stress_group_join import _busy; _busy({1e6})"])
               for _ in range(args.load)]
    results = []
    try:
        with bench_settings() as base:
            for i in range(args.runs):
                if args.inprocess:
                    r = _one_inprocess(base, i, args.workers, gap, args.stall_s, out, not args.no_rejoin)
                else:
                    r = _one(base, i, args.workers, args.jitter_s, args.stall_s, out)
                results.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    finally:
        for p in loaders:
            p.kill()
            p.wait()
    stalls = [r for r in results if not r["settled"]]
    report = {"what": "N `streamlearn stream sensor` workers of one group started together (docs/GROUP_JOIN.md)",
              "runs": len(results), "workers": args.workers, "load": args.load, "jitter_s": args.jitter_s,
              "mode": "in-process" if args.inprocess else "processes", "rejoin": not args.no_rejoin,
              "gap_s": args.gap_s if args.inprocess else None,
              "self_removals": sum(sum(r.get("self_removals", [])) for r in results),
              "stall_s": args.stall_s, "stalls": len(stalls),
              "settle_seconds": sorted(r["seconds"] for r in results if r["settled"]),
              "stalled": stalls, "machine": machine(), "logs": str(out)}
    print(json.dumps(report, indent=2))
    write_report("stress_group_join" + ("_inprocess" if args.inprocess else "")
                 + ("_norejoin" if args.no_rejoin else ""), report)
    return 1 if stalls else 0


if __name__ == "__main__":
    sys.exit(main())
