"""Restart after ``kill -9``, the README way: seconds from the restart to the first progress, per worker kind.

Every long-running worker is started as a subprocess with the command the README shows, made to
process something, killed with SIGKILL, given new input, and started again with *exactly the same
command* (no extra flag). Measured: seconds from the second ``Popen`` to the first sign of new
progress, defined per kind in ``PROGRESS`` (also written to the JSON as ``progress_means``): a new
batch offset in the feature store, a request sent during the downtime answered (committed), a
training cycle of the restarted process on the batches written during the downtime (and, reported
apart as ``restart_to_version_s``, that cycle's version), a new record on the raw topic, a 2xx from
the gateway, a new line printed by a group subscriber. Afterwards each scenario checks that nothing
was lost or duplicated where the worker promises it (the stream worker: every offset in exactly one
batch; serving: every request answered once; the tailer and the gateway: every line / event once on
the topic; the subscriber: every record printed at least once).

Goal (issue 10): processing again within 5 s of the restart; ``ratio`` = seconds / 5 (<= 1 meets it).
The baseline of the time is the goal itself: before static membership the stream worker's restart on
the embedded broker never made progress (the dead member is never expired), which no ratio expresses.
Workers that load TensorFlow (serve, train) include its import in their time: that is what a user
waits for, and the run measures TensorFlow's import alone in a fresh interpreter, the way serving
imports it, without Keras (``tensorflow_import_serving_s``): the floor of the serving worker's restart on
this machine. (The trainer imports TensorFlow in the background and makes progress before it is done, so a
plain ``import tensorflow`` is the floor of no row and is no longer timed.) Two baselines from the same run give the
figures context on a busy machine: each worker's cold first start to progress (``vs_first_start`` ~ 1
means the restart waits for nothing a first start does not), and ``cli_start_floor_s``, the best time
of a bare ``streamlearn --help`` (interpreter and imports); the load average is recorded too. The project's
bytecode is compiled once before any worker starts (``compile_bytecode``), as an installed package has it.

The scenario functions are also the restart tests (tests/test_restart.py): they raise when progress
does not come before a generous deadline and return the counts the tests assert on.

    python -m benchmarks.bench_restart [--only stream,gateway]   # JSON to stdout, reports/bench/restart.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.common import bench_settings, child_env, fresh, machine, write_report
from streaming.config import Settings
from streaming.topics import raw_topic

GOAL_S = 5.0
DEADLINE_S = 240.0  # "progress happens before a generous deadline": far above the goal, for a loaded 2-core box
ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


# -- plumbing ----------------------------------------------------------------------------------------
def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    return child_env(settings, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT), **extra)


class Worker:
    """A CLI subprocess logging to a file; ``restart`` starts the very same command again."""

    def __init__(self, settings: Settings, args: list[str], log: Path, *, stderr_apart: bool = False,
                 **env: str) -> None:
        self.args, self.log, self.env = args, log, env_for(settings, **env)
        self.stderr_apart = stderr_apart  # stdout is data (JSON lines): keep log lines out of it
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as fh, self.log.with_suffix(".err").open("ab") as err:
            started = time.monotonic()
            self.proc = subprocess.Popen([sys.executable, "-m", "streamlearn.cli", *self.args], env=self.env,
                                         stdout=fh, stderr=err if self.stderr_apart else subprocess.STDOUT,
                                         cwd=ROOT)
        return started

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode

    def tail(self, n: int = 4000) -> str:
        path = self.log.with_suffix(".err") if self.stderr_apart else self.log
        try:
            return path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def wait_for(predicate: Callable[[], T], what: str, worker: Worker, timeout: float = DEADLINE_S,
             interval: float = 0.05) -> T:
    """Bounded polling; fails with the worker's log tail when it times out or the worker died."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if worker.proc is not None and worker.proc.poll() is not None:
            raise RuntimeError(f"{what}: the worker exited with {worker.proc.returncode}:\n{worker.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n{worker.tail()}")
        time.sleep(interval)  # poll interval inside a deadline loop


def _end_total(settings: Settings, topic: str) -> int:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        return int(sum(consumer.end_offsets(tps).values()))
    finally:
        consumer.close()


def _read_all(settings: Settings, topic: str) -> list[Any]:
    from streaming.consumer import Subscriber

    with Subscriber(settings, topic, start="beginning", until="end") as sub:
        return [item for item in sub if item.ok]


