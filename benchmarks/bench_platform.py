"""Whole-platform figures: freshness after a concept shift and recovery after kill -9, on real workers.

Runs the web-log stack (``stream weblog``, ``train weblog_classifier``, ``serve weblog_classifier``)
under the supervisor, with a steady stream of generated requests (``RATE`` events/s) and a retrain
every ``RETRAIN_S`` seconds.

* **freshness**: the stream changes regime: a WAF starts rejecting every crawler and script (all
  ``bot`` requests get 403, and bots become 30 % of the traffic instead of 8 %). The live model
  learned that crawlers are answered fine, so it gets them wrong; a version trained on the new
  events beats it on the (new-regime) holdout and the honest gate (trainer/gate.py) promotes it.
  Why a shift: on a stationary stream the gate rightly rejects candidates that are no better than
  the live model, so "a model trained on the newest event answers" may never happen there.
  Definition (written to the JSON as ``freshness_definition``): from ``t_publish`` of the *first
  event of the new regime* (wall clock taken just before its publish) to the arrival, at a
  ``read_committed`` reader of the predictions topic (i.e. after the serving worker's
  ``commit_transaction``, as bench_serving's latency), of the first answer produced by a version
  whose lineage holds *new-regime events* (an offset at or after the regime's first offset in its
  partition) in a ``train`` or ``reservoir`` batch (holdout batches are only evaluated on). Requests
  are sent every ``ASK_EVERY_S``. Goal <= 15 s (retrain every 10 s). ``freshness_first_event_s`` is
  the stricter figure: the lineage must hold that very first event. It can stay null: the trainer may
  hold the first event's batch out in one version and, when more new rows than the spec's
  ``max_new_rows`` arrived since the promoted version, leave it to reservoir sampling in the next
  (docs/FRESHNESS.md).
  The JSON splits the figure into stages (first event's batch written -> version created -> promoted
  -> first answer) and lists every version decided after the shift with its gate reason. If no such
  answer comes within ``FRESH_BOUND_S`` of the shift, the benchmark raises with those decisions and
  the trainer log's last lines (it never waits without bound).
* **recovery**: kill -9 a worker, time until it has done its next unit of work after the
  supervisor restarted it (serving: a new request answered; stream worker: a new batch written;
  trainer: a new process that logged its start line once more than before the kill). Goal <= 5 s.
  The server runs as ``streamlearn up`` runs it, with a warm standby (docs/STANDBY.md): the *active*
  one of the pair is killed once the standby is warm; ``standby`` in the JSON is the idle standby's
  CPU and memory, ``serve standby restored`` the time until the restarted process is warm again.
  ``--no-standby`` measures the cold restart instead (the baseline).

    python -m benchmarks.bench_platform                  # freshness + recovery (~2-3 min)
    python -m benchmarks.bench_platform --no-standby     # the same, serving without its warm standby
    python -m benchmarks.bench_platform --freshness-only # quick mode: freshness phase only
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import bench_settings, machine, write_report
from streaming.config import Settings
from streaming.consumer import Record, Subscriber
from streaming.jsoncodec import to_json
from streaming.model_registry import ModelRegistry
from streaming.polling import poll_until
from streaming.producer import Publisher
from streaming.store import FeatureStore
from streaming.topics import predictions_topic, requests_topic
from streamlearn.commands.up import prepare
from streamlearn.scaling import base_name
from streamlearn.stack import Supervisor, default_services

MODEL, KIND = "weblog_classifier", "weblog"
RETRAIN_S = 10.0
FRESHNESS_GOAL_S = 15.0  # publish -> a model trained on it answers, with a retrain every 10 s
RECOVERY_GOAL_S = 5.0  # kill -9 -> processing again (the recovery issue's goal)
RATE = 100.0  # events/s of the steady stream (about one 100-record batch a second)
ASK_EVERY_S = 0.25
STARTUP_BOUND_S = 180.0  # first promoted version answering (TensorFlow import + first fit on a loaded box)
SETTLE_S = 15.0  # old-regime traffic after the first answer, before the shift: the startup transient settles
FRESH_BOUND_S = 90.0  # shift -> fresh answer; the freshness phase fails loudly past it
EXACT_EXTRA_S = 20.0  # after the fresh answer, how long to keep watching for one trained on the very first event
FIRST_SENDS = 60  # new-regime events whose offsets mark where the new regime starts in each partition
# Attack bursts (mostly 4xx) make "failed" learnable from the request from the first minute on, so
# the first version passes the gate's baseline. Before the shift crawlers are 8 % of the traffic and
# always answered 200, so the live model is sure they succeed (when they were rare and sometimes
# failed, its opinion of them was arbitrary: 0.02-0.9 mean P(failed) between consecutive versions).
ATTACK_RATE = 0.15
OLD_BOT_RATE = 0.08
SHIFTED_BOT_RATE = 0.30
FRESHNESS_DEFINITION = (
    "t_publish (wall clock just before publish) of the first event of the new regime -> arrival at a "
    "read_committed reader of the predictions topic (after the serving worker's commit_transaction) of the "
    "first answer by a version whose lineage holds new-regime events (an offset at or after the regime's first "
    "offset in that partition) in a train or reservoir batch. freshness_first_event_s: the same, but the "
    "lineage must hold the very first event (null when no version trained on it in time: see "
    "freshness_first_event_note)")


class FreshnessTimeout(RuntimeError):
    """No version trained on the new regime answered within the freshness phase's bound."""


