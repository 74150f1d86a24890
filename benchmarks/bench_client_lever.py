"""What a C Kafka client would buy the read path: confluent-kafka against kafka-python on the same topic.

Not part of ``make bench`` (run_all): it measures a lever, not the product. Issue 13 names confluent-kafka
behind the consumer seam as the way past kafka-python's per-record cost; before anyone rewrites the
``Subscriber`` for it, this says how much of the subscribe+decode goal (>= 0.7x kafka-python's raw
consume) the client alone could reach, because the Avro decode stays on top whatever the client.

Per kind (weblog, sensor; ``N`` records published by the SDK), best of ``ROUNDS`` each:

* kafka-python raw consume (assign, ``poll``; what bench_sdk's baseline does);
* confluent-kafka raw consume (``consume(num_messages=2000)``; read_committed, same topic);
* confluent-kafka consume + the SDK's own decode of every value (``AvroDeserializer``).

Ratios are against kafka-python raw. confluent-kafka is in requirements.lock since the platform's bounded
reads fetch with it (streaming/cfetch.py); this measures the bare client, the Subscriber's own figure is
``bench_sdk``'s "bounded read" row.

    python -m benchmarks.bench_client_lever     # JSON to stdout and reports/bench/client_lever.json
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from benchmarks.bench_sdk import _records
from benchmarks.common import bench_settings, fresh, machine, write_report
from schemas.registry import open_registry
from schemas.serde import AvroDeserializer
from streaming.config import Settings
from streaming.consumer import consumer_config
from streaming.producer import Publisher
from streaming.topics import raw_topic

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


def run(settings: Settings) -> dict[str, Any]:
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
    result = {"machine": machine(), "records": N, "rounds": ROUNDS, "kinds": kinds,
              "load_average": [round(x, 2) for x in os.getloadavg()]}
    write_report("client_lever", result)
    return result


if __name__ == "__main__":
    with bench_settings() as settings:
        print(json.dumps(run(settings), indent=2))
