"""What a C Kafka client would buy: confluent-kafka against kafka-python on the same topic, read and write.

Not part of ``make bench`` (run_all): it measures a lever, not the product. Issue 13 names confluent-kafka
behind the consumer seam as the way past kafka-python's per-record cost; before anyone rewrites the
``Subscriber`` for it, this says how much of the subscribe+decode goal (>= 0.7x kafka-python's raw
consume) the client alone could reach, because the Avro decode stays on top whatever the client.

Per kind (weblog, sensor; ``N`` records published by the SDK), best of ``ROUNDS`` each:

* kafka-python raw consume (assign, ``poll``; what bench_sdk's baseline does);
* confluent-kafka raw consume (``consume(num_messages=2000)``; read_committed, same topic);
* confluent-kafka consume + the SDK's own decode of every value (``AvroDeserializer``).

And the write path (the lever for ``bench_sdk``'s publish goal, >= 0.8x kafka-python's raw send), on the
same records pre-encoded by the SDK:

* kafka-python raw send (``producer_config``: acks=all, idempotence, snappy, linger 5 ms; bench_sdk's baseline);
* confluent-kafka raw produce with the same durability (acks=all, ``enable.idempotence``, snappy, linger
  5 ms, ``murmur2_random``: the Java/kafka-python partitioner, so keys land on the same partitions);
* **across a broker ``kill -9``** (``--skip-crash`` leaves it out; a private broker, started and killed
  here): the idempotent confluent producer at ~2,000 records/s while the embedded broker is killed and
  restarted. Reported: what its delivery reports and error callback said. Why it matters: noida-db
  loses the tail of its log on a kill and forgets the producer's sequence numbers with it; kafka-python
  answers that with retriable ``OutOfOrderSequenceNumberError`` failures the ack ledger re-sends, and
  librdkafka with a *fatal* error that makes the producer unusable (measured 2026-12-01); the Publisher's
  librdkafka adapter replaces the instance and fails its sends for a re-send (``streaming/cproduce.py``).

Both write sides start their client and wait for one warm-up ack before the clock starts (bench_sdk's
sides): librdkafka's idempotent producer takes ~0.5 s to its first ack, which a 12,000-record round
otherwise reads as a rate near 23,000/s.

Ratios are against kafka-python raw. confluent-kafka is in requirements.lock since the platform's bounded
reads fetch with it (streaming/cfetch.py); this measures the bare client, the Subscriber's own figure is
``bench_sdk``'s "bounded read" row.

    python -m benchmarks.bench_client_lever [--skip-crash]   # JSON to stdout and reports/bench/client_lever.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.bench_sdk import _best_wall_cpu, _raw_produce_librdkafka, _raw_publish, _records
from benchmarks.common import bench_settings, fresh, machine, write_report
from schemas.registry import open_registry
from schemas.serde import AvroDeserializer
from streaming.config import Settings
from streaming.consumer import consumer_config
from streaming.cproduce import librdkafka_config
from streaming.producer import KEY_FIELDS, Publisher, producer_config
from streaming.topics import KINDS, raw_topic

N = 12_000
ROUNDS = 3


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _kafka_python(settings: Settings, topic: str) -> tuple[float, float]:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(**consumer_config(settings, group_id=None))
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or set())]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        n, t, cpu = 0, time.perf_counter(), _cpu()
        while n < N:
            n += sum(len(v) for v in c.poll(200).values())
        return time.perf_counter() - t, _cpu() - cpu
    finally:
        c.close()


def _confluent(settings: Settings, topic: str, decode: AvroDeserializer | None) -> tuple[float, float]:
    import confluent_kafka as ck

    c = ck.Consumer({"bootstrap.servers": settings.bootstrap, "group.id": f"lever-{uuid.uuid4().hex}",
                     "enable.auto.commit": False, "auto.offset.reset": "earliest",
                     "isolation.level": "read_committed"})
    try:
        parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
        c.assign([ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in parts])
        n, t, cpu = 0, time.perf_counter(), _cpu()
        while n < N:
            for m in c.consume(num_messages=2000, timeout=0.2):
                if m.error() is None:
                    if decode is not None:
                        decode(m.value())
                    n += 1
        return time.perf_counter() - t, _cpu() - cpu
    finally:
        c.close()


def _produce_sides(settings: Settings, kind: str) -> dict[str, Any]:
    """bench_sdk's two raw sends of the same pre-encoded records: kafka-python's and librdkafka's, each with
    the Publisher's settings (``producer_config``, and ``streaming.cproduce.librdkafka_config`` of it)."""
    s = fresh(settings)
    topic = raw_topic(s, kind)
    with Publisher(s) as pub:
        ser = pub.serializer(topic, KINDS[kind])
        key_field = KEY_FIELDS[KINDS[kind]]
        encoded = [(str(r[key_field]).encode(), ser(r)) for r in _records(kind, N)]
    best = _best_wall_cpu({"kafka_python_send": partial(_raw_publish, s, topic, encoded),
                           "confluent_produce": partial(_raw_produce_librdkafka, s, topic, encoded)}, ROUNDS)
    base = best["kafka_python_send"][0]
    return {name: {"per_s": round(N / w), "cpu_s": round(c, 3), "vs_kafka_python_send": round(base / w, 3)}
            for name, (w, c) in best.items()}


