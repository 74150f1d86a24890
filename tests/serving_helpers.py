"""Test helper for serving: export tiny versioned models and publish them through the registry.

The model is a tf.Module (two variables, one ``serving_default`` signature ``x: float32[None, n]``
-> ``{"outputs": float32[None, k]}``), not a Keras model, because ``tf.saved_model.save`` of a bare
module takes a fraction of a second on a shared 2-core CPU and the tests publish dozens of versions.
Each version computes ``outputs[:, j] = mean(x) * scale + tag + j``: the ``tag`` makes every answer
prove which version computed it (:func:`expected_outputs`).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving.policy import Policy
from serving.versions import VersionManager
from serving.worker import ServingWorker
from streaming.config import Settings
from streaming.model_registry import ModelRegistry, write_json_atomic
from streaming.topics import requests_topic


def export_tiny(path: Path, n_features: int = 4, n_outputs: int = 2, tag: float = 0.0, scale: float = 1.0,
                nan: bool = False) -> Path:
    """Write a SavedModel with the serving signature into ``path`` (created)."""
    import tensorflow as tf

    class Tiny(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = tf.Variable(float("nan") if nan else scale, dtype=tf.float32)
            self.bias = tf.Variable(tag + np.arange(n_outputs, dtype=np.float32), dtype=tf.float32)

        @tf.function(input_signature=[tf.TensorSpec([None, n_features], tf.float32, name="x")])
        def serve(self, x: Any) -> dict[str, Any]:
            m = tf.reduce_mean(x, axis=1, keepdims=True) * self.scale
            return {"outputs": m + self.bias[tf.newaxis, :]}

    module = Tiny()
    path.mkdir(parents=True, exist_ok=True)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def expected_outputs(features: list[float], tag: float, n_outputs: int = 2, scale: float = 1.0) -> np.ndarray:
    return float(np.mean(np.asarray(features, np.float32))) * scale + tag + np.arange(n_outputs)


def publish(registry: ModelRegistry, name: str, tag: float, *, promote: bool = True, n_features: int = 4,
            n_outputs: int = 2, scale: float = 1.0, featurizer: dict[str, Any] | None = None,
            corrupt: str | None = None, metadata: dict[str, Any] | None = None) -> int:
    """Export, (optionally corrupt before publishing,) publish and (optionally) promote a version.

    ``corrupt`` (applied to the export *before* publish, so the manifest matches the damage):
    ``truncate_variables`` | ``random_pb`` | ``nan_weights``.
    """
    staging = registry.staging(name)
    export_tiny(staging, n_features, n_outputs, tag, scale, nan=corrupt == "nan_weights")
    if corrupt == "truncate_variables":
        data = next((staging / "variables").glob("variables.data-*"))
        data.write_bytes(data.read_bytes()[: max(1, data.stat().st_size // 3)])
    elif corrupt == "random_pb":
        (staging / "saved_model.pb").write_bytes(os.urandom(2048))
    meta = {"featurizer": featurizer, "class_names": [], "tag": tag, **(metadata or {})}
    version = registry.publish(name, staging, meta)
    if promote:
        if corrupt is None:
            registry.set_promoted(name, version, "test")
        else:
            force_promote(registry, name, version)
    return version


def force_promote(registry: ModelRegistry, name: str, version: int) -> None:
    """Mark a version promoted without verifying it (a buggy writer or a hand edit of state.json).

    ``set_promoted`` refuses damaged versions; serving must refuse them too, and this is how the
    tests put one in front of it.
    """
    state_path = registry.model_dir(name) / "state.json"
    state = registry.state(name)
    state["promoted"] = int(version)
    state["history"].append({"action": "PROMOTED", "version": int(version), "reason": "forced by test",
                             "at_ms": int(time.time() * 1000)})
    write_json_atomic(state_path, state)


def damage_published(registry: ModelRegistry, name: str, version: int, how: str) -> None:
    """Damage a published version in place: ``manifest_mismatch`` | ``missing_index`` | ``only_pb``."""
    vdir = registry.version_dir(name, version)
    if how == "manifest_mismatch":
        data = next((vdir / "variables").glob("variables.data-*"))
        raw = bytearray(data.read_bytes())
        raw[-1] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif how == "missing_index":
        (vdir / "variables" / "variables.index").unlink()
    elif how == "only_pb":
        shutil.rmtree(vdir / "variables")
        for extra in ("fingerprint.pb",):
            (vdir / extra).unlink(missing_ok=True)
        for sub in ("assets",):
            shutil.rmtree(vdir / sub, ignore_errors=True)
    else:
        raise ValueError(f"how: unknown damage {how!r}")


def read_predictions(items: list[Any]) -> list[dict[str, Any]]:
    """Values of decoded Prediction records from ``tests.helpers.read_topic``."""
    return [i.value for i in items if getattr(i, "ok", False)]


def dump(obj: Any) -> str:
    return json.dumps(obj, default=str)[:2000]


WEBLOG_FEATURIZER = {"kind": "weblog", "version": "weblog-v1"}


def weblog_event(i: int, label: str | None = "normal") -> dict[str, Any]:
    """A valid WebLogEvent dict (event time now, so the featurizer's time checks pass)."""
    return {"event_id": f"e{i}-{time.time_ns()}", "client_ip": f"10.0.{i % 7}.{i % 250}", "ident": None,
            "user": None, "timestamp": int(time.time() * 1000), "method": "GET", "path": f"/items/{i}?q=1",
            "protocol": "HTTP/1.1", "status": 200, "bytes_sent": 512 + i, "referrer": None,
            "user_agent": "Mozilla/5.0", "latency_ms": 12.5, "label": label, "source": "test"}


class Running:
    """A serving worker in a thread of the test process (fast retries: 0.1 s registry poll, 2 load attempts)."""

    def __init__(self, settings: Settings, model: str, policy: Policy | None = None, **kwargs: Any) -> None:
        self.manager = VersionManager(settings, model, policy, poll_interval_s=0.1, backoff_s=0.05, max_attempts=2)
        self.worker = ServingWorker(settings, model, manager=self.manager, **kwargs)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()
        # Serve the version promoted now before the test promotes others: under load a worker that
        # starts late would first see the test's later promotions, and the test would not be
        # testing the swap (or the damaged version) it means to.
        if not self.manager.wait_ready(120):
            self.stop()
            raise AssertionError(f"worker for {model} not serving within 120 s: {self.manager.stats}")

    def stop(self) -> None:
        self.worker.stop_event.set()
        self.thread.join(timeout=30)


class GroupProgress:
    """Committed offsets of a model's serving group on its requests topic (what the servers finished)."""

    def __init__(self, settings: Settings, model: str) -> None:
        from kafka import KafkaConsumer, TopicPartition

        topic = requests_topic(settings, model)
        self.consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False,
                                      group_id=settings.group(f"serving.{model}"))
        self.tps = [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic))]

    def done(self) -> int:
        return sum(self.consumer.committed(tp) or 0 for tp in self.tps)

    def total(self) -> int:
        return sum(self.consumer.end_offsets(self.tps).values())

    def close(self) -> None:
        self.consumer.close()