def _publish(settings: Settings, kind: str, n: int, seed: int) -> None:
    from streaming.producer import Publisher
    from streamlearn.commands.publish import generated

    with Publisher(settings) as pub:
        for event in generated(kind, n, seed=seed):
            pub.publish(kind, event)


def _result(kind: str, restart_s: float, expected: int, counts: Counter[Any], *, first_start_to_progress_s: float,
            **extra: Any) -> dict[str, Any]:
    """``ratio``: restart time against the 5 s goal; ``vs_first_start``: against a cold first start of the same
    worker in the same run (what the restart costs beyond starting the process at all)."""
    return {"kind": kind, "restart_to_progress_s": round(restart_s, 3), "ratio": round(restart_s / GOAL_S, 3),
            "first_start_to_progress_s": round(first_start_to_progress_s, 3),
            "vs_first_start": round(restart_s / max(first_start_to_progress_s, 1e-3), 3),
            "expected": expected, "distinct": len(counts), "duplicates": sum(c - 1 for c in counts.values() if c > 1),
            **extra}


# -- scenarios ---------------------------------------------------------------------------------------
def stream(settings: Settings, work: Path, n: int = 300) -> dict[str, Any]:
    """`streamlearn stream sensor`: kill -9 after its first batches, publish more, restart."""
    from streaming.store import FeatureStore, read_batch

    s = settings.with_(batch_max_seconds=0.3)
    store = FeatureStore(s.feature_store)

    def offsets() -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for b in store.batches("sensor"):
            arrays = read_batch(b.path)
            out += list(zip(arrays["partition"].tolist(), arrays["offset"].tolist(), strict=True))
            out += [(b.manifest["ranges"][0]["partition"], o) for o in b.manifest["ranges"][0]["dead_letter_offsets"]]
        return out

    _publish(s, "sensor", n, seed=1)
    w = Worker(s, ["stream", "sensor"], work / "stream.log")
    try:
        t_first = w.start()
        wait_for(lambda: len(offsets()) > 0, "first progress", w, interval=0.02)
        first_s = time.monotonic() - t_first
        wait_for(lambda: len(offsets()) >= n, "first batches", w)
        w.kill9()
        _publish(s, "sensor", n, seed=2)
        before = len(offsets())
        t0 = w.start()
        wait_for(lambda: len(offsets()) > before, "progress after the restart", w, interval=0.02)
        restart_s = time.monotonic() - t0
        wait_for(lambda: len(set(offsets())) >= 2 * n, "every offset persisted", w)
    finally:
        w.stop()
    return _result("stream", restart_s, 2 * n, Counter(offsets()), first_start_to_progress_s=first_s)


def serve(settings: Settings, work: Path, n: int = 100) -> dict[str, Any]:
    """`streamlearn serve MODEL`: kill -9 while answering, more requests, restart."""
    from kafka import KafkaConsumer, TopicPartition

    from serving.client import ensure_model_topics, to_request
    from streaming.model_registry import ModelRegistry
    from streaming.producer import Publisher
    from streaming.topics import predictions_topic, requests_topic
    from tests.serving_helpers import publish as publish_model

    model = "restartme"
    publish_model(ModelRegistry(settings.model_dir), model, tag=1.0)
    ensure_model_topics(settings, model)
    topic = requests_topic(settings, model)

    def send(start: int) -> None:
        with Publisher(settings) as pub:
            for i in range(start, start + n):
                req = to_request(model, {"request_id": f"r{i}", "features": [float(i % 7), 0.0, 1.0, 2.0]})
                pub.publish_to(topic, "PredictionRequest", req, key=req["request_id"])

    reader = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False,
                           group_id=settings.group(f"serving.{model}"))
    tps = [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or [])]

    def done() -> int:
        return sum(reader.committed(tp) or 0 for tp in tps)

    w = Worker(settings, ["serve", model], work / "serve.log")
    try:
        send(0)
        t_first = w.start()
        wait_for(lambda: done() > 0, "first progress", w, interval=0.02)
        first_s = time.monotonic() - t_first
        wait_for(lambda: done() >= n, "first answers", w, interval=0.1)
        w.kill9()
        send(n)
        t0 = w.start()
        wait_for(lambda: done() > n, "progress after the restart", w, interval=0.02)
        restart_s = time.monotonic() - t0
        wait_for(lambda: done() >= 2 * n, "every request answered", w, interval=0.1)
    finally:
        w.stop()
        reader.close()
    answers = Counter(item.key.decode() for item in _read_all(settings, predictions_topic(settings, model)))
    return _result("serve", restart_s, 2 * n, answers, first_start_to_progress_s=first_s)