def regime_events(shifted: bool, start_ms: int, seed: int, chunk: int = 20_000) -> Iterator[dict[str, Any]]:
    """An endless generated web-log stream: the old regime, or the shifted one (crawlers get 403).

    Old: bots are ``OLD_BOT_RATE`` of the traffic and every bot request is answered 200; attack bursts
    ``ATTACK_RATE``. Shifted: bots are ``SHIFTED_BOT_RATE`` of the traffic and every bot request is
    answered 403, so ``is_failed`` (status >= 400) becomes true for all of them. The request side
    (paths, agents, rates) is unchanged. Generated in chunks of ``chunk`` events, each with its own
    seed and an hour later than the previous one.
    """
    from ingest.generators import web_traffic

    bot_rate = SHIFTED_BOT_RATE if shifted else OLD_BOT_RATE
    for n in itertools.count():
        for ev in web_traffic(chunk, seed=seed + 1000 * n, start_ms=start_ms + n * 3_600_000, bot_rate=bot_rate,
                              attack_rate=ATTACK_RATE):
            if ev["label"] == "bot":
                ev = {**ev, "status": 403, "bytes_sent": 150} if shifted else {**ev, "status": 200}
            yield ev


def trained_on(meta: dict[str, Any], topic: str, partition: int, offset: int) -> bool:
    """Whether a version's metadata lists (topic, partition, offset) in a train or reservoir batch."""
    return first_event_role(meta, topic, partition, offset) in ("train", "reservoir")


def first_event_role(meta: dict[str, Any], topic: str, partition: int, offset: int) -> str | None:
    """The role (train, reservoir, holdout) of the batch holding the event in a version's lineage, or None."""
    for entry in meta.get("lineage", {}).get("batches", []):
        for r in entry.get("ranges", []):
            if r["topic"] == topic and int(r["partition"]) == partition and \
                    int(r["first_offset"]) <= offset <= int(r["last_offset"]):
                return str(entry.get("role"))
    return None


def trained_on_any(meta: dict[str, Any], topic: str, first_offsets: dict[int, int]) -> bool:
    """Whether a version trained (train or reservoir batch) on any event at or after ``first_offsets[p]``
    of a partition ``p`` of ``topic``, i.e. on the new regime."""
    for entry in meta.get("lineage", {}).get("batches", []):
        if entry.get("role") not in ("train", "reservoir"):
            continue
        for r in entry.get("ranges", []):
            p = int(r["partition"])
            if r["topic"] == topic and p in first_offsets and int(r["last_offset"]) >= first_offsets[p]:
                return True
    return False


