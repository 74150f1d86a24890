"""Idle footprint: CPU of idle workers on the embedded broker, and first-record latency after idle.

noida-db answers an empty fetch at once, so a consumer that re-fetches right away spins. The
workers' loops go through ``streaming.consumer.IdlePoller`` (sleep 1 ms doubling to a 64-250 ms cap between
empty polls; once idle, a ListOffsets probe instead of an empty fetch, docs/IDLE.md). This measures, on
real subprocesses and /proc CPU time:

* **per worker kind** (``stream sensor``, ``serve`` with a tiny promoted model, ``train``): CPU
  cores used over an 8 s window after start-up, all idle (no input). Baseline: a bare kafka-python
  consumer (group member, plain ``poll(200)``) on the same broker, measured in its own window first
  (next to the workers it is starved of CPU and under-reports its spin); ratio = worker / bare
  (lower is better). Goal: <= 0.02 core per worker.
* **the whole idle ``up`` stack** (every service of ``streamlearn up``, tiny promoted models), summed
  over its processes, with and without the broker. Goal: <= 0.25 core. Always reported as an
  estimate from one process per kind (the per-kind phase also runs the registry and the gateway:
  registry + gateway + 3 x (stream + trainer + serve), the 11 processes `up` starts); measured as
  the real 11-process stack only with ``--stack``, because six of them start TensorFlow, which takes
  minutes on 2 cores.
* **first-record latency after idle**: a consumer behind IdlePoller, idle between records for
  0.25-0.6 s, well over the 64 ms back-off cap (random, so the record lands anywhere in the back-off
  cycle); latency = receive time - send time (same clock). Baseline: the same with a plain
  ``poll(200)`` consumer. Goal: p50 <= 50 ms.

Every figure carries the load average: on a loaded box CPU time per poll grows (cache misses,
context switches), so compare the ratio, not the raw figure, across runs.

    python -m benchmarks.bench_idle [--stack]
    python -m benchmarks.bench_idle --latency-caps 0.064,0.128,0.25   # latency after idle per back-off cap
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import bench_settings, child_env, machine, write_report
from streaming.config import Settings

WINDOW_S = 8.0  # 800+ clock ticks per window: 0.01 core resolves to ~8 ticks
GOAL_WORKER_CORE = 0.02
GOAL_STACK_CORE = 0.25
GOAL_P50_MS = 50.0
LATENCY_SAMPLES = 24
TRAINER_READY = "TensorFlow ready"  # trainer.cycle logs it when the background import is done
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (all its threads), from /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def _env(settings: Settings) -> dict[str, str]:
    return child_env(settings, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3", STREAMLEARN_METRICS_PORT="-1")


def _spawn(settings: Settings, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, *args], env=_env(settings), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_ready(procs: dict[str, tuple[subprocess.Popen[bytes], Path, str | None]], timeout: float) -> dict[str, bool]:
    """Until each process logged its ready marker (or, without one, its CPU rate fell below 0.2 core)."""
    ready: dict[str, bool] = dict.fromkeys(procs, False)
    last = {name: cpu_seconds(p.pid) or 0.0 for name, (p, _, _) in procs.items()}
    exited: set[str] = set()
    deadline = time.monotonic() + timeout
    while not all(ready[n] or n in exited for n in ready) and time.monotonic() < deadline:
        time.sleep(1.0)  # a benchmark pacing its probes, not a test waiting for an event
        for name, (proc, log, marker) in procs.items():
            if ready[name] or name in exited:
                continue
            if proc.poll() is not None:  # recorded, not fatal: the other figures still mean something
                ready[name] = False
                exited.add(name)
                continue
            now = cpu_seconds(proc.pid) or 0.0
            if marker is not None:
                ready[name] = marker in log.read_text(errors="replace")
            else:
                ready[name] = now - last[name] < 0.2
            last[name] = now
    return ready


def _measure(pids: dict[str, int], window_s: float = WINDOW_S) -> dict[str, float]:
    """Cores used by each pid over the same wall-clock window."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    time.sleep(window_s)
    wall = time.monotonic() - t0
    out = {}
    for name, pid in pids.items():
        after = cpu_seconds(pid)
        b = before[name]
        out[name] = round((after - b) / wall, 4) if after is not None and b is not None else float("nan")
    return out


def _stop(procs: list[subprocess.Popen[bytes]]) -> list[float | None]:
    """SIGTERM each process; seconds from the signal to its exit (None: killed after 30 s, or gone before)."""
    sent = {}
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            sent[proc.pid] = time.monotonic()
    took: list[float | None] = []
    for proc in procs:
        try:
            proc.wait(timeout=30)
            took.append(round(time.monotonic() - sent[proc.pid], 2) if proc.pid in sent else None)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            took.append(None)
    return took