def train(settings: Settings, work: Path, rows: int = 300, model: str = "sensor_forecaster",
          specs: dict[str, str] | None = None) -> dict[str, Any]:
    """`streamlearn train sensor_forecaster` (periodic): kill -9 after a version, new batches, restart.

    Progress after the restart: the restarted process (its pid) starts a training cycle whose plan
    trains or holds out on a batch written while it was down (the cycle marker of trainer.cycle); the
    scenario then waits for that cycle's version, and ``restart_to_version_s`` reports it. ``specs``
    (``{name: "module:attr"}``) adds model specs through a config file, so a test can train a small one.
    """
    # rows: two batches of this size per part, so the gate's holdout (max(min_holdout_rows, 20 %)) and a
    # training batch fit (sensor_forecaster holds out 200 rows at least).
    from streaming.model_registry import ModelRegistry
    from streaming.store import FeatureStore
    from streamlearn.commands.publish import generated
    from trainer.cycle import read_marker
    from trainer.synthetic import write_batches

    store = FeatureStore(settings.feature_store)
    events = list(generated("sensor", 4 * rows, seed=3))
    registry = ModelRegistry(settings.model_dir)

    def add(part: int, created: int) -> None:
        write_batches(store, "sensor", events[part * 2 * rows:(part + 1) * 2 * rows], batch_size=rows,
                      topic=raw_topic(settings, "sensor"), first_offset=part * 2 * rows, created_at_ms=created)

    extra = {"STREAMLEARN_RETRAIN_EVERY_BATCHES": "1"}
    if specs:
        config = work / "config.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text("[models]\n" + "".join(f'{k} = "{v}"\n' for k, v in specs.items()))
        extra["STREAMLEARN_CONFIG"] = str(config)
    w = Worker(settings, ["train", model], work / "train.log", stderr_apart=False, **extra)

    def cycle_on(new: set[str]) -> bool:
        marker = read_marker(settings, model) or {}
        planned = set(marker.get("train_batches") or []) | set(marker.get("holdout_batches") or [])
        return w.proc is not None and marker.get("pid") == w.proc.pid and bool(planned & new)

    try:
        add(0, 1_700_000_000_000)
        t_first = w.start()
        wait_for(lambda: cycle_on({b.batch_id for b in store.batches("sensor")}), "the first cycle", w,
                 interval=0.02)
        first_s = time.monotonic() - t_first
        wait_for(lambda: len(registry.versions(model)) >= 1, "the first version", w, interval=0.05)
        first_version_s = time.monotonic() - t_first
        w.kill9()
        old = {b.batch_id for b in store.batches("sensor")}
        add(1, 1_700_000_100_000)
        new = {b.batch_id for b in store.batches("sensor")} - old
        t0 = w.start()
        wait_for(lambda: cycle_on(new), "a cycle on the new batches after the restart", w, interval=0.02)
        restart_s = time.monotonic() - t0
        wait_for(lambda: len(registry.versions(model)) >= 2, "a version after the restart", w, interval=0.05)
        restart_version_s = time.monotonic() - t0
    finally:
        w.stop()
    versions = registry.versions(model)
    for v in versions:
        registry.verify(model, v)  # a kill -9 never leaves a half-written version behind
    return _result("train", restart_s, 2, Counter(versions), first_start_to_progress_s=first_s,
                   restart_to_version_s=round(restart_version_s, 3),
                   first_start_to_version_s=round(first_version_s, 3))


def _weblog_lines(start: int, n: int) -> list[str]:
    from ingest.generators import web_traffic
    from ingest.weblog import format_combined

    out = []
    for i, rec in enumerate(web_traffic(n, seed=start)):
        rec["path"] = f"/seq/{start + i}"
        out.append(format_combined(rec) + "\n")
    return out