def batch_time_ms(store: FeatureStore, topic: str, partition: int, offset: int) -> int | None:
    """``created_at_ms`` of the stored batch holding (topic, partition, offset), None if none does yet."""
    for b in store.batches(KIND):
        for r in b.manifest.get("ranges", []):
            if r["topic"] == topic and int(r["partition"]) == partition and \
                    int(r["first_offset"]) <= offset <= int(r["last_offset"]):
                return int(b.manifest.get("created_at_ms", 0))
    return None


class Answers(threading.Thread):
    """Follows the predictions topic read_committed: (arrival time, version, outputs) per request id."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.seen: dict[str, tuple[float, int, list[float]]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        # idle_backoff: a spinning reader would take a core from the workers it measures (docs/IDLE.md);
        # it adds at most its 64 ms cap to an arrival stamp.
        with Subscriber(self.settings, predictions_topic(self.settings, MODEL), start="beginning",
                        isolation_level="read_committed", idle_backoff=True) as sub:
            while not self.stop.is_set():
                for item in sub.poll_batch(200):
                    if isinstance(item, Record):
                        v = item.value
                        self.seen.setdefault(v["request_id"], (time.time(), int(v["model_version"]),
                                                               list(v.get("outputs") or [])))


class Feeder(threading.Thread):
    """Publishes the web-log stream at ``RATE`` events/s; :meth:`shift` switches it to the new regime."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.pub = Publisher(settings)
        now_ms = int(time.time() * 1000)
        # Event times lie in the past (the generator spaces events ~50 ms apart, faster than RATE).
        self.old = regime_events(False, now_ms - 6 * 3_600_000, seed=0)
        self.new = regime_events(True, now_ms - 3 * 3_600_000, seed=1)
        self.shifted = threading.Event()
        self.stop = threading.Event()
        self.first_new: tuple[float, Any] | None = None  # (t_publish, send future) of the first new event
        self.new_sends: list[Any] = []  # send futures of the first FIRST_SENDS new events (offsets per partition)
        self.sent = 0
        self.error: BaseException | None = None

    def shift(self) -> None:
        self.shifted.set()

    def run(self) -> None:
        tick, start = 0.05, time.monotonic()
        try:
            while not self.stop.is_set():
                due = int((time.monotonic() - start) * RATE) - self.sent
                for _ in range(max(0, due)):
                    if not self.shifted.is_set():
                        self.pub.publish(KIND, next(self.old))
                    else:
                        t = time.time()
                        sent = self.pub.publish(KIND, next(self.new))
                        if len(self.new_sends) < FIRST_SENDS:
                            self.new_sends.append(sent)
                        if self.first_new is None:
                            self.first_new = (t, sent)
                    self.sent += 1
                self.pub.flush()
                self.stop.wait(tick)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
        finally:
            self.pub.close()


def _wait(pred: Any, timeout: float, what: str) -> Any:
    value = poll_until(pred, timeout, interval_s=0.1)
    if value:
        return value
    raise TimeoutError(f"benchmark timed out after {timeout} s waiting for {what}")


def _log_tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as exc:
        return f"(no log: {exc})"


def _decisions_since(registry: ModelRegistry, since_ms: int) -> list[dict[str, Any]]:
    """Gate decisions since ``since_ms``, with seconds after it and the trigger of the version's cycle."""
    out = []
    for e in registry.history(MODEL):
        if int(e.get("at_ms", 0)) < since_ms:
            continue
        d = {k: e.get(k) for k in ("action", "version", "reason", "at_ms")}
        d["s_after"] = round((int(e.get("at_ms", 0)) - since_ms) / 1000, 2)
        try:  # timer, drift or drift-follow-up (trainer.schedule)
            d["trigger"] = registry.metadata(MODEL, int(e["version"])).get("trigger")
        except Exception:  # a version deleted by retention since
            d["trigger"] = None
        out.append(d)
    return out