class RequestLoad:
    """A steady stream of prediction requests (about 50/s) from a thread, for kill tests under load.

    Ids are ``<prefix><n>``; features ``[n % modulus, 0, 1, 2]``. ``sent`` lists every id published.
    """

    def __init__(self, settings: Settings, model: str, prefix: str, modulus: int) -> None:
        self.settings, self.model, self.prefix, self.modulus = settings, model, prefix, modulus
        self.sent: list[str] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from serving.client import to_request
        from streaming.producer import Publisher

        n = 0
        with Publisher(self.settings) as pub:
            while not self.stopped.is_set():
                req = to_request(self.model, {"request_id": f"{self.prefix}{n}",
                                              "features": [float(n % self.modulus), 0.0, 1.0, 2.0]})
                pub.publish_to(requests_topic(self.settings, self.model), "PredictionRequest", req,
                               key=req["request_id"])
                self.sent.append(req["request_id"])
                n += 1
                self.stopped.wait(0.02)  # pacing of the load generator, not a wait for a condition

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)


def assert_each_answered_once(answered_ids: list[str], sent: list[str]) -> None:
    """Every sent request has an answer, and none has two."""
    counts: dict[str, int] = {}
    for rid in answered_ids:
        counts[rid] = counts.get(rid, 0) + 1
    assert set(counts) == set(sent), f"missing {len(set(sent) - set(counts))}"
    dups = {r: c for r, c in counts.items() if c > 1}
    assert not dups, f"{len(dups)} requests answered more than once, e.g. {list(dups.items())[:5]}"
