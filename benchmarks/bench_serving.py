"""Serving worker throughput and latency against baselines measured in the same run.

* throughput: topic-to-topic predictions/s of the serving worker (decode, batch, one signature call
  per batch, encode, Kafka transaction per batch) against
  - a no-model consume->produce pipe over the same kind of topics (same transactions, same batch
    size, same Avro decode of the request and encode of an answer, no featurization, no model).
    Goal >= 0.7x. A bytes-forwarding pipe (no Avro either) is reported too, as the Kafka ceiling.
  - a naive loop calling Keras ``model.predict`` once per message (measured on a small sample and
    extrapolated to a rate). Goal >= 1000x.
* latency: p50/p99 (request timestamp -> prediction produced, from the answers' ``latency_ms``)
  with requests offered at half the measured maximum rate; then the same load while new versions
  are promoted every ``SWAP_EVERY_S``: p99 during swaps / steady p99. Goal <= 1.5x.

The model is a small Keras MLP (64 -> 32 -> 2) wrapped in the serving signature.

    python -m benchmarks.bench_serving
"""

from __future__ import annotations

import functools
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import bench_settings, machine, write_report
from streaming.config import Settings
from streaming.polling import poll_until

MODEL = "bench_mlp"
N_FEATURES = 64
N_REQUESTS = 20_000
NAIVE_SAMPLE = 40
LATENCY_SECONDS = 8.0
SWAP_EVERY_S = 2.0  # a new version every 2 s: far more often than the trainer retrains (30 s)



def _answered_all(worker: Any) -> bool:  # a serving.worker.ServingWorker (imported late: TensorFlow)
    return worker.answered >= N_REQUESTS

def _keras_model(seed: int) -> Any:
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input(shape=(N_FEATURES,), name="x")
    hidden = keras.layers.Dense(32, activation="relu")(inp)
    out = keras.layers.Dense(2, activation="softmax")(hidden)
    return keras.Model(inp, out)


def _export(model: Any, path: Path) -> None:
    import tensorflow as tf

    class Serving(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, N_FEATURES], tf.float32, name="x")])
        def serve(self, x: Any) -> dict[str, Any]:
            return {"outputs": self.model(x, training=False)}

    module = Serving()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def _publish_versions(settings: Settings, n: int) -> tuple[list[int], Any]:
    from streaming.model_registry import ModelRegistry

    reg = ModelRegistry(settings.model_dir)
    versions, first = [], None
    for i in range(n):
        model = _keras_model(i)
        first = first or model
        staging = reg.staging(MODEL)
        _export(model, staging)
        versions.append(reg.publish(MODEL, staging, {"featurizer": None, "class_names": ["a", "b"]}))
    reg.set_promoted(MODEL, versions[0], "bench")
    return versions, first


def _requests(n: int, seed: int, stamp: bool = True) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, N_FEATURES)).astype(np.float32).round(4)
    now = time.time_ns() // 1_000_000
    return [{"request_id": f"b{seed}-{i}", "model": MODEL, "timestamp": now if stamp else 0, "event_json": None,
             "features": feats[i].tolist(), "reply_topic": None} for i in range(n)]


def _produce(settings: Settings, topic: str, reqs: list[dict[str, Any]]) -> None:
    from streaming.producer import Publisher

    with Publisher(settings) as pub:
        for r in reqs:
            pub.publish_to(topic, "PredictionRequest", r, key=r["request_id"])


def _pipe(settings: Settings, src: str, dst: str, n: int, serde: bool, name: str) -> float:
    """No-model baseline: transactional consume -> produce of the same records, same batch size.

    ``serde=True`` decodes each PredictionRequest and encodes a Prediction without outputs (the
    worker's Kafka and Avro work minus featurization and the model); ``serde=False`` forwards the
    bytes untouched (the Kafka ceiling).
    """
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    from schemas.catalog import load_schema
    from schemas.registry import open_registry
    from schemas.serde import AvroDeserializer, AvroSerializer
    from streaming.consumer import consumer_config
    from streaming.producer import producer_config

    reg = open_registry(settings.registry_url, settings.registry_dir)
    de, ser = AvroDeserializer(reg), AvroSerializer(reg, f"{dst}-value", load_schema("Prediction"))
    group = settings.group(f"bench.{name}")
    consumer = KafkaConsumer(**consumer_config(settings, group_id=group, max_poll_records=settings.serve_max_batch))
    consumer.subscribe([src])
    producer = KafkaProducer(**producer_config(settings, transactional_id=f"{group}.tx", linger_ms=0))
    producer.init_transactions()
    done, started = 0, None
    try:
        while done < n:
            polled = consumer.poll(timeout_ms=100, max_records=settings.serve_max_batch)
            recs = [r for rs in polled.values() for r in rs]
            if not recs:
                continue
            started = started or time.monotonic()
            producer.begin_transaction()
            offsets = {}
            for r in recs:
                value = r.value
                if serde:
                    req = de(value).value
                    value = ser({"request_id": req["request_id"], "model": MODEL, "model_version": 0, "outputs": [],
                                 "predicted_label": None, "latency_ms": 0.0, "input_topic": r.topic,
                                 "input_partition": r.partition, "input_offset": r.offset, "error": None})
                producer.send(dst, key=r.key, value=value)
                offsets[TopicPartition(r.topic, r.partition)] = OffsetAndMetadata(r.offset + 1, "", -1)
            producer.send_offsets_to_transaction(offsets, consumer.group_metadata())
            producer.commit_transaction()
            done += len(recs)
        assert started is not None
        return done / (time.monotonic() - started)
    finally:
        consumer.close()
        producer.close()