def run(settings: Settings, *, recovery: bool = True, standby: bool = True) -> dict[str, Any]:
    s = settings.with_(batch_max_records=100, batch_max_seconds=1.0, retrain_every_batches=10_000,
                       retrain_every_seconds=RETRAIN_S)
    prepare(s)
    wanted = {f"stream-{KIND}", f"train-{MODEL}", f"serve-{MODEL}", f"serve-{MODEL}-standby"}
    # standby: as `streamlearn up` runs it, a warm standby beside the server (docs/STANDBY.md)
    services = [svc for svc in default_services(s, standby=standby) if svc.name in wanted]
    for svc in services:
        svc.metrics_port = None
    sup = Supervisor(s, services, max_backoff=1.0)
    registry = ModelRegistry(s.model_dir)
    store = FeatureStore(s.feature_store)
    answers = Answers(s)
    feeder = Feeder(s)
    pub = Publisher(s)
    probes = [ev for ev in itertools.islice(regime_events(True, int(time.time() * 1000) - 600_000, seed=7), 5000)
              if ev["label"] == "bot"]
    counter = itertools.count()

    def ask() -> str:
        ev = probes[next(counter) % len(probes)]
        rid = uuid.uuid4().hex
        pub.publish_to(requests_topic(s, MODEL), "PredictionRequest",
                       {"request_id": rid, "model": MODEL, "timestamp": int(time.time() * 1000),
                        "event_json": to_json(ev), "features": None, "reply_topic": None})
        pub.flush()
        return rid

    result: dict[str, Any] = {"benchmark": "platform", "machine": machine(), "model": MODEL,
                              "retrain_interval_s": RETRAIN_S, "rate_events_per_s": RATE, "serve_standby": standby,
                              "freshness_definition": FRESHNESS_DEFINITION}
    train_log = sup.log_dir / f"train-{MODEL}.log"
    try:
        sup.start()
        answers.start()
        feeder.start()
        started = time.monotonic()
        first_version = poll_until(lambda: registry.promoted(MODEL), STARTUP_BOUND_S, interval_s=0.2)
        if not first_version:
            raise TimeoutError(f"no version of {MODEL} promoted within {STARTUP_BOUND_S:.0f} s of the start; "
                               f"decisions: {_decisions_since(registry, 0) or 'none'}; trainer log {train_log} "
                               f"ends with:\n{_log_tail(train_log)}")
        first = ask()  # ask once, then wait for that answer (the server may still be loading v1)
        left = max(20.0, STARTUP_BOUND_S - (time.monotonic() - started))
        before = _wait(lambda: answers.seen.get(first), left, "a first answer")
        result["startup_s"] = round(time.monotonic() - started, 1)
        time.sleep(SETTLE_S)  # the old regime keeps flowing, so the trainer cycles on its timer
        promoted_before = registry.promoted(MODEL)
        feeder.shift()
        _wait(lambda: feeder.first_new, 10, "the first new-regime event to be published")
        assert feeder.first_new is not None
        t0, fut = feeder.first_new
        marker = fut.get(timeout=30)
        result["shift"] = {
            "first_event": {"topic": marker.topic, "partition": marker.partition, "offset": marker.offset},
            "acked_after_s": round(time.time() - t0, 3),
            "promoted_version_at_shift": promoted_before,
            "promoted_version_age_s": round(t0 - registry.metadata(MODEL, promoted_before)["created_at"] / 1000, 1)
            if promoted_before is not None else None,
            "first_answer_version": before[1], "first_promoted_version": first_version,
        }
        _wait(lambda: len(feeder.new_sends) >= FIRST_SENDS, 30, f"the first {FIRST_SENDS} new-regime events")
        firsts: dict[int, int] = {}
        for sent in list(feeder.new_sends):
            md = sent.get(timeout=30)
            firsts[md.partition] = min(md.offset, firsts.get(md.partition, md.offset))
        result["shift"]["first_new_offsets"] = {str(k): v for k, v in sorted(firsts.items())}
        any_new: dict[int, bool] = {}
        exact: dict[int, bool] = {}

        def is_new(version: int) -> bool:
            if version not in any_new:
                meta = registry.metadata(MODEL, version)
                any_new[version] = trained_on_any(meta, marker.topic, firsts)
                exact[version] = trained_on(meta, marker.topic, marker.partition, marker.offset)
            return any_new[version]

        got = got_exact = None
        deadline = t0 + FRESH_BOUND_S
        while got_exact is None and time.time() < deadline:
            if feeder.error is not None:
                raise RuntimeError(f"the event feeder failed: {feeder.error!r}") from feeder.error
            ask()
            for t_arr, version, outputs in sorted(dict(answers.seen).values()):
                if t_arr >= t0 and is_new(version):
                    got = got or (t_arr, version, outputs)
                    if exact[version]:
                        got_exact = (t_arr, version, outputs)
                        break
            if got is not None:
                deadline = min(deadline, got[0] + EXACT_EXTRA_S)
            time.sleep(ASK_EVERY_S)
        decisions = _decisions_since(registry, int(t0 * 1000))
        if got is None:
            raise FreshnessTimeout(
                f"freshness: no answer from a version trained on the new regime (first events "
                f"{marker.topic} offsets {firsts}) within {FRESH_BOUND_S:.0f} s of the first one's publish; "
                f"promoted now: v{registry.promoted(MODEL)}; decisions since the shift: {decisions or 'none'}; "
                f"first event's batch written at (ms): "
                f"{batch_time_ms(store, marker.topic, marker.partition, marker.offset)}; "
                f"trainer log {train_log} ends with:\n{_log_tail(train_log)}")
        t1, version = got[0], got[1]
        events = {(e["action"], e["version"]): e["at_ms"] / 1000 for e in decisions}
        batch_ms = batch_time_ms(store, marker.topic, marker.partition, marker.offset)

        def rel(t: float | None) -> float | None:
            return round(t - t0, 2) if t is not None else None

        result["freshness_s"] = round(t1 - t0, 2)
        result["freshness_goal_s"] = FRESHNESS_GOAL_S
        result["freshness_stages_s_after_publish"] = {
            "first_event_batch_written": rel(batch_ms / 1000 if batch_ms else None),
            "version_created": rel(events.get(("CREATED", version))),
            "version_promoted": rel(events.get(("PROMOTED", version))), "first_answer_visible": rel(t1)}
        result["fresh_version"] = version
        result["freshness_first_event_s"] = rel(got_exact[0]) if got_exact else None
        result["freshness_first_event_version"] = got_exact[1] if got_exact else None
        if got_exact is None:
            result["freshness_first_event_note"] = (
                f"no version answering within {EXACT_EXTRA_S:.0f} s of the fresh answer trained on the very first "
                "event; roles of its batch per version: " + json.dumps(
                    {f"v{v}": first_event_role(registry.metadata(MODEL, v), marker.topic, marker.partition,
                                                marker.offset) for v in sorted(any_new)}))
        result["decisions_since_shift"] = decisions
        if recovery:
            if standby:
                result["standby"] = _standby_idle(s, sup)
            result["load_before_recovery"] = _loadavg()
            result["recovery_s"] = _recovery(sup, store, feeder, answers, ask, train_log, s if standby else None)
            result["load_after_recovery"] = _loadavg()
    finally:
        feeder.stop.set()
        answers.stop.set()
        sup.stop()
        pub.close()
        feeder.join(timeout=10)
    result["table"] = [
        {"figure": "freshness s (first new-regime event published -> answer by a version trained on it, "
                   "after commit)", "value": result["freshness_s"],
         "baseline": f"goal {FRESHNESS_GOAL_S:.0f} s (retrain every {RETRAIN_S:.0f} s)",
         "ratio": round(result["freshness_s"] / FRESHNESS_GOAL_S, 3), "goal": "<= 1.0"},
    ] + [{"figure": f"recovery s after kill -9 of {k}", "value": v, "baseline": f"goal {RECOVERY_GOAL_S:.0f} s",
          "ratio": round(v / RECOVERY_GOAL_S, 3), "goal": "<= 1.0"} for k, v in result.get("recovery_s", {}).items()
        if k != "serve standby restored"]  # no goal: how long the pair ran without a standby
    write_report("platform", result)
    return result