def ingest_follow(settings: Settings, work: Path, n: int = 300) -> dict[str, Any]:
    """`streamlearn ingest weblog access.log --follow`: kill -9, lines appended, restart."""
    log_file = work / "access.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text("".join(_weblog_lines(0, n)))
    topic = raw_topic(settings, "weblog")
    w = Worker(settings, ["ingest", "weblog", str(log_file), "--follow"], work / "ingest.log")
    try:
        t_first = w.start()
        wait_for(lambda: _end_total(settings, topic) > 0, "first progress", w, interval=0.02)
        first_s = time.monotonic() - t_first
        wait_for(lambda: _end_total(settings, topic) >= n, "the first lines", w, interval=0.1)
        w.kill9()
        with log_file.open("a") as fh:
            fh.writelines(_weblog_lines(n, n))
        before = _end_total(settings, topic)
        t0 = w.start()
        wait_for(lambda: _end_total(settings, topic) > before, "progress after the restart", w, interval=0.02)
        restart_s = time.monotonic() - t0
        wait_for(lambda: _end_total(settings, topic) >= 2 * n, "every line", w, interval=0.1)
    finally:
        w.stop()
    return _result("ingest_follow", restart_s, 2 * n, Counter(it.value["path"] for it in _read_all(settings, topic)),
                   first_start_to_progress_s=first_s)


def gateway(settings: Settings, work: Path, n: int = 50) -> dict[str, Any]:
    """`streamlearn ingest serve` (the HTTP gateway): kill -9 between requests, restart, post again."""
    import httpx

    from streaming.broker import free_port

    token = "tok-restart_0123456789"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {token}"}
    now = int(time.time() * 1000)
    w = Worker(settings, ["ingest", "serve", "--port", str(port)], work / "gateway.log",
               STREAMLEARN_INGEST_TOKENS=f"bench:{token}")

    def post(i: int) -> bool:
        event = {"event_id": f"g-{i}", "client_ip": "10.0.0.1", "timestamp": now + i, "method": "GET",
                 "path": f"/g/{i}", "protocol": "HTTP/1.1", "status": 200, "bytes_sent": 100, "user_agent": "bench",
                 "latency_ms": 1.0}
        try:
            return httpx.post(f"{url}/ingest/weblog", json=event, headers=auth, timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        t_first = w.start()
        wait_for(lambda: post(0), "the first event", w, interval=0.02)
        first_s = time.monotonic() - t_first
        for i in range(1, n):
            wait_for(functools.partial(post, i), f"event {i} accepted", w, interval=0.1)
        w.kill9()
        t0 = w.start()
        wait_for(lambda: post(n), "the first event after the restart", w, interval=0.02)
        restart_s = time.monotonic() - t0
        for i in range(n + 1, 2 * n):
            wait_for(functools.partial(post, i), f"event {i} accepted", w, interval=0.1)
    finally:
        w.stop()
    counts = Counter(it.value["event_id"] for it in _read_all(settings, raw_topic(settings, "weblog")))
    return _result("gateway", restart_s, 2 * n, counts, first_start_to_progress_s=first_s)


def subscribe(settings: Settings, work: Path, n: int = 200) -> dict[str, Any]:
    """`streamlearn subscribe sensor.raw --group dash --json` (a dashboard-style group follower)."""
    out = work / "subscribe.out"
    w = Worker(settings, ["subscribe", "sensor.raw", "--group", "dash", "--json"], out, stderr_apart=True)

    def printed() -> list[tuple[int, int]]:
        rows = []
        for line in out.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by the kill (its record is printed again after the restart)
                continue
            if isinstance(rec, dict) and "offset" in rec:
                rows.append((rec["partition"], rec["offset"]))
        return rows

    try:
        _publish(settings, "sensor", n, seed=4)
        t_first = w.start()
        wait_for(lambda: len(printed()) > 0, "first progress", w, interval=0.02)
        first_s = time.monotonic() - t_first
        wait_for(lambda: len(set(printed())) >= n, "first records printed", w, interval=0.1)
        w.kill9()
        _publish(settings, "sensor", n, seed=5)
        before = len(set(printed()))
        t0 = w.start()
        wait_for(lambda: len(set(printed())) > before, "progress after the restart", w, interval=0.02)
        restart_s = time.monotonic() - t0
        wait_for(lambda: len(set(printed())) >= 2 * n, "every record printed", w, interval=0.1)
    finally:
        w.stop()
    counts = Counter(printed())
    # at least once by design (commit after print): a re-print after kill -9 is allowed, a gap is not
    return _result("subscribe", restart_s, 2 * n, counts, delivery="at-least-once", first_start_to_progress_s=first_s)


PROGRESS = {  # what "processing again" means per kind: the first effect of new work, observed from outside
    "stream": "a batch holding an offset published while the worker was down is in the feature store",
    "serve": "a request sent while the worker was down is answered: its group offset is committed, which "
             "(exactly once) happens in the same transaction as its prediction",
    "train": "the restarted process starts a training cycle that trains or holds out on a batch written while it "
             "was down (cycle marker, trainer.cycle); restart_to_version_s is the time to that cycle's version",
    "ingest_follow": "a line appended while the tailer was down is on the raw topic",
    "gateway": "a POST /ingest/weblog is answered 2xx (the gateway answers 2xx only once Kafka acked the event)",
    "subscribe": "a record published while the subscriber was down is printed",
}

SCENARIOS: dict[str, Callable[[Settings, Path], dict[str, Any]]] = {
    "stream": stream, "ingest_follow": ingest_follow, "gateway": gateway, "subscribe": subscribe,
    "serve": serve, "train": train}


def cli_start_floor(settings: Settings, tries: int = 3) -> float:
    """Best of ``tries`` runs of ``streamlearn --help``: the interpreter and import cost every restart pays
    before it can do anything (context for the figures on a loaded machine)."""
    best = float("inf")
    for _ in range(tries):
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "streamlearn.cli", "--help"], env=env_for(settings), cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=120)
        best = min(best, time.monotonic() - started)
    return round(best, 3)