def idempotent_producer_across_kill(rate: int = 2000, before_s: float = 3.0, down_s: float = 1.0,
                                    after_s: float = 4.0) -> dict[str, Any]:
    """The idempotent confluent producer while a private embedded broker is killed (-9) and restarted."""
    import confluent_kafka as ck

    from streaming import config
    from streaming.broker import EmbeddedBroker, free_port
    from streaming.topics import ensure_topics

    home = Path(tempfile.mkdtemp(prefix="streamlearn-lever-kill-"))
    s = config.load({"home": home, "broker_port": free_port(), "metrics_port": -1}, environ={})
    broker = EmbeddedBroker(s)
    broker.start(detach=False)
    errors: dict[str, int] = {}
    acked = [0]

    def note(err: Any) -> None:
        name = f"{err.name()}{' (fatal)' if err.fatal() else ''}{' (retriable)' if err.retriable() else ''}"
        errors[name] = errors.get(name, 0) + 1

    def delivered(err: Any, _msg: Any) -> None:
        if err is None:
            acked[0] += 1
        else:
            note(err)

    try:
        ensure_topics(s)
        topic = raw_topic(s, "sensor")
        p = ck.Producer({**librdkafka_config(producer_config(s)), "error_cb": note, "log_level": 0})
        sent, fatal, t0 = 0, None, time.monotonic()
        phases = {"killed": before_s, "restarted": before_s + down_s, "end": before_s + down_s + after_s}
        done: set[str] = set()
        while time.monotonic() - t0 < phases["end"]:
            el = time.monotonic() - t0
            if el >= phases["killed"] and "killed" not in done:
                broker.kill()
                done.add("killed")
            if el >= phases["restarted"] and "restarted" not in done:
                broker = EmbeddedBroker(s)
                broker.start(detach=False)
                done.add("restarted")
            try:
                if sent < rate * el:
                    try:
                        p.produce(topic, b"r%09d" % sent, b"k%d" % (sent % 7), on_delivery=delivered)
                        sent += 1
                    except BufferError:
                        pass
                p.poll(0.0005)
            except ck.KafkaException as exc:  # the fatal error: from produce, or raised by poll
                fatal = str(exc.args[0])
                break
        detail = None
        try:
            p.flush(30)
        except ck.KafkaException as exc:  # after a fatal error: the error that caused it
            detail = str(exc.args[0])
        return {"sent": sent, "acked": acked[0], "errors": errors, "fatal": fatal, "fatal_cause": detail,
                "producer_usable_after_restart": fatal is None and not any("fatal" in e for e in errors)}
    finally:
        broker.stop()


def run(settings: Settings, crash: bool = True) -> dict[str, Any]:
    produce = {kind: _produce_sides(settings, kind) for kind in ("weblog", "sensor")}
    kinds: dict[str, Any] = {}
    for kind in ("weblog", "sensor"):
        s = fresh(settings)
        topic = raw_topic(s, kind)
        with Publisher(s) as pub:
            for r in _records(kind, N):
                pub.publish(kind, r)
            pub.flush()
        de = AvroDeserializer(open_registry(s.registry_url, s.registry_dir))
        sides = {"kafka_python_raw": lambda: _kafka_python(s, topic),  # noqa: B023 - called in this iteration
                 "confluent_raw": lambda: _confluent(s, topic, None),  # noqa: B023
                 "confluent_decode": lambda: _confluent(s, topic, de)}  # noqa: B023
        best = {name: (float("inf"), 0.0) for name in sides}
        for _ in range(ROUNDS):  # alternating rounds, best of each
            for name, fn in sides.items():
                best[name] = min(best[name], fn())
        base = best["kafka_python_raw"][0]
        kinds[kind] = {name: {"per_s": round(N / w), "cpu_s": round(c, 3), "vs_kafka_python_raw": round(base / w, 3)}
                       for name, (w, c) in best.items()}
    result = {"machine": machine(), "records": N, "rounds": ROUNDS, "kinds": kinds, "produce": produce,
              "idempotent_producer_across_broker_kill": idempotent_producer_across_kill() if crash else "skipped",
              "load_average": [round(x, 2) for x in os.getloadavg()]}
    write_report("client_lever", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-crash", action="store_true", help="leave out the producer across a broker kill -9")
    args = parser.parse_args()
    with bench_settings() as settings:
        print(json.dumps(run(settings, crash=not args.skip_crash), indent=2))