# ---- child modes (run as `python -m benchmarks.bench_idle --child MODE ...`) ---------------------
def _child(mode: str, topic: str, group: str) -> None:
    """A consumer on ``topic``: ``bare`` (plain poll) or ``idle`` (IdlePoller); ``lat-*`` print latencies."""
    from kafka import KafkaConsumer

    from streaming import config
    from streaming.consumer import IdlePoller, consumer_config

    settings = config.load({})
    consumer = KafkaConsumer(**consumer_config(settings, group_id=group, auto_offset_reset="latest"))
    consumer.subscribe([topic])
    # "lat-idle:0.25": the helper with another back-off cap (what a longer cap costs in latency)
    cap = float(mode.split(":", 1)[1]) if ":" in mode else None
    poller = (IdlePoller(consumer) if cap is None else IdlePoller(consumer, max_idle_s=cap)) \
        if mode.split(":")[0].endswith("idle") else None
    announced = False
    while True:
        polled = poller.poll(timeout_ms=200) if poller is not None else consumer.poll(timeout_ms=200)
        if not announced and consumer.assignment():
            print("ready", flush=True)
            announced = True
        now = time.time()
        for recs in polled.values():
            for rec in recs:
                if mode.startswith("lat"):
                    print(json.dumps({"ms": (now - float(rec.value)) * 1000}), flush=True)


# ---- phases -------------------------------------------------------------------------------------
def _group(settings: Settings, logs: Path, specs: dict[str, tuple[list[str], str | None]],
           timeout: float) -> dict[str, Any]:
    """Start processes, wait until each is ready, measure them all over one window, stop them."""
    procs: dict[str, tuple[subprocess.Popen[bytes], Path, str | None]] = {}
    for name, (args, marker) in specs.items():
        log = logs / f"{name.split()[0]}.log"
        procs[name] = (_spawn(settings, args, log), log, marker)
    stop_s: list[float | None] = []
    try:
        ready = _wait_ready(procs, timeout=timeout)
        time.sleep(2.0)  # let the first assignment's repositioning settle before the window
        cores = _measure({name: p.pid for name, (p, _, _) in procs.items()})
    finally:
        # All get SIGTERM at once; each figure is signal -> observed exit of an idle process (an upper bound:
        # exits are observed in order), which the idle back-off must not delay.
        stop_s = _stop([p for p, _, _ in procs.values()])
    return {"cores": cores, "ready": ready, "load_average": [round(x, 2) for x in os.getloadavg()],
            "sigterm_to_exit_s": dict(zip(procs, stop_s, strict=True))}


def _probes(settings: Settings, logs: Path) -> dict[str, Any]:
    """The baseline (bare kafka-python consumer, plain poll) and the helper alone, as group members."""
    from streaming.topics import raw_topic

    topic = raw_topic(settings, "weblog")
    return _group(settings, logs, {
        "bare kafka-python consumer": (["-m", "benchmarks.bench_idle", "--child", "bare", topic, "idle-bare"], "ready"),
        "IdlePoller consumer": (["-m", "benchmarks.bench_idle", "--child", "idle", topic, "idle-helper"], "ready"),
    }, timeout=60)


def _per_kind(settings: Settings, logs: Path) -> dict[str, Any]:
    """One process of each kind `up` starts, idle: a stream worker, a server of a tiny promoted model, a
    trainer, the schema registry's HTTP server and the ingest gateway."""
    from streaming.broker import free_port
    from streaming.model_registry import ModelRegistry
    from tests.serving_helpers import publish  # the tiny tf.Module the serving tests use (sub-second export)

    publish(ModelRegistry(settings.model_dir), "idle_tiny", tag=1.0)
    # Own ports: on a shared box another stack may hold the defaults.
    s = settings.with_(ingest_tokens=settings.ingest_tokens or "bench:idle-bench-token",
                       registry_port=free_port(), ingest_port=free_port())
    return _group(s, logs, {
        "stream": (["-m", "streamlearn.cli", "stream", "sensor"], "assigned"),
        "serve": (["-m", "streamlearn.cli", "serve", "idle_tiny"], "serving idle_tiny"),
        # ready once its background TensorFlow import is done (trainer.cycle): before that marker the
        # window measured the import (0.05-0.12 core), after it an idle trainer uses ~0.001 core
        "trainer": (["-m", "streamlearn.cli", "train", "sensor_forecaster"], TRAINER_READY),
        "registry": (["-m", "streamlearn.cli", "registry", "serve"], None),
        "gateway": (["-m", "streamlearn.cli", "ingest", "serve"], None),
    }, timeout=120)


