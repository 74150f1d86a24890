"""Publisher and Subscriber SDK throughput against raw kafka-python on the same data, same run.

* publish: ``Publisher.publish(kind, record)`` (validate + encode + frame + key + send) against
  ``KafkaProducer.send`` of the same records pre-encoded, with the same producer settings
  (snappy, acks=all, idempotence, linger). Goal >= 0.8x. The Publisher sends with librdkafka by
  default (streaming/cproduce.py), so two more sides, not goals, keep the figure honest: the
  Publisher against a raw librdkafka produce of the same bytes (the same client's floor), and the
  Publisher with ``fast_publisher=False`` (kafka-python) against the kafka-python raw send.
* subscribe: ``Subscriber`` iteration with decoding against a raw ``KafkaConsumer`` with the same
  consumer settings (``consumer_config``: read_committed, fetch sizes) reading the same topic without
  decoding. Goal >= 0.7x. Two Subscriber sides: a tailing one (no ``until``; kafka-python with its idle
  back-off, what workers and ``subscribe`` without a bound use) and a bounded one (``until="end"``:
  replays, read-backs, ``subscribe --until-end``), which fetches with librdkafka (streaming/cfetch.py).

Per kind it reports wall-time ratios (the goals) and, beside them, the CPU seconds of this process
per side and their ratio, with the load average: on a shared machine the wall figures move with the
neighbours, the CPU figures much less (the broker runs in its own process and is not counted).
The image kind cycles the 1,797 digits to ``COUNTS["image"]`` records, so a side runs long enough
to be timed (one pass took ~0.05 s, mostly setup).

* codec, per built-in schema, no broker: the SDK's serializer (validate + encode + Confluent
  framing) and deserializer (unframe + decode + trailing-byte check) against the same steps done
  with fastavro's ``schemaless_writer``/``schemaless_reader`` on the parsed schema and our
  validator; and our validator against ``fastavro.validation.validate(raise_errors=True)``,
  which it keeps beside fastavro for clearer errors (docs/AVRO.md). Snappy is not timed:
  the Kafka producer compresses whole batches, the same bytes either way. This is the figure that
  decided that a per-schema code generator did not earn its place (it had to be >= 2x).

Each side runs alternating, and the best of each is kept (less noise on a busy machine).

    python -m benchmarks.bench_sdk            # everything (starts a broker)
    python -m benchmarks.bench_sdk --codec    # only the codec table, no broker
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from fastavro import schemaless_reader, schemaless_writer
from fastavro.validation import validate
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from benchmarks.common import bench_settings, fresh, machine, write_report
from schemas import catalog, serde
from schemas.registry import FileRegistry
from schemas.validate import compile_validator
from streaming.config import Settings
from streaming.consumer import Subscriber, consumer_config
from streaming.producer import KEY_FIELDS, Publisher, producer_config
from streaming.topics import KINDS, raw_topic

COUNTS = {"weblog": 12_000, "sensor": 12_000, "image": 6_000}  # >= ~1 s per side and round
ROUNDS = 3  # alternating rounds per side; the best of each is kept


def _records(kind: str, n: int) -> list[dict[str, Any]]:
    """``n`` demo records of ``kind``; the digits (1,797 images) repeat to reach ``n``."""
    from streamlearn.commands.publish import generated

    base = list(generated(kind, n, seed=3))
    return [base[i % len(base)] for i in range(n)] if base else []


#: Each publish side first sends one record here and waits for its ack, before the clock starts: the
#: client's connection, metadata and producer id are setup, like the serializer's registration. Why:
#: librdkafka's idempotent producer takes ~0.5 s to its first ack (kafka-python ~0.03 s), which was most
#: of a 12,000-record round and made a start-up figure read as throughput. Start-up is reported apart.
WARM_UP_SUFFIX = ".warm-up"


def _raw_publish(settings: Settings, topic: str, encoded: list[tuple[bytes, bytes]]) -> Iterator[None]:
    producer = KafkaProducer(**producer_config(settings))
    try:
        producer.send(topic + WARM_UP_SUFFIX, value=b"warm-up").get(timeout=60)
        yield  # the clock starts here
        futures = [producer.send(topic, value=v, key=k) for k, v in encoded]
        producer.flush()
        for f in futures:
            f.get(timeout=60)
    finally:
        producer.close()


def _raw_produce_librdkafka(settings: Settings, topic: str, encoded: list[tuple[bytes, bytes]]) -> Iterator[None]:
    """The same pre-encoded records through a bare librdkafka producer with the Publisher's durability
    (streaming.cproduce's settings): the baseline of the client the Publisher sends with by default."""
    import confluent_kafka as ck

    from streaming.cproduce import librdkafka_config

    producer = ck.Producer(librdkafka_config(producer_config(settings)))
    acked = [0]

    def delivered(err: Any, _msg: Any) -> None:
        if err is None:
            acked[0] += 1

    producer.produce(topic + WARM_UP_SUFFIX, b"warm-up", on_delivery=delivered)
    if producer.flush(60) or acked[0] != 1:
        raise RuntimeError("librdkafka raw produce: the warm-up record was not acked")
    yield  # the clock starts here
    for k, v in encoded:
        while True:
            try:
                producer.produce(topic, v, k, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.01)
    producer.flush(60)
    if acked[0] != len(encoded) + 1:
        raise RuntimeError(f"librdkafka raw produce: {acked[0] - 1} of {len(encoded)} acked")


def _sdk_publish(settings: Settings, kind: str, records: list[dict[str, Any]],
                 client: str = "librdkafka") -> Iterator[None]:
    with Publisher(settings.with_(fast_publisher=client == "librdkafka")) as pub:
        if pub.client != client:
            raise RuntimeError(f"the Publisher sent with {pub.client}, not {client}")
        topic = raw_topic(settings, kind)
        pub.serializer(topic, KINDS[kind]).schema_id  # noqa: B018 - registers: setup, not throughput
        pub.send_bytes(topic + WARM_UP_SUFFIX, b"warm-up").get(timeout=60)
        yield  # the clock starts here
        futures = [pub.publish(kind, r) for r in records]
        pub.flush()
        for f in futures:
            f.get(timeout=60)


def _raw_consume(settings: Settings, topic: str, n: int) -> Iterator[None]:
    """kafka-python, assigned to every partition from the beginning: the consume baseline. Like the
    publish sides, the clock starts once the client is made and positioned (the SDK sides likewise)."""
    consumer = KafkaConsumer(**consumer_config(settings))  # the Subscriber's settings, read_committed too
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in parts])
        consumer.seek_to_beginning()
        yield  # the clock starts here
        got = 0
        while got < n:
            for msgs in consumer.poll(timeout_ms=1000).values():
                got += len(msgs)
    finally:
        consumer.close()


