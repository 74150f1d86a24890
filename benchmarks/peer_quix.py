"""The peer side of ``bench_peer``: the sensor pipeline as an idiomatic Quix Streams application.

What the Quix app does (one ``Application``, one ``StreamingDataFrame``):

* consumes the same raw sensor topic as our ``StreamWorker`` (same broker, its own consumer group,
  ``auto_offset_reset="earliest"``), with librdkafka (confluent-kafka) underneath;
* decodes the Confluent-framed Avro values with Quix's ``AvroDeserializer`` backed by a
  ``SchemaRegistryClientConfig`` that points at ``streamlearn registry serve`` (the schema is fetched
  once by id and cached by the Confluent client, as ours caches it);
* computes the same features with ``sdf.apply(..., stateful=True)``: the per-sensor buffer of the
  last ``history`` readings lives in Quix's per-key RocksDB state (``State.get``/``State.set``), and
  the row is built by our own :class:`SensorFeaturizer` (same validation, same one-step-back
  training row, same window maths), so both sides compute identical rows and the comparison is
  about the frameworks, not about two feature implementations;
* sinks every row to a file with Quix's ``CSVSink`` (one JSON value column per row), flushed on each
  checkpoint; the checkpoint then commits the Kafka offsets and flushes the RocksDB state and its
  changelog topic (Quix's defaults: ``commit_interval=5 s``, changelog topics on, at-least-once).

What it does not do, compared with ours (so the ratio is read with these in mind):

* durability of the output: Quix's CSV sink appends with ``open(path, "a")`` and never fsyncs; ours
  writes each micro-batch as an Avro file plus manifest, fsyncs both, renames atomically and only
  then commits offsets; ours also checkpoints the featurizer state into every batch manifest;
* exactly-once effect: Quix is at-least-once by default (a crash between sink flush and commit
  replays records into the CSV); ours resumes from the store's highest offset, so no row is duplicated;
* bad input: a record that fails to decode or to validate stops the Quix app (its default error
  callbacks raise); ours dead-letters it with the reason and keeps going;
* batching: Quix flushes once per 5 s checkpoint (for this backlog: once, at the end); ours closes
  a batch per partition every ``batch_max_records`` records or 0.25 s (the bench's timer), i.e.
  it fsyncs and commits many times per run;
* the LRU bound on tracked sensors (``max_sensors``) is not applied: Quix keeps state per key;
* its state holds ``window + 1`` readings per sensor, ours ``history`` (64) so that late readings
  within the allowed lateness are inserted in order (same rows for this in-order backlog; the
  smaller state favours Quix).

Quix's extra work that ours does not do: every state update is also produced to a changelog topic
(Quix's recovery mechanism; ours restores from the manifest instead).
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

from streaming.features.sensor import SensorBuffer, SensorFeaturizer, SensorState

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
STATE_KEY = "buf"


def available() -> str | None:
    """None when quixstreams imports, else why not (the benchmark then reports a skip row)."""
    try:
        import quixstreams  # noqa: F401
        from quixstreams.models.serializers.avro import AvroDeserializer  # noqa: F401
    except ImportError as exc:
        return f"quixstreams not installed ({exc}); `make bench` installs it from requirements-bench.lock"
    return None


def _millis(value: Any) -> Any:
    """Avro ``timestamp-millis`` as epoch ms: the Confluent deserializer applies logical types (datetime)."""
    if isinstance(value, dt.datetime):
        return (value - EPOCH) // dt.timedelta(milliseconds=1)
    return value


def quix_featurizer() -> SensorFeaturizer:
    """Our featurizer with the smallest history that gives the same rows for in-order readings.

    Ours keeps 64 readings per sensor so that a reading within the allowed lateness is inserted in
    order; the backlog is in order per sensor, and a Quix developer would keep just the window plus
    the previous reading (``window + 1``) in state: less to (de)serialize per record, in Quix's favour.
    """
    base = SensorFeaturizer()
    return SensorFeaturizer(window=base.window, history=base.window + 1)


def make_features(featurizer: SensorFeaturizer) -> Any:
    """The stateful apply callback: one sensor's buffer in Quix state -> our featurizer -> a row dict."""

    def features(value: dict[str, Any], state: Any) -> dict[str, Any]:
        record = dict(value)
        record["timestamp"] = _millis(record.get("timestamp"))
        sensors = SensorState()
        saved = state.get(STATE_KEY)
        if saved is not None:
            buf = SensorBuffer()
            buf.times, buf.values, buf.anomalies, buf.trimmed = saved["t"], saved["v"], saved["a"], saved["trimmed"]
            sensors.sensors[str(record.get("sensor_id"))] = buf
        row = featurizer.featurize(record, sensors)
        state.set(STATE_KEY, sensors.sensors[row.key].as_json())
        return {"key": row.key, "event_time_ms": row.event_time_ms, "x": row.x.tolist(), **row.labels}

    return features


class _TimedCSVSink:
    """Factory for a CSVSink that notes when its last flush ended (measurement only, same writes)."""

    @staticmethod
    def create(path: Path, marks: dict[str, float]) -> Any:
        from quixstreams.sinks.core.csv import CSVSink

        class TimedCSVSink(CSVSink):
            def write(self, batch: Any) -> None:
                super().write(batch)
                marks["last_flush"] = time.perf_counter()

        return TimedCSVSink(str(path))


def run_quix(*, bootstrap: str, topic: str, group: str, registry_url: str, workdir: Path, n: int,
             deadline_s: float = 300.0) -> dict[str, Any]:
    """Run the Quix app until it has output ``n`` rows (and flushed them); return its timings.

    ``seconds`` runs from building the app to the end of the sink flush that wrote the last rows
    (ours: to the moment the store holds every offset), so group join and recovery count on both sides.
    """
    from quixstreams import Application
    from quixstreams.models import SchemaRegistryClientConfig
    from quixstreams.models.serializers.avro import AvroDeserializer

    workdir.mkdir(parents=True, exist_ok=True)
    marks: dict[str, float] = {}
    start, cpu = time.perf_counter(), time.process_time()
    app = Application(broker_address=bootstrap, consumer_group=group, auto_offset_reset="earliest",
                      state_dir=str(workdir / "state"), loglevel="WARNING")
    source = app.topic(topic, key_deserializer="str",
                       value_deserializer=AvroDeserializer(
                           schema_registry_client_config=SchemaRegistryClientConfig(url=registry_url)))
    sdf = app.dataframe(source)
    sdf = sdf.apply(make_features(quix_featurizer()), stateful=True)
    sink_path = workdir / "features.csv"
    sdf.sink(_TimedCSVSink.create(sink_path, marks))
    app.run(count=n, timeout=deadline_s, collect=False)
    returned = time.perf_counter()
    cpu_s = time.process_time() - cpu
    with sink_path.open(encoding="utf-8") as f:
        rows = sum(1 for _ in f) - 1  # header
    if rows < n:
        raise RuntimeError(f"Quix app wrote {rows} of {n} rows to {sink_path} before stopping")
    return {"seconds": marks.get("last_flush", returned) - start, "seconds_to_return": returned - start,
            "cpu_s": cpu_s, "rows": rows}