def stack_estimate(cores: dict[str, float]) -> float:
    """The idle `up` stack from one process per kind: `up` runs the registry, the gateway, and a stream
    worker, a trainer and a server for each of the 3 kinds (streamlearn.stack.default_services)."""
    return round(cores["registry"] + cores["gateway"] + 3 * (cores["stream"] + cores["trainer"] + cores["serve"]), 4)


def _stack(settings: Settings, logs: Path) -> dict[str, Any]:
    """The whole `up` stack, idle (tiny promoted models, so every server is past its wait for a version)."""
    from streaming.broker import free_port
    from streaming.model_registry import ModelRegistry
    from streaming.topics import MODELS
    from streamlearn.commands.up import prepare
    from streamlearn.stack import Supervisor, default_services
    from tests.serving_helpers import publish

    # Own ports: on a shared box another stack may hold the defaults (the registry would crash-loop).
    s = settings.with_(ingest_tokens=settings.ingest_tokens or "bench:idle-bench-token",
                       registry_port=free_port(), ingest_port=free_port())
    prepare(s)
    registry = ModelRegistry(s.model_dir)
    for model in MODELS:
        publish(registry, model, tag=1.0)
    services = default_services(s, registry_http=True)
    for svc in services:
        svc.metrics_port = None
    sup = Supervisor(s, services, max_backoff=1.0)
    sup.start()
    try:
        markers = {"stream": "assigned", "serve": "serving ", "train": TRAINER_READY}
        procs = {svc.name: (svc.proc, sup.log_dir / f"{svc.name}.log", markers.get(svc.name.split("-")[0]))
                 for svc in services if svc.proc is not None}
        ready = _wait_ready(procs, timeout=240)
        time.sleep(2.0)
        pids = {svc.name: svc.proc.pid for svc in services if svc.proc is not None}  # after any restart
        broker = _broker_pid(s.bootstrap)
        if broker is not None:
            pids["broker"] = broker
        cores = _measure(pids)
    finally:
        sup.stop()
    names = [svc.name for svc in services]
    measured = [n for n in names if cores.get(n) == cores.get(n)]  # NaN: exited during the window
    return {"cores": cores, "ready": ready, "services": names, "not_measured": sorted(set(names) - set(measured)),
            "workers_total": round(sum(cores[n] for n in measured), 4),
            "with_broker_total": round(sum(cores[n] for n in measured) + cores.get("broker", 0.0), 4),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _latency(settings: Settings, logs: Path, mode: str) -> list[float]:
    from kafka import KafkaProducer

    from streaming.producer import producer_config
    from streaming.topics import TopicSpec, ensure_topics

    topic = settings.topic_prefix + "idle-latency-" + mode.replace(":", "-")
    ensure_topics(settings, [TopicSpec(topic, 1, 3_600_000, "delete", None, "bench_idle latency probe")])
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_idle", "--child", mode, topic,
                             f"idle-lat-{uuid.uuid4().hex[:6]}"], env=_env(settings), stdout=subprocess.PIPE,
                            stderr=open(logs / f"{mode}.log", "ab"), stdin=subprocess.DEVNULL, text=True)
    producer = KafkaProducer(**producer_config(settings, linger_ms=0))
    rng = random.Random(13)
    samples: list[float] = []
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"latency consumer {mode} did not start; see {logs / (mode + '.log')}")
        time.sleep(1.0)  # idle before the first record: the consumer has backed off to its cap
        for _ in range(LATENCY_SAMPLES):
            producer.send(topic, str(time.time()).encode()).get(timeout=30)
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"latency consumer {mode} exited; see {logs / (mode + '.log')}")
            samples.append(json.loads(line)["ms"])
            time.sleep(rng.uniform(0.25, 0.6))  # idle gap > the back-off cap, random: lands anywhere in a cycle
    finally:
        producer.close()
        _stop([proc])  # type: ignore[list-item]
    return samples


def _broker_pid(bootstrap: str) -> int | None:
    """The embedded broker serving ``bootstrap`` (its command line names the port), if it runs here."""
    port = bootstrap.rsplit(":", 1)[-1]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--kafka-port" in argv and argv[argv.index(b"--kafka-port") + 1:][:1] == [port.encode()]:
            return int(entry.name)
    return None


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))], 1)