def _naive(settings: Settings, src: str, dst: str, keras_model: Any) -> float:
    """Baseline: one ``model.predict`` per message (decode, predict, encode, send), on a sample."""
    from kafka import KafkaConsumer, TopicPartition

    from schemas.catalog import load_schema
    from schemas.registry import open_registry
    from schemas.serde import AvroDeserializer, AvroSerializer
    from streaming.producer import Publisher

    reg = open_registry(settings.registry_url, settings.registry_dir)
    de, ser = AvroDeserializer(reg), AvroSerializer(reg, f"{dst}-value", load_schema("Prediction"))
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    consumer.assign([TopicPartition(src, 0)])
    consumer.seek_to_beginning()
    recs: list[Any] = []
    while len(recs) < NAIVE_SAMPLE:
        recs += [r for rs in consumer.poll(timeout_ms=500).values() for r in rs]
    consumer.close()
    keras_model.predict(np.zeros((1, N_FEATURES), np.float32), verbose=0)  # first-call tracing excluded
    with Publisher(settings) as pub:
        started = time.monotonic()
        for r in recs[:NAIVE_SAMPLE]:
            req = de(r.value).value
            out = keras_model.predict(np.asarray([req["features"]], np.float32), verbose=0)[0]
            pred = {"request_id": req["request_id"], "model": MODEL, "model_version": 1,
                    "outputs": [float(v) for v in out], "predicted_label": None, "latency_ms": 0.0,
                    "input_topic": r.topic, "input_partition": r.partition, "input_offset": r.offset, "error": None}
            pub.send_bytes(dst, ser(pred), req["request_id"])
        pub.flush()
        return NAIVE_SAMPLE / (time.monotonic() - started)


