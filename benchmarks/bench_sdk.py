"""Publisher and Subscriber SDK throughput against raw kafka-python on the same data, same run.

* publish: ``Publisher.publish(kind, record)`` (validate + encode + frame + key + send) against
  ``KafkaProducer.send`` of the same records pre-encoded, with the same producer settings
  (snappy, acks=all, idempotence, linger). Goal >= 0.8x.
* subscribe: ``Subscriber`` iteration with decoding against a raw ``KafkaConsumer`` reading the
  same topic without decoding. Goal >= 0.7x.

Each side runs twice, alternating, and the best of each is kept (less noise on a busy machine).

    python -m benchmarks.bench_sdk
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from benchmarks.common import bench_settings, fresh, machine, timed, write_report
from streaming.config import Settings
from streaming.consumer import Subscriber
from streaming.producer import KEY_FIELDS, Publisher, producer_config
from streaming.topics import KINDS, raw_topic

COUNTS = {"weblog": 20_000, "sensor": 20_000, "image": 1_797}


def _records(kind: str, n: int) -> list[dict[str, Any]]:
    from streamlearn.commands.publish import generated

    return list(generated(kind, n, seed=3))


def _raw_publish(settings: Settings, topic: str, encoded: list[tuple[bytes, bytes]]) -> int:
    producer = KafkaProducer(**producer_config(settings))
    try:
        futures = [producer.send(topic, value=v, key=k) for k, v in encoded]
        producer.flush()
        for f in futures:
            f.get(timeout=60)
    finally:
        producer.close()
    return len(encoded)


def _sdk_publish(settings: Settings, kind: str, records: list[dict[str, Any]]) -> int:
    with Publisher(settings) as pub:
        pub.serializer(raw_topic(settings, kind), KINDS[kind])  # registration is setup, not throughput
        futures = [pub.publish(kind, r) for r in records]
        pub.flush()
        for f in futures:
            f.get(timeout=60)
    return len(records)


def _raw_consume(settings: Settings, topic: str, n: int) -> int:
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False,
                             max_poll_records=2000, fetch_max_bytes=32 * 1024 * 1024,
                             max_partition_fetch_bytes=8 * 1024 * 1024)
    parts = consumer.partitions_for_topic(topic) or set()
    consumer.assign([TopicPartition(topic, p) for p in parts])
    consumer.seek_to_beginning()
    got = 0
    try:
        while got < n:
            for msgs in consumer.poll(timeout_ms=1000).values():
                got += len(msgs)
    finally:
        consumer.close()
    return got


def _sdk_consume(settings: Settings, topic: str, n: int) -> int:
    got = 0
    with Subscriber(settings, topic, start="beginning") as sub:
        while got < n:
            batch = sub.poll_batch(timeout_ms=1000)
            got += sum(1 for item in batch if item.ok)
    return got


def run(settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {"benchmark": "sdk", "machine": machine(), "kinds": {}}
    for kind, n in COUNTS.items():
        records = _records(kind, n)
        s_raw, s_sdk = fresh(settings), fresh(settings)
        with Publisher(s_raw) as pub:
            topic_raw = raw_topic(s_raw, kind)
            encoded = [(str(r[KEY_FIELDS[KINDS[kind]]]).encode(), pub.encode(topic_raw, KINDS[kind], r))
                       for r in records]
        raw_t = sdk_t = raw_ct = sdk_ct = float("inf")
        for _ in range(2):  # alternate the two sides and keep the best of each: less noise
            raw_t = min(raw_t, timed(partial(_raw_publish, s_raw, topic_raw, encoded))[0])
            sdk_t = min(sdk_t, timed(partial(_sdk_publish, s_sdk, kind, records))[0])
        total = 2 * n  # the SDK's topic now holds both rounds: read them back
        for _ in range(2):
            raw_ct = min(raw_ct, timed(partial(_raw_consume, s_sdk, raw_topic(s_sdk, kind), total))[0])
            sdk_ct = min(sdk_ct, timed(partial(_sdk_consume, s_sdk, raw_topic(s_sdk, kind), total))[0])
        out["kinds"][kind] = {
            "records": n,
            "publish_raw_per_s": round(n / raw_t), "publish_sdk_per_s": round(n / sdk_t),
            "publish_ratio": round(raw_t / sdk_t, 3), "publish_goal": 0.8,
            "consume_raw_per_s": round(total / raw_ct), "consume_sdk_per_s": round(total / sdk_ct),
            "consume_ratio": round(raw_ct / sdk_ct, 3), "consume_goal": 0.7,
        }
    out["table"] = [row for kind, k in out["kinds"].items() for row in (
        {"figure": f"publish {kind} events/s", "value": k["publish_sdk_per_s"], "baseline": k["publish_raw_per_s"],
         "ratio": k["publish_ratio"], "goal": ">= 0.8"},
        {"figure": f"subscribe+decode {kind} records/s", "value": k["consume_sdk_per_s"],
         "baseline": k["consume_raw_per_s"], "ratio": k["consume_ratio"], "goal": ">= 0.7"})]
    out["ok"] = all(k["publish_ratio"] >= 0.8 and k["consume_ratio"] >= 0.7 for k in out["kinds"].values())
    write_report("sdk", out)
    return out


if __name__ == "__main__":
    with bench_settings() as s:
        print(json.dumps(run(s), indent=2))