def run(settings: Settings, stack: bool = False) -> dict[str, Any]:
    """Probes, one worker per kind and latency (about 2-3 min); ``stack`` adds the whole `up` stack."""
    started = time.monotonic()
    logs = settings.home / "bench-idle-logs"
    logs.mkdir(parents=True, exist_ok=True)
    cpu0 = time.process_time()
    result: dict[str, Any] = {"benchmark": "idle", "machine": machine(), "window_s": WINDOW_S, "logs": str(logs)}
    probes = result["probes"] = _probes(settings, logs)
    bare = probes["cores"]["bare kafka-python consumer"]
    table: list[dict[str, Any]] = []

    def row(figure: str, value: float, goal: float, load: list[float]) -> None:
        table.append({"figure": figure, "value": value, "baseline": bare,
                      "ratio": round(value / bare, 4) if bare else None, "goal": f"<= {goal} core",
                      "meets_goal": value <= goal, "load_average": load})

    row("idle CPU, IdlePoller consumer (cores)", probes["cores"]["IdlePoller consumer"], GOAL_WORKER_CORE,
        probes["load_average"])
    kinds = result["per_kind"] = _per_kind(settings, logs)
    for kind in ("stream", "serve", "trainer", "registry", "gateway"):
        row(f"idle CPU, {kind} worker (cores)", kinds["cores"][kind], GOAL_WORKER_CORE, kinds["load_average"])
    for kind in ("stream", "serve"):
        table.append({"figure": f"SIGTERM to exit, idle {kind} worker (s)", "value": kinds["sigterm_to_exit_s"][kind],
                      "baseline": None, "ratio": None, "goal": "reported (the back-off ends at once on a stop)"})
    lat = {m: _latency(settings, logs, m) for m in ("lat-idle", "lat-bare")}
    p50, p99, base50 = _pct(lat["lat-idle"], 0.5), _pct(lat["lat-idle"], 0.99), _pct(lat["lat-bare"], 0.5)
    result["latency_ms"] = {m: {"p50": _pct(v, 0.5), "p99": _pct(v, 0.99), "mean": round(statistics.mean(v), 1),
                                "samples": len(v)} for m, v in lat.items()}
    table.append({"figure": "first-record latency after idle p50 (ms)", "value": p50, "baseline": base50,
                  "ratio": round(p50 / base50, 2) if base50 else None, "goal": f"<= {GOAL_P50_MS} ms",
                  "meets_goal": p50 <= GOAL_P50_MS})
    table.append({"figure": "first-record latency after idle p99 (ms)", "value": p99,
                  "baseline": _pct(lat["lat-bare"], 0.99), "ratio": None, "goal": "reported"})
    row("idle CPU, whole `up` stack, estimated: registry + gateway + 3 x (stream + trainer + serve) (cores)",
        stack_estimate(kinds["cores"]), GOAL_STACK_CORE, kinds["load_average"])
    if stack:
        st = result["up_stack"] = _stack(settings, logs)
        row("idle CPU, whole `up` stack without broker (cores)", st["workers_total"], GOAL_STACK_CORE,
            st["load_average"])
        table.append({"figure": "idle CPU, whole `up` stack with broker (cores)", "value": st["with_broker_total"],
                      "baseline": bare, "ratio": None, "goal": "reported"})
    else:
        result["up_stack"] = "not run: `python -m benchmarks.bench_idle --stack` (11 processes; > 3 min on 2 cores)"
    result["table"] = table
    result["bench_process_cpu_s"] = round(time.process_time() - cpu0, 2)
    result["seconds"] = round(time.monotonic() - started, 1)
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main() -> None:
    if len(sys.argv) >= 5 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4])
        return
    if "--latency-caps" in sys.argv:  # only the latency probe, at each back-off cap given (seconds)
        caps = sys.argv[sys.argv.index("--latency-caps") + 1].split(",")
        with bench_settings() as settings:
            logs = settings.home / "bench-idle-logs"
            logs.mkdir(parents=True, exist_ok=True)
            out: dict[str, Any] = {"benchmark": "idle latency per cap", "machine": machine()}
            for cap in caps:
                lat = _latency(settings, logs, f"lat-idle:{float(cap)}")
                out[f"cap {cap} s"] = {"p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99), "samples": len(lat),
                                       "load_average": [round(x, 2) for x in os.getloadavg()]}
        print(json.dumps(out, indent=2))
        return
    with bench_settings() as settings:
        result = run(settings, stack="--stack" in sys.argv)
    write_report("idle", result)
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
