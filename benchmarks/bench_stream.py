"""Stream worker throughput (decode + featurize + persist) against a raw consume, same run.

For each kind the same pre-published topic is read twice per round:

* baseline: a plain kafka-python ``KafkaConsumer`` (explicit assignment, from the beginning)
  that only counts the records: the ceiling any consumer on this broker and machine can reach;
* worker: a :class:`streaming.worker.StreamWorker` in a fresh consumer group, decoding through
  the registry, featurizing, micro-batching (``batch_max_records``) and writing durable Avro
  batches (fsync, rename) until the store holds every offset. Group join is included.

Two alternating rounds, best of each kept. Goal (issue "Streaming"): worker >= 0.5x baseline.
Images are fewer (each is a PNG decoded and resized by the featurizer). For images a second
baseline (issue 13) is a bare Pillow loop over the same images' bytes, already in memory (open,
``draft`` for JPEG DCT scaling, grayscale, box resize to the featurizer's size, numpy /255: no Kafka,
no validation, no store): the per-image cost of the pixels alone. The worker side does all of that
plus the Kafka fetch, Avro decode, the safety checks (size and magic-byte checks, header probe and
pixel caps before decoding, decompression-bomb warnings as errors), batching and the durable write.
Goal: the worker's per-image cost in its steady phase (first processed record -> all batches
durable) >= 0.8x the loop's rate; the end-to-end figure (with group join) is reported next to it.

    python -m benchmarks.bench_stream                 # JSON to stdout and reports/bench/stream.json
    python -m benchmarks.bench_stream --kinds image   # only the image phase (report stream-image.json)
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from benchmarks.common import bench_settings, fresh, machine, write_report
from streaming.config import Settings
from streaming.polling import poll_until
from streaming.producer import Publisher
from streaming.store import FeatureStore
from streaming.topics import raw_topic

GOAL = 0.5
PILLOW_GOAL = 0.8
COUNTS = {"weblog": 10_000, "sensor": 20_000, "image": 1_000}
ROUNDS = 2


def _publish(settings: Settings, kind: str, n: int) -> None:
    from streamlearn.commands.publish import generated

    with Publisher(settings) as pub:
        for event in generated(kind, n, seed=11):
            pub.publish(kind, event)


def _raw_consume(settings: Settings, kind: str, n: int) -> tuple[float, float]:
    topic = raw_topic(settings, kind)
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False,
                             max_poll_records=2000, fetch_max_bytes=32 * 1024 * 1024,
                             max_partition_fetch_bytes=8 * 1024 * 1024)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        start, cpu = time.perf_counter(), time.process_time()
        seen = 0
        deadline = time.monotonic() + 300
        while seen < n and time.monotonic() < deadline:
            for msgs in consumer.poll(timeout_ms=500).values():
                seen += len(msgs)
        if seen < n:
            raise RuntimeError(f"raw consume saw {seen} of {n} {kind} records within the deadline")
        return time.perf_counter() - start, time.process_time() - cpu
    finally:
        consumer.close()


def _pillow_loop(settings: Settings, n: int) -> tuple[float, float]:
    """Seconds (wall, CPU) of a bare Pillow decode + grayscale + resize loop over the topic's images."""
    import io

    import numpy as np
    from PIL import Image

    from schemas.registry import open_registry
    from schemas.serde import AvroDeserializer
    from streaming.features import get_featurizer

    topic = raw_topic(settings, "image")
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False,
                             max_poll_records=2000, fetch_max_bytes=32 * 1024 * 1024)
    deserializer = AvroDeserializer(open_registry(settings.registry_url, settings.registry_dir))
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        images: list[bytes] = []
        deadline = time.monotonic() + 300
        while len(images) < n and time.monotonic() < deadline:
            for msgs in consumer.poll(timeout_ms=500).values():
                images += [bytes(deserializer(m.value).value["data"]) for m in msgs]
    finally:
        consumer.close()
    size = get_featurizer("image").size  # type: ignore[attr-defined]
    start, cpu = time.perf_counter(), time.process_time()
    for data in images:
        img = Image.open(io.BytesIO(data))
        img.draft("L", size)  # JPEG: let libjpeg scale while decoding, as the featurizer does (PNG: no-op)
        gray = img.convert("L")
        if gray.size != size:
            gray = gray.resize(size, Image.Resampling.BOX)
        np.asarray(gray, dtype=np.float32) / 255.0
    return time.perf_counter() - start, time.process_time() - cpu


def _worker(settings: Settings, kind: str, n: int, round_no: int) -> tuple[float, float, dict[str, Any]]:
    from streaming.worker import StreamWorker

    # A short batch timer: with the default 5 s, each partition's last partial batch would wait it out
    # and the figure would measure the timer, not decode + featurize + persist.
    s = settings.with_(feature_store=settings.home / f"features-{round_no}", batch_max_seconds=0.25)
    store = FeatureStore(s.feature_store)
    start, cpu = time.perf_counter(), time.process_time()
    worker = StreamWorker(s, kind, group=s.group(f"bench-stream-{kind}-{round_no}"))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    topic = raw_topic(s, kind)

    def persisted() -> int:  # from file names only (no manifest parsing), so the watcher costs the worker little
        return sum(last - first + 1 for p in range(s.partitions) for first, last in store.ranges(kind, topic, p))

    first: list[tuple[float, float]] = []  # (wall, CPU) when the worker had processed its first record

    def all_persisted() -> bool:
        if not first and worker.stats.records:  # a plain int read: costs the worker nothing
            first.append((time.perf_counter(), time.process_time()))
        return persisted() >= n

    # A 10 ms watch for images: their whole run is a few hundred ms, and a 50 ms watch would add up to
    # 50 ms to it; the other kinds keep the default (their runs are seconds long).
    poll_until(all_persisted, 600, interval_s=0.01 if kind == "image" else 0.05)
    done = persisted()
    end, end_cpu = time.perf_counter(), time.process_time()
    stop.set()
    thread.join(60)
    if done < n:
        raise RuntimeError(f"worker persisted {done} of {n} {kind} records within the deadline")
    stats = worker.stats
    t_first, cpu_first = first[0] if first else (start, cpu)
    # steady: from the first processed record to the last durable batch, i.e. the per-record cost of
    # fetch + decode + featurize + batch + durable write without the one-time start (group join, the
    # first fetch), which a long-running worker pays once and a 1,000-image backlog would be dominated by.
    return end - start, end_cpu - cpu, {"rows": stats.rows, "dead_letters": stats.dead_letters,
                                        "batches": stats.batches, "steady_s": end - t_first,
                                        "steady_cpu_s": end_cpu - cpu_first, "start_s": t_first - start}


