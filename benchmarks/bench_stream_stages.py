"""Where the stream stage's CPU goes per record: decode + featurize, batch close, persist.

``bench_stream`` times the whole worker (group join, fetches, fsyncs, the batch timer) in wall
seconds, which on a shared box mostly measures waiting for a core. This one isolates the
stage's own work: a published backlog is fetched once, then fed through
:class:`streaming.batcher.Pipeline` in this thread, and each step's **thread CPU time** is summed:

* ``process``: Avro decode, validation, the per-record featurize part, the micro-batcher
  (``Pipeline.process_many`` over each partition's run of records, as the worker calls it);
* ``close``: closing a batch (the featurizer's batched part, e.g. the sensor window features);
* ``persist``: encoding the batch and writing it durably (fsync, rename).

The baseline, in the same run, is the CPU seconds of a bare kafka-python fetch of the same records
(``raw_consume``), so ``cpu_ratio`` = raw consume CPU / stage CPU per record. No group, no commits.

    python -m benchmarks.bench_stream_stages    # JSON to stdout and reports/bench/stream_stages.json
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from benchmarks.bench_stream import _publish
from benchmarks.common import bench_settings, fresh, machine, write_report
from schemas.registry import open_registry
from streaming.batcher import Pipeline
from streaming.config import Settings
from streaming.topics import raw_topic

COUNTS = {"weblog": 10_000, "sensor": 20_000, "image": 1_000}
ROUNDS = 2


class _NoDeadLetters:
    """The generated backlog is valid: a dead letter here means the benchmark itself is broken."""

    def dead_letter(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"unexpected dead letter in the benchmark backlog: {kwargs.get('error')}")


def _fetch(settings: Settings, kind: str, n: int) -> tuple[list[Any], float]:
    topic = raw_topic(settings, kind)
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False,
                             max_poll_records=2000, fetch_max_bytes=32 * 1024 * 1024)
    msgs: list[Any] = []
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        cpu = time.process_time()
        deadline = time.monotonic() + 300
        while len(msgs) < n and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                msgs.extend(batch)
        cpu_s = time.process_time() - cpu
    finally:
        consumer.close()
    if len(msgs) < n:
        raise RuntimeError(f"fetched {len(msgs)} of {n} {kind} records within the deadline")
    msgs.sort(key=lambda m: (m.partition, m.offset))
    return msgs, cpu_s


def _stages(settings: Settings, kind: str, msgs: list[Any], tag: str) -> dict[str, float]:
    s = settings.with_(feature_store=settings.home / f"stages-{tag}")
    pipe = Pipeline(s, kind, namespace="live", registry=open_registry(s.registry_url, s.registry_dir),
                    publisher=_NoDeadLetters(), max_seconds=None)
    spent = {"process": 0.0, "close": 0.0, "persist": 0.0}
    clock = time.thread_time

    def close(partition: int) -> None:
        # the two halves of pipe.sink.flush([partition]), timed apart: close (checkpoint, batch
        # features of the deferred rows) and persist (the durable write)
        t = clock()
        state, _extra = pipe._checkpoint(partition)
        closed = pipe.batcher.close(pipe.topic, partition, state)
        if closed is not None and closed.deferred:
            pipe._finish(closed)
        spent["close"] += clock() - t
        if closed is not None:
            t = clock()
            pipe.sink.write(closed)
            spent["persist"] += clock() - t

    # As the worker feeds it: one process_many call per partition's run up to the next batch boundary
    # (msgs are sorted by partition, then offset).
    i = 0
    while i < len(msgs):
        partition = msgs[i].partition
        room = max(1, s.batch_max_records - pipe.batcher.pending(pipe.topic, partition))
        run = msgs[i:i + room]
        run = [m for m in run if m.partition == partition]
        t = clock()
        pipe.process_many(run)
        spent["process"] += clock() - t
        i += len(run)
        if pipe.batcher.pending(pipe.topic, partition) >= s.batch_max_records:
            close(partition)
    for _, partition in list(pipe.batcher.open_partitions()):
        close(partition)
    if pipe.stats.rows != len(msgs):
        raise RuntimeError(f"{kind}: {pipe.stats.rows} rows from {len(msgs)} records")
    return spent


def run(settings: Settings) -> dict[str, Any]:
    results: dict[str, Any] = {"what": "thread CPU µs per record of each Pipeline stage, best of "
                                       f"{ROUNDS} rounds; baseline: kafka-python fetch CPU of the same records",
                               "machine": machine(), "kinds": {}}
    table = []
    for kind, n in COUNTS.items():
        s = fresh(settings)
        _publish(s, kind, n)
        raw_cpu = float("inf")
        best: dict[str, float] | None = None
        msgs: list[Any] = []
        for r in range(ROUNDS):
            msgs, cpu = _fetch(s, kind, n)
            raw_cpu = min(raw_cpu, cpu)
            spent = _stages(s, kind, msgs, f"{kind}-{r}")
            if best is None or sum(spent.values()) < sum(best.values()):
                best = spent
        assert best is not None
        per = {k: round(v / n * 1e6, 1) for k, v in best.items()}
        total = sum(best.values())
        results["kinds"][kind] = {
            "records": n, "us_per_record": per, "total_us_per_record": round(total / n * 1e6, 1),
            "raw_consume_cpu_us_per_record": round(raw_cpu / n * 1e6, 1),
            "cpu_ratio": round(raw_cpu / total, 3) if total else None,
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        table.append({"figure": f"{kind} stream stage CPU µs/record (process+close+persist)",
                      "value": round(total / n * 1e6, 1), "baseline": round(raw_cpu / n * 1e6, 1),
                      "ratio": round(raw_cpu / total, 3) if total else None, "goal": None})
    results["table"] = table
    return results


def main() -> None:
    with bench_settings() as settings:
        result = run(settings)
    write_report("stream_stages", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