def _offered_load(settings: Settings, topic: str, rate: float, seconds: float, seed: int) -> int:
    """Publish requests at ``rate``/s for ``seconds``, each stamped when sent; returns how many."""
    from streaming.producer import Publisher

    template = _requests(1, seed)[0]
    sent = 0
    with Publisher(settings) as pub:
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate)
            while sent < due:
                r = dict(template, request_id=f"l{seed}-{sent}", timestamp=time.time_ns() // 1_000_000)
                pub.publish_to(topic, "PredictionRequest", r, key=r["request_id"])
                sent += 1
            time.sleep(0.002)  # pacing of the load generator
    return sent


def _latencies(settings: Settings, topic: str, prefix: str, expect: int, timeout: float = 120) -> list[float]:
    from streaming.consumer import Subscriber

    out: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    with Subscriber(settings, topic, start="beginning") as sub:
        while len(out) < expect and time.monotonic() < deadline:
            for item in sub.poll_batch(timeout_ms=300):
                v = getattr(item, "value", None)
                if isinstance(v, dict) and v["request_id"].startswith(prefix):
                    out[v["request_id"]] = v["latency_ms"]
    return list(out.values())


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else float("nan")


def run(settings: Settings) -> dict[str, Any]:
    from serving.client import ensure_model_topics
    from serving.model import configure_tf_threads
    from serving.versions import VersionManager
    from serving.worker import ServingWorker
    from streaming.model_registry import ModelRegistry
    from streaming.topics import TopicSpec, ensure_topics, predictions_topic, requests_topic

    configure_tf_threads(1)  # what the worker does; set before any TF use so it applies to every path
    settings = settings.with_(serve_max_batch=256, serve_max_wait_ms=5.0)
    ensure_model_topics(settings, MODEL)
    pipe_src, pipe_dst = settings.topic("bench.pipe.requests"), settings.topic("bench.pipe.predictions")
    naive_dst = settings.topic("bench.naive.predictions")
    ensure_topics(settings, [TopicSpec(name, settings.partitions, 3_600_000, "delete", None, "serving bench")
                             for name in (pipe_src, pipe_dst, naive_dst)])
    versions, keras_model = _publish_versions(settings, 4)
    reqs = _requests(N_REQUESTS, seed=1)
    _produce(settings, requests_topic(settings, MODEL), reqs)
    _produce(settings, pipe_src, reqs)

    naive_rate = _naive(settings, requests_topic(settings, MODEL), naive_dst, keras_model)
    # two alternating rounds (pipe, bytes pipe, worker), best of each kept: less noise on a busy box;
    # the second round's worker keeps running for the latency phase
    pipe_rate = bytes_rate = serve_rate = 0.0
    for rnd in (1, 2):
        pipe_rate = max(pipe_rate, _pipe(settings, pipe_src, pipe_dst, N_REQUESTS, serde=True, name=f"pipe{rnd}"))
        bytes_rate = max(bytes_rate, _pipe(settings, pipe_src, pipe_dst, N_REQUESTS, serde=False,
                                           name=f"bytes{rnd}"))
        manager = VersionManager(settings, MODEL, poll_interval_s=0.2)
        worker = ServingWorker(settings, MODEL, manager=manager)
        worker.group = settings.group(f"bench.serving{rnd}")  # a fresh group: reads all requests again
        worker.member_id, worker.transactional_id = f"{worker.group}.m", f"{worker.group}.tx"
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        poll_until(functools.partial(_answered_all, worker), 300)
        assert worker.first_batch_at is not None and worker.last_batch_at is not None
        serve_rate = max(serve_rate, worker.answered / (worker.last_batch_at - worker.first_batch_at))
        batches_full = worker.batches
        if rnd == 1:
            worker.stop_event.set()
            thread.join(timeout=30)

    # latency at half the measured maximum rate: steady, then with swaps every SWAP_EVERY_S
    rate = serve_rate / 2
    topic = requests_topic(settings, MODEL)
    n_steady = _offered_load(settings, topic, rate, LATENCY_SECONDS, seed=2)
    steady = _latencies(settings, predictions_topic(settings, MODEL), "l2-", n_steady)
    reg = ModelRegistry(settings.model_dir)
    stop = threading.Event()
    swaps_before = manager.stats.swaps

    def swapper() -> None:
        i = 1
        while not stop.wait(SWAP_EVERY_S):
            reg.set_promoted(MODEL, versions[i % len(versions)], "bench swap")
            i += 1

    sw = threading.Thread(target=swapper, daemon=True)
    sw.start()
    n_swap = _offered_load(settings, topic, rate, LATENCY_SECONDS, seed=3)
    stop.set()
    sw.join()
    during = _latencies(settings, predictions_topic(settings, MODEL), "l3-", n_swap)
    swaps = manager.stats.swaps - swaps_before
    worker.stop_event.set()
    thread.join(timeout=30)

    p99_steady, p99_swaps = _pct(steady, 99), _pct(during, 99)
    result: dict[str, Any] = {
        "machine": machine(),
        "requests": N_REQUESTS, "max_batch": settings.serve_max_batch, "max_wait_ms": settings.serve_max_wait_ms,
        "transactions": settings.transactions,
        "throughput": {
            "serving_per_s": round(serve_rate, 1), "pipe_per_s": round(pipe_rate, 1),
            "bytes_pipe_per_s": round(bytes_rate, 1), "vs_bytes_pipe": round(serve_rate / bytes_rate, 3),
            "naive_predict_per_s": round(naive_rate, 2), "naive_sample": NAIVE_SAMPLE,
            "batches": batches_full,
            "vs_pipe_ratio": round(serve_rate / pipe_rate, 3), "vs_pipe_goal": 0.7,
            "vs_naive_ratio": round(serve_rate / naive_rate, 1), "vs_naive_goal": 1000,
        },
        "latency_ms": {
            "offered_per_s": round(rate, 1),
            "steady": {"n": len(steady), "sent": n_steady, "p50": _pct(steady, 50), "p99": p99_steady},
            "during_swaps": {"n": len(during), "sent": n_swap, "swaps": swaps, "p50": _pct(during, 50),
                             "p99": p99_swaps},
            "swap_p99_ratio": round(p99_swaps / p99_steady, 3) if p99_steady else None, "swap_p99_goal": 1.5,
        },
        "load_failures": manager.stats.failures,
    }
    t, lat = result["throughput"], result["latency_ms"]
    result["table"] = [
        {"figure": "predictions/s vs no-model pipe", "value": t["serving_per_s"], "baseline": t["pipe_per_s"],
         "ratio": t["vs_pipe_ratio"], "goal": ">= 0.7"},
        {"figure": "predictions/s vs per-message model.predict", "value": t["serving_per_s"],
         "baseline": t["naive_predict_per_s"], "ratio": t["vs_naive_ratio"], "goal": ">= 1000"},
        {"figure": "p99 latency during swaps vs steady (ms)", "value": lat["during_swaps"]["p99"],
         "baseline": lat["steady"]["p99"], "ratio": lat["swap_p99_ratio"], "goal": "<= 1.5"},
    ]
    write_report("serving", result)
    return result


if __name__ == "__main__":
    with bench_settings() as s:
        print(json.dumps(run(s), indent=2))