def _sdk_read_back(settings: Settings, topic: str, n: int) -> Iterator[None]:
    """A bounded read (``until="end"``): what replays, read-backs and ``subscribe --until-end`` do. It
    fetches with librdkafka (streaming/cfetch.py); the check below keeps the figure honest about that."""
    got = 0
    with Subscriber(settings, topic, start="beginning", until="end") as sub:
        if sub.fetcher != "librdkafka":
            raise RuntimeError(f"the bounded read fetched with {sub.fetcher}, not librdkafka")
        yield  # the clock starts here: made and positioned
        while not sub.finished:
            got += sum(1 for item in sub.poll_batch(timeout_ms=1000) if item.ok)
    if got != n:
        raise RuntimeError(f"the bounded read got {got} records, not {n}")


def _sdk_consume(settings: Settings, topic: str, n: int) -> Iterator[None]:
    got = 0
    with Subscriber(settings, topic, start="beginning") as sub:
        yield  # the clock starts here: made and positioned
        while got < n:
            batch = sub.poll_batch(timeout_ms=1000)
            got += sum(1 for item in batch if item.ok)


CODEC_RECORDS = 4_000
CODEC_ROUNDS = 7


def _schema_records(name: str, n: int) -> list[dict[str, Any]]:
    """``n`` realistic records of built-in schema ``name`` (the demo generators where there are some)."""
    rng = random.Random(3)
    kinds = {"WebLogEvent": "weblog", "SensorReading": "sensor", "ImageEvent": "image"}
    if name in kinds:
        return _records(kinds[name], min(n, COUNTS[kinds[name]]))
    t0 = 1_700_000_000_000
    made: dict[str, Callable[[int], dict[str, Any]]] = {
        "PredictionRequest": lambda i: {
            "request_id": f"req-{i}", "model": "weblog-anomaly", "timestamp": t0 + i,
            "event_json": None if i % 2 else '{"status": 200, "path": "/index.html"}',
            "features": [rng.random() for _ in range(16)] if i % 2 else None, "reply_topic": None},
        "Prediction": lambda i: {
            "request_id": f"req-{i}", "model": "digits", "model_version": 3,
            "outputs": [rng.random() for _ in range(10)], "predicted_label": str(i % 10),
            "latency_ms": rng.random() * 5, "input_topic": "streamlearn.raw.image", "input_partition": i % 3,
            "input_offset": i, "error": None},
        "ModelUpdate": lambda i: {
            "model": "sensor-anomaly", "version": i, "action": ("CREATED", "PROMOTED", "REJECTED")[i % 3],
            "path": f"/var/lib/streamlearn/models/sensor-anomaly/{i}", "timestamp": t0 + i,
            "primary_metric": "auc", "candidate_score": rng.random(), "current_score": rng.random(),
            "reason": None if i % 3 != 2 else "candidate auc below current"},
        "DeadLetter": lambda i: {
            "stage": "decode", "error_class": "MalformedRecordError",
            "message": f"data: Avro body is not a valid encoding for schema id {i % 7}",
            "source": None if i % 2 else "streamlearn.raw.weblog"},
    }
    return [made[name](i) for i in range(n)]


