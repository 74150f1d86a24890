"""Whole-platform figures: freshness and recovery after kill -9, on real worker subprocesses.

* **freshness**: from the publish of an event until a model *trained on it* (its offset in a
  train/reservoir batch of the version's lineage) answers a prediction request. Goal: at most the
  retrain interval + 10 s; reported as ratio = freshness / (interval + 10 s), <= 1 meets the goal.
* **recovery**: kill -9 a worker, time until it has done its next unit of work after the
  supervisor restarted it (serving: a prediction produced; stream worker: a batch written;
  trainer: its process ready again). Goal <= 10 s; ratio = seconds / 10.

    python -m benchmarks.bench_platform
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from typing import Any

from benchmarks.common import bench_settings, machine, write_report
from streaming.config import Settings
from streaming.consumer import Subscriber
from streaming.jsoncodec import to_json
from streaming.model_registry import ModelRegistry
from streaming.polling import poll_until
from streaming.producer import Publisher
from streaming.store import FeatureStore
from streaming.topics import predictions_topic, requests_topic
from streamlearn.commands.up import prepare
from streamlearn.stack import Supervisor, default_services

RETRAIN_S = 10.0
FRESHNESS_GOAL_S = 15.0  # publish -> a model trained on it answers, with a retrain every 10 s
RECOVERY_GOAL_S = 5.0  # kill -9 -> processing again (the recovery issue's goal)


class Answers(threading.Thread):
    """Follows the predictions topic: (arrival time, version) per request id."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.seen: dict[str, tuple[float, int]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        with Subscriber(self.settings, predictions_topic(self.settings, "digits_cnn"), start="beginning") as sub:
            while not self.stop.is_set():
                for item in sub.poll_batch(200):
                    if item.ok:
                        self.seen.setdefault(item.value["request_id"], (time.time(), item.value["model_version"]))


def _trained_on(registry: ModelRegistry, version: int, topic: str, partition: int, offset: int) -> bool:
    meta = registry.metadata("digits_cnn", version)
    for entry in meta.get("lineage", {}).get("batches", []):
        if entry.get("role") not in ("train", "reservoir"):
            continue
        for r in entry.get("ranges", []):
            if r["topic"] == topic and int(r["partition"]) == partition and \
                    int(r["first_offset"]) <= offset <= int(r["last_offset"]):
                return True
    return False


def _wait(pred: Any, timeout: float, what: str) -> Any:
    value = poll_until(pred, timeout, interval_s=0.1)
    if value:
        return value
    raise TimeoutError(f"benchmark timed out after {timeout} s waiting for {what}")


def run(settings: Settings) -> dict[str, Any]:
    from ingest.generators import digits

    s = settings.with_(batch_max_records=100, batch_max_seconds=1.0, retrain_every_batches=10_000,
                       retrain_every_seconds=RETRAIN_S)
    prepare(s)
    images = list(digits())
    wanted = {"stream-image", "train-digits_cnn", "serve-digits_cnn"}
    services = [svc for svc in default_services(s) if svc.name in wanted]
    for svc in services:
        svc.metrics_port = None
    sup = Supervisor(s, services, max_backoff=1.0)
    registry = ModelRegistry(s.model_dir)
    store = FeatureStore(s.feature_store)
    answers = Answers(s)
    pub = Publisher(s)
    counter = [0]

    def ask() -> str:
        ev = images[counter[0] % len(images)]
        counter[0] += 1
        rid = uuid.uuid4().hex
        pub.publish_to(requests_topic(s, "digits_cnn"), "PredictionRequest",
                       {"request_id": rid, "model": "digits_cnn", "timestamp": int(time.time() * 1000),
                        "event_json": to_json(ev), "features": None, "reply_topic": None})
        pub.flush()
        return rid

    result: dict[str, Any] = {"benchmark": "platform", "machine": machine(), "retrain_interval_s": RETRAIN_S}
    try:
        for ev in images[:600]:
            pub.publish("image", ev)
        pub.flush()
        sup.start()
        answers.start()
        _wait(lambda: registry.promoted("digits_cnn"), 400, "first promoted version")
        first = ask()  # ask once, then wait for that answer (the server may still be loading v1)
        _wait(lambda: answers.seen.get(first), 120, "a first answer")
        # freshness: publish fresh events, keep asking until a version trained on them answers
        metas = [pub.publish("image", ev) for ev in images[600:1200]]
        pub.flush()
        marker = metas[-1].get(timeout=30)
        t0 = time.time()

        def fresh_answer() -> float | None:
            rid = ask()
            got = _wait(lambda: answers.seen.get(rid), 60, "answer")
            version = got[1]
            if _trained_on(registry, version, marker.topic, marker.partition, marker.offset):
                return got[0]
            return None

        t1 = _wait(fresh_answer, 300, "a model trained on the fresh events to answer")
        freshness = t1 - t0
        result["freshness_s"] = round(freshness, 2)
        result["freshness_goal_s"] = FRESHNESS_GOAL_S
        # recovery after kill -9, one worker type at a time
        recovery: dict[str, float] = {}
        for name in ("serve-digits_cnn", "stream-image", "train-digits_cnn"):
            batches_before = len(store.batch_ids("image"))
            svc = next(x for x in sup.services if x.name == name)
            old_pid = svc.proc.pid if svc.proc is not None else None
            sup.kill(name, signal.SIGKILL)
            killed = time.time()
            if name.startswith("serve"):
                rid = ask()
                done = _wait(lambda rid=rid: answers.seen.get(rid), 120, "answer after restart")[0]
            elif name.startswith("stream"):
                for ev in images[1200:1300]:
                    pub.publish("image", ev)
                pub.flush()
                _wait(lambda b=batches_before: len(store.batch_ids("image")) > b, 120, "batch after restart")
                done = time.time()
            else:
                # Restarted means a new process: the supervisor replaced the killed pid with a live one.
                _wait(lambda svc=svc, old=old_pid: svc.proc is not None and svc.proc.pid != old
                      and svc.proc.poll() is None, 60, "trainer restarted")
                log = sup.log_dir / f"{name}.log"
                _wait(lambda log=log: log.read_text(errors="replace").count("retraining every") >= 2, 120,
                      "trainer ready after restart")
                done = time.time()
            recovery[name] = round(done - killed, 2)
        result["recovery_s"] = recovery
    finally:
        answers.stop.set()
        sup.stop()
        pub.close()
    result["table"] = [
        {"figure": "freshness s (publish -> model trained on it answers)", "value": result["freshness_s"],
         "baseline": f"goal {FRESHNESS_GOAL_S:.0f} s (retrain every {RETRAIN_S:.0f} s)",
         "ratio": round(result["freshness_s"] / FRESHNESS_GOAL_S, 3), "goal": "<= 1.0"},
    ] + [{"figure": f"recovery s after kill -9 of {k}", "value": v, "baseline": f"goal {RECOVERY_GOAL_S:.0f} s",
          "ratio": round(v / RECOVERY_GOAL_S, 3), "goal": "<= 1.0"} for k, v in result["recovery_s"].items()]
    write_report("platform", result)
    return result


if __name__ == "__main__":
    with bench_settings() as st:
        print(json.dumps(run(st), indent=2))