def _loadavg() -> list[float]:
    with open("/proc/loadavg", encoding="ascii") as fh:
        return [float(x) for x in fh.read().split()[:3]]


def _serving_roles(settings: Settings) -> dict[str, int]:
    """``{"active": pid, "standby": pid}`` of the server pair (member files; a standby counts once warm)."""
    from streaming.members import local_entries

    out: dict[str, int] = {}
    for e in local_entries(settings, settings.group(f"serving.{MODEL}")):
        if e.get("alive") and (e.get("state") == "active" or e.get("ready")):
            out[str(e["state"])] = int(e["pid"])
    return out


def _cpu_s(pid: int) -> float:
    import os

    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return round(kb / 1024, 1)


def _standby_idle(settings: Settings, sup: Supervisor, window_s: float = 10.0) -> dict[str, Any]:
    """CPU (cores) and memory of the waiting standby over ``window_s``, the active server's beside it."""
    roles = _wait(lambda: (r := _serving_roles(settings)) and len(r) == 2 and r, 180, "a warm standby")
    before = {k: _cpu_s(pid) for k, pid in roles.items()}
    time.sleep(window_s)  # a measurement window, not a wait for a condition
    return {"window_s": window_s, "pids": roles,
            "cpu_cores": {k: round((_cpu_s(pid) - before[k]) / window_s, 4) for k, pid in roles.items()},
            "rss_mb": {k: _rss_mb(pid) for k, pid in roles.items()},
            "services": {k: next(x.name for x in sup.services if x.proc is not None and x.proc.pid == pid)
                         for k, pid in roles.items()}}