def run(settings: Settings, kinds: list[str] | None = None) -> dict[str, Any]:
    """Measure ``kinds`` (default: all of :data:`COUNTS`, in that order)."""
    results: dict[str, Any] = {"goal": f">= {GOAL}x raw consume", "machine": machine(), "kinds": {}}
    table = []
    for kind in kinds or list(COUNTS):
        n = COUNTS[kind]
        s = fresh(settings)
        _publish(s, kind, n)
        raw_best = worker_best = raw_cpu = worker_cpu = steady_best = steady_cpu = float("inf")
        info: dict[str, Any] = {}
        for r in range(ROUNDS):
            wall, cpu = _raw_consume(s, kind, n)
            raw_best, raw_cpu = min(raw_best, wall), min(raw_cpu, cpu)
            wall, cpu, info = _worker(s, kind, n, r)
            worker_best, worker_cpu = min(worker_best, wall), min(worker_cpu, cpu)
            steady_best, steady_cpu = min(steady_best, info["steady_s"]), min(steady_cpu, info["steady_cpu_s"])
        info.update(steady_s=round(steady_best, 3), steady_cpu_s=round(steady_cpu, 3),
                    start_s=round(info["start_s"], 3))
        raw_rate, worker_rate = n / raw_best, n / worker_best
        ratio = round(worker_rate / raw_rate, 3)
        results["kinds"][kind] = {
            "records": n, "batch_max_records": s.batch_max_records, "batch_max_seconds": 0.25,
            "raw_consume_records_per_s": round(raw_rate), "worker_records_per_s": round(worker_rate),
            "ratio": ratio, "meets_goal": ratio >= GOAL,
            # CPU seconds of this process per phase: on a shared, overloaded box wall time mostly
            # measures waiting for a core; CPU time shows the work each side really does.
            "raw_cpu_s": round(raw_cpu, 3), "worker_cpu_s": round(worker_cpu, 3),
            "cpu_ratio": round(raw_cpu / worker_cpu, 3) if worker_cpu else None,
            "load_average": [round(x, 2) for x in os.getloadavg()], **info,
        }
        table.append({"figure": f"{kind} worker records/s", "value": round(worker_rate),
                      "baseline": round(raw_rate), "ratio": ratio, "goal": GOAL})
        if kind == "image":
            pil_best = pil_cpu = float("inf")
            for _ in range(ROUNDS):
                wall, cpu = _pillow_loop(s, n)
                pil_best, pil_cpu = min(pil_best, wall), min(pil_cpu, cpu)
            # Two figures against the same Pillow loop. The goal row is the per-image cost the issue asks
            # for: the worker's steady phase (first processed record -> every batch durable). The
            # end-to-end row also holds the one-time start (consumer-group join, first fetch), which for a
            # 1,000-image backlog of 8x8 PNGs (~0.1 ms each in Pillow) outweighs all the pixel work.
            pil_ratio = round(pil_best / worker_best, 3)
            steady_ratio = round(pil_best / steady_best, 3)
            results["kinds"][kind].update({
                "pillow_loop_images_per_s": round(n / pil_best), "pillow_cpu_s": round(pil_cpu, 3),
                "worker_ms_per_image": round(worker_best / n * 1000, 3),
                "worker_steady_ms_per_image": round(steady_best / n * 1000, 3),
                "pillow_ms_per_image": round(pil_best / n * 1000, 3),
                "ratio_vs_pillow": pil_ratio, "cpu_ratio_vs_pillow": round(pil_cpu / worker_cpu, 3),
                "steady_ratio_vs_pillow": steady_ratio,
                "steady_cpu_ratio_vs_pillow": round(pil_cpu / steady_cpu, 3) if steady_cpu else None,
                "meets_pillow_goal": steady_ratio >= PILLOW_GOAL})
            table.append({"figure": "image worker per-image cost (steady: first record -> all durable) vs a "
                                    "bare Pillow decode+resize loop, images/s",
                          "value": round(n / steady_best), "baseline": round(n / pil_best),
                          "ratio": steady_ratio, "goal": PILLOW_GOAL})
            table.append({"figure": "image worker end to end (incl. group join) vs the same Pillow loop, images/s",
                          "value": round(worker_rate), "baseline": round(n / pil_best), "ratio": pil_ratio,
                          "goal": None})
    results["table"] = table
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", choices=list(COUNTS), default=None,
                        help="measure only these kinds (default: all); a subset writes stream-<kinds>.json")
    args = parser.parse_args(argv)
    with bench_settings() as settings:
        result = run(settings, args.kinds)
    write_report("stream" if not args.kinds else "stream-" + "-".join(args.kinds), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