TF_IMPORTS = {  # what the serving worker pays before it can compute anything (it imports without Keras)
    "tensorflow_import_serving_s": "from serving.tfimport import import_tensorflow; import_tensorflow()",
}


def tf_import_floor(settings: Settings, tries: int = 1) -> dict[str, float]:
    """Best of ``tries`` fresh interpreters importing TensorFlow, as the trainer and the serving worker do:
    the part of their restart no restart design can remove on this machine."""
    out = {}
    for name, code in TF_IMPORTS.items():
        best = float("inf")
        for _ in range(tries):
            started = time.monotonic()
            subprocess.run([sys.executable, "-c", code], env=env_for(settings), cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=True, timeout=300)
            best = min(best, time.monotonic() - started)
        out[name] = round(best, 3)
    return out


PACKAGES = ("schemas", "streaming", "ingest", "trainer", "serving", "streamlearn")  # what the workers import


def compile_bytecode() -> float:
    """Compile the project's modules to ``__pycache__`` once, as ``pip install`` does; returns seconds.

    Why: the workers are started from the source tree, and with ``PYTHONDONTWRITEBYTECODE=1`` in the
    environment (a CI or sandbox default) every start compiled ~40 project modules from source again, about
    0.6 s of CPU in the serving worker's restart (py-spy, docs/SERVING_LATENCY.md) that an installed
    package never pays. Existing bytecode is read whatever that variable says; compileall writes it anyway.
    """
    import compileall

    started = time.monotonic()
    for package in PACKAGES:
        if (ROOT / package).is_dir():
            compileall.compile_dir(str(ROOT / package), quiet=1)
    return round(time.monotonic() - started, 3)


def run(settings: Settings, only: list[str] | None = None) -> dict[str, Any]:
    import tempfile

    compile_s = compile_bytecode()
    floor_before = cli_start_floor(settings)
    names = only or list(SCENARIOS)
    tf_floor = tf_import_floor(settings) if "serve" in names else {}
    results: dict[str, Any] = {}
    table = []
    for name in names:
        work = Path(tempfile.mkdtemp(prefix=f"restart-{name}-"))
        res = SCENARIOS[name](fresh(settings), work)
        results[name] = res
        table.append({"figure": f"restart_to_progress_s.{name}", "value": res["restart_to_progress_s"],
                      "baseline": f"goal {GOAL_S:g} s", "ratio": res["ratio"], "goal": "<= 1.0"})
    floor = min(floor_before, cli_start_floor(settings))
    return {"benchmark": "restart", "machine": machine(), "load_average": os.getloadavg(), "goal_s": GOAL_S,
            "progress_means": PROGRESS, "bytecode_compile_s": compile_s, "cli_start_floor_s": floor, **tf_floor,
            "kinds": results, "table": table}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_restart")
    parser.add_argument("--only", help=f"comma-separated scenarios of {sorted(SCENARIOS)}")
    args = parser.parse_args()
    only = [x.strip() for x in args.only.split(",")] if args.only else None
    with bench_settings() as settings:
        result = run(settings, only)
    print(json.dumps(result, indent=2))
    print(f"written: {write_report('restart', result)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