def _recovery(sup: Supervisor, store: FeatureStore, feeder: Feeder, answers: Answers, ask: Any,
              train_log: Path, standby: Settings | None = None) -> dict[str, float]:
    """kill -9 one worker at a time; seconds until it did its next unit of work (the stream keeps flowing).

    With a standby (``standby`` is the settings then) the *active* server of the pair is killed, once
    the other one is warm: the figure is what a user of ``streamlearn up`` sees."""
    recovery: dict[str, float] = {}
    for name in (f"serve-{MODEL}", f"stream-{KIND}", f"train-{MODEL}"):
        if name.startswith("serve") and standby is not None:
            roles = _wait(lambda: (r := _serving_roles(standby)) and len(r) == 2 and r, 180, "a warm standby")
            name = next(x.name for x in sup.services if x.proc is not None and x.proc.pid == roles["active"])
        svc = next(x for x in sup.services if x.name == name)
        old_pid = svc.proc.pid if svc.proc is not None else None
        starts_before = train_log.read_text(errors="replace").count("retraining every")
        batches_before = len(store.batch_ids(KIND))
        sup.kill(name, signal.SIGKILL)
        killed = time.time()
        if name.startswith("serve"):
            rid = ask()
            done = _wait(lambda rid=rid: answers.seen.get(rid), 120, "answer after restart")[0]
        elif name.startswith("stream"):
            _wait(lambda b=batches_before: len(store.batch_ids(KIND)) > b, 120, "batch after restart")
            done = time.time()
        else:
            # A new process that logged its start line once more than the log held before the kill
            # (the log is appended to across restarts, so a bare count could be true already).
            _wait(lambda svc=svc, old=old_pid: svc.proc is not None and svc.proc.pid != old
                  and svc.proc.poll() is None, 60, "trainer restarted")
            _wait(lambda n=starts_before: train_log.read_text(errors="replace").count("retraining every") > n,
                  120, "trainer ready after restart")
            done = time.time()
        recovery[base_name(name)] = round(done - killed, 2)
        if name.startswith("serve") and standby is not None:
            # the restarted process is the new standby: wait until it is warm, so its TensorFlow import
            # does not land on the next kill's figure (and say how long the pair was without a standby)
            _wait(lambda: len(_serving_roles(standby)) == 2, 180, "the restarted server to be a warm standby")
            recovery["serve standby restored"] = round(time.time() - killed, 2)
    return recovery


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--freshness-only", action="store_true",
                        help="quick mode: measure freshness only, skip the kill -9 recovery phase")
    parser.add_argument("--no-standby", action="store_true",
                        help="run the server without its warm standby (the cold restart after kill -9)")
    args = parser.parse_args()
    with bench_settings() as st:
        print(json.dumps(run(st, recovery=not args.freshness_only, standby=not args.no_standby), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