def _best_alternating(sides: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best CPU time of each side over ``rounds`` rounds, the sides alternating within a round.

    CPU time of this process, not wall time: the work is single-threaded and CPU-bound, and on a
    shared machine wall time mostly measures the neighbours (ratios swung 1.5x-4x run to run)."""
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(rounds):
        for key, fn in sides.items():
            start = time.process_time()
            fn()
            best[key] = min(best[key], time.process_time() - start)
    return best


def _fastavro_codec(parsed: Any, schema_id: int) -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    """The baseline: the serializer's steps done with fastavro alone (plus our validator)."""
    header = serde.frame(schema_id, b"")
    check = compile_validator(parsed)

    def encode(value: Any) -> bytes:
        check(value)
        buf = io.BytesIO()
        schemaless_writer(buf, parsed, value)
        return header + buf.getvalue()

    def decode(data: bytes) -> Any:
        serde.unframe(data)
        buf = io.BytesIO(data)
        buf.seek(serde.HEADER_SIZE)
        value = schemaless_reader(buf, parsed, None)
        if buf.tell() != len(data):
            raise ValueError("trailing bytes")
        return value

    return encode, decode


def codec_run(n: int = CODEC_RECORDS, rounds: int = CODEC_ROUNDS) -> dict[str, Any]:
    """Per built-in schema: SDK serializer/deserializer vs fastavro alone, records per second."""
    out: dict[str, Any] = {"records": n, "rounds": rounds, "schemas": {}}
    registry = FileRegistry(Path(tempfile.mkdtemp(prefix="streamlearn-bench-codec-")))
    for name in catalog.SCHEMA_NAMES:
        records = _schema_records(name, n)
        schema = catalog.load_schema(name)
        ser = serde.AvroSerializer(registry, f"{name}-value", schema)
        des = serde.AvroDeserializer(registry)
        fa_encode, fa_decode = _fastavro_codec(ser.parsed, ser.schema_id)
        framed = [ser(r) for r in records]
        if framed != [fa_encode(r) for r in records]:
            raise AssertionError(f"{name}: the SDK and fastavro encode differently")
        if [des(b).value for b in framed] != [fa_decode(b) for b in framed]:
            raise AssertionError(f"{name}: the SDK and fastavro decode differently")
        enc = _best_alternating({"sdk": lambda: [ser(r) for r in records],  # noqa: B023 - run in this pass
                                 "fastavro": lambda: [fa_encode(r) for r in records]}, rounds)  # noqa: B023
        dec = _best_alternating({"sdk": lambda: [des(b) for b in framed],  # noqa: B023
                                 "fastavro": lambda: [fa_decode(b) for b in framed]}, rounds)  # noqa: B023
        val = _best_alternating({"ours": lambda: [ser.validate(r) for r in records],  # noqa: B023
                                 "fastavro": lambda: [validate(r, ser.parsed, raise_errors=True)  # noqa: B023
                                              for r in records]}, max(1, rounds // 2))  # noqa: B023
        out["schemas"][name] = {
            "records": len(records), "mean_bytes": round(sum(map(len, framed)) / len(framed)),
            "validate_ours_per_s": round(len(records) / val["ours"]),
            "validate_fastavro_per_s": round(len(records) / val["fastavro"]),
            "validate_ratio": round(val["fastavro"] / val["ours"], 2),
            "encode_sdk_per_s": round(len(records) / enc["sdk"]),
            "encode_fastavro_per_s": round(len(records) / enc["fastavro"]),
            "encode_ratio": round(enc["fastavro"] / enc["sdk"], 2),
            "decode_sdk_per_s": round(len(records) / dec["sdk"]),
            "decode_fastavro_per_s": round(len(records) / dec["fastavro"]),
            "decode_ratio": round(dec["fastavro"] / dec["sdk"], 2),
        }
    return out


def _best_wall_cpu(sides: dict[str, Callable[[], object]], rounds: int,
                   setup: dict[str, float] | None = None) -> dict[str, tuple[float, float]]:
    """Best wall and best CPU seconds (this process) of each side, the sides alternating in each round.

    A side that is a generator is timed from its first ``yield`` (what comes before is setup); the best
    setup wall time of each such side goes into ``setup``."""
    best = {key: (float("inf"), float("inf")) for key in sides}
    for _ in range(rounds):
        for key, fn in sides.items():
            cpu0, wall0 = time.process_time(), time.perf_counter()
            result = fn()  # a plain side runs whole here; a generator not at all yet
            if isinstance(result, Iterator):
                next(result)  # setup
                if setup is not None:
                    setup[key] = min(setup.get(key, float("inf")), time.perf_counter() - wall0)
                cpu0, wall0 = time.process_time(), time.perf_counter()
                for _ in result:
                    raise RuntimeError(f"benchmark side {key} yielded twice")
            wall = time.perf_counter() - wall0
            cpu = time.process_time() - cpu0
            best[key] = (min(best[key][0], wall), min(best[key][1], cpu))
    return best


def run(settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {"benchmark": "sdk", "machine": machine(), "kinds": {}, "codec": codec_run()}
    for kind, n in COUNTS.items():
        records = _records(kind, n)
        s_raw, s_sdk = fresh(settings), fresh(settings)
        with Publisher(s_raw) as pub:
            topic_raw = raw_topic(s_raw, kind)
            encoded = [(str(r[KEY_FIELDS[KINDS[kind]]]).encode(), pub.encode(topic_raw, KINDS[kind], r))
                       for r in records]
        s_kp = fresh(settings)
        startup: dict[str, float] = {}
        pub_t = _best_wall_cpu({"raw": partial(_raw_publish, s_raw, topic_raw, encoded),
                                "raw_librdkafka": partial(_raw_produce_librdkafka, s_raw, topic_raw, encoded),
                                "sdk": partial(_sdk_publish, s_sdk, kind, records),
                                "sdk_kafka_python": partial(_sdk_publish, s_kp, kind, records, "kafka-python")},
                               ROUNDS, startup)
        total = ROUNDS * n  # the SDK's topic now holds every round: read them all back
        con_setup: dict[str, float] = {}
        con_t = _best_wall_cpu({"raw": partial(_raw_consume, s_sdk, raw_topic(s_sdk, kind), total),
                                "sdk": partial(_sdk_consume, s_sdk, raw_topic(s_sdk, kind), total),
                                "bounded": partial(_sdk_read_back, s_sdk, raw_topic(s_sdk, kind), total)},
                               ROUNDS, con_setup)
        (raw_t, raw_c), (sdk_t, sdk_c) = pub_t["raw"], pub_t["sdk"]
        (raw_ct, raw_cc), (sdk_ct, sdk_cc), (bnd_ct, bnd_cc) = con_t["raw"], con_t["sdk"], con_t["bounded"]
        out["kinds"][kind] = {
            "records": n, "loadavg": [round(x, 2) for x in os.getloadavg()],
            "publish_raw_per_s": round(n / raw_t), "publish_sdk_per_s": round(n / sdk_t),
            "publish_ratio": round(raw_t / sdk_t, 3), "publish_goal": 0.8,
            "publish_raw_cpu_s": round(raw_c, 3), "publish_sdk_cpu_s": round(sdk_c, 3),
            "publish_cpu_ratio": round(raw_c / sdk_c, 3),
            "publish_raw_librdkafka_per_s": round(n / pub_t["raw_librdkafka"][0]),
            "publish_vs_raw_librdkafka": round(pub_t["raw_librdkafka"][0] / sdk_t, 3),
            "publish_kafka_python_per_s": round(n / pub_t["sdk_kafka_python"][0]),
            "publish_kafka_python_ratio": round(raw_t / pub_t["sdk_kafka_python"][0], 3),
            "publish_kafka_python_cpu_s": round(pub_t["sdk_kafka_python"][1], 3),
            "publish_startup_s": {side: round(t, 3) for side, t in startup.items()},  # client start to first ack
            "consume_raw_per_s": round(total / raw_ct), "consume_sdk_per_s": round(total / sdk_ct),
            "consume_ratio": round(raw_ct / sdk_ct, 3), "consume_goal": 0.7,
            "consume_raw_cpu_s": round(raw_cc, 3), "consume_sdk_cpu_s": round(sdk_cc, 3),
            "consume_cpu_ratio": round(raw_cc / sdk_cc, 3),
            "bounded_sdk_per_s": round(total / bnd_ct), "bounded_ratio": round(raw_ct / bnd_ct, 3),
            "bounded_sdk_cpu_s": round(bnd_cc, 3), "bounded_cpu_ratio": round(raw_cc / bnd_cc, 3),
            "consume_setup_s": {side: round(t, 3) for side, t in con_setup.items()},  # made and positioned
        }
    out["table"] = [row for kind, k in out["kinds"].items() for row in (
        {"figure": f"publish {kind} events/s (librdkafka; baseline: raw kafka-python send)",
         "value": k["publish_sdk_per_s"], "baseline": k["publish_raw_per_s"], "ratio": k["publish_ratio"],
         "goal": ">= 0.8"},
        {"figure": f"publish {kind} events/s vs a raw librdkafka produce (same client)",
         "value": k["publish_sdk_per_s"], "baseline": k["publish_raw_librdkafka_per_s"],
         "ratio": k["publish_vs_raw_librdkafka"], "goal": None},
        {"figure": f"publish {kind} events/s, STREAMLEARN_FAST_PUBLISHER=false (kafka-python)",
         "value": k["publish_kafka_python_per_s"], "baseline": k["publish_raw_per_s"],
         "ratio": k["publish_kafka_python_ratio"], "goal": None},
        {"figure": f"publish {kind}: client start to first ack, s (setup, not in the rows above; "
                   f"raw kafka-python / raw librdkafka / Publisher on kafka-python)",
         "value": k["publish_startup_s"].get("sdk"),
         "baseline": " / ".join(str(k["publish_startup_s"].get(side)) for side in
                                ("raw", "raw_librdkafka", "sdk_kafka_python")),
         "ratio": None, "goal": "reported"},
        {"figure": f"subscribe+decode {kind} records/s, tailing (kafka-python)", "value": k["consume_sdk_per_s"],
         "baseline": k["consume_raw_per_s"], "ratio": k["consume_ratio"], "goal": ">= 0.7"},
        {"figure": f"subscribe+decode {kind} records/s, bounded read (librdkafka)", "value": k["bounded_sdk_per_s"],
         "baseline": k["consume_raw_per_s"], "ratio": k["bounded_ratio"], "goal": ">= 0.7"})]
    out["ok"] = all(k["publish_ratio"] >= 0.8 and k["consume_ratio"] >= 0.7 and k["bounded_ratio"] >= 0.7
                    for k in out["kinds"].values())
    write_report("sdk", out)
    return out


if __name__ == "__main__":
    if "--codec" in sys.argv[1:]:
        report = {"benchmark": "sdk-codec", "machine": machine(), "codec": codec_run()}
        write_report("sdk_codec", report)
        print(json.dumps(report, indent=2))
    else:
        with bench_settings() as s:
            print(json.dumps(run(s), indent=2))
