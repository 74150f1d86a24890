"""``Pipeline.process_many`` (one call per poll's run of records, streaming/batcher.py) must store exactly
what ``Pipeline.process`` one record at a time stores: the same batch bytes, the same manifests
(offsets, dead-letter offsets, fingerprint chains, featurizer state), the same dead letters with the
same reasons, on real published records mixed with hostile ones (bad framing, an unknown schema id,
a truncated body, an empty value, a reading the sensor featurizer refuses), in runs of any length.
And a registry outage stops it at the record that met it, with nothing after it processed."""

from __future__ import annotations

import io
import json
from collections import namedtuple
from pathlib import Path
from typing import Any

import fastavro
import pytest

from schemas.registry import open_registry
from streaming.batcher import Pipeline
from streaming.config import Settings
from streaming.producer import Publisher
from streaming.topics import dead_letter_topic, raw_topic
from tests.helpers import read_topic

#: The fields of a kafka-python ConsumerRecord the pipeline reads: a plain value object, not a mock.
Msg = namedtuple("Msg", "topic partition offset timestamp key value headers")

N = 240
BATCH = 50  # small batches: several close inside one run, as in the worker


def _records(settings: Settings, kind: str) -> list[Msg]:
    """N published records of ``kind`` read back raw, with hostile ones in between; offsets 0.. on one
    partition (the pipeline only needs them ascending per partition)."""
    from streamlearn.commands.publish import generated

    with Publisher(settings) as pub:
        for event in (_photos() if kind == "image" else generated(kind, N, seed=5)):
            pub.publish(kind, event)
    items = read_topic(settings, raw_topic(settings, kind), decode=False, expect=N)
    assert len(items) == N
    items.sort(key=lambda r: (r.partition, r.offset))
    registry = open_registry(settings.registry_url, settings.registry_dir)
    good = items[0].raw
    schema_id = int.from_bytes(good[1:5], "big")
    schema = fastavro.parse_schema(json.loads(registry.get_schema(schema_id)))
    value: dict[str, Any] = fastavro.schemaless_reader(io.BytesIO(good[5:]), schema)  # type: ignore[assignment]
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, {**value, "timestamp": 5})  # before 1678: refused by validation
    hostile = {
        3: b"\x00not avro",  # bad framing / body
        40: b"\x00\x7f\xff\xff\xf0" + good[5:],  # an id the registry does not know
        41: good[:-3],  # truncated body
        97: good[:5] + out.getvalue(),  # decodes, refused by the featurizer
        149: b"",  # empty value
    }
    raws = [r.raw for r in items]
    for at, raw in sorted(hostile.items()):
        raws.insert(at, raw)
    topic = raw_topic(settings, kind)
    return [Msg(topic, 0, i, 0, b"k%d" % i, raw, [("h", b"v")] if i % 7 == 0 else []) for i, raw in enumerate(raws)]


def _photos() -> Any:
    """N camera-sized JPEG ImageEvents (big enough that process_many decodes them ahead, on threads), a
    few of them broken in ways only the decode finds: cut short, or declared PNG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(5)
    for i in range(N):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
        data = buf.getvalue()
        content_type = "JPEG"
        if i % 37 == 5:
            data = data[: len(data) // 2]  # truncated: Pillow fails inside the decode
        elif i % 53 == 7:
            content_type = "PNG"  # the bytes say JPEG
        yield {"image_id": f"img-{i}", "timestamp": 1_700_000_000_000 + i, "content_type": content_type,
               "width": 160, "height": 120, "data": data, "label": str(i % 10), "source": None}


def _pipeline(settings: Settings, kind: str, namespace: str, pub: Publisher) -> Pipeline:
    s = settings.with_(batch_max_records=BATCH)
    return Pipeline(s, kind, namespace=namespace, registry=open_registry(s.registry_url, s.registry_dir),
                    publisher=pub, max_seconds=None)


def _stored(settings: Settings, kind: str, namespace: str) -> dict[str, Any]:
    """Every batch's bytes, manifest (less the write time and namespace) and state file, by batch id."""
    d = Path(settings.feature_store) / namespace / kind
    out: dict[str, Any] = {}
    for f in sorted(d.glob("*.avro")):
        manifest = json.loads(f.with_suffix(".json").read_text())
        for key in [k for k in manifest if "created" in k or k == "namespace"]:
            manifest.pop(key)
        state = d / f"{f.stem}.state.json"
        out[f.stem] = (f.read_bytes(), manifest, state.read_bytes() if state.exists() else None)
    return out


@pytest.mark.parametrize("kind", ["sensor", "weblog", "image"])
def test_process_many_stores_what_process_stores(settings: Settings, kind: str) -> None:
    """For images, process_many decodes each run's pictures ahead on threads (ImageFeaturizer.prepare_many),
    process() one by one: the rows, dead letters and their reasons must still be the same."""
    msgs = _records(settings, kind)
    with Publisher(settings) as pub:
        one = _pipeline(settings, kind, "one", pub)
        for m in msgs:
            one.process(m)
            if one.sink.pending(0) >= BATCH:
                one.sink.flush([0])
        one.sink.flush([0])
        many = _pipeline(settings, kind, "many", pub)
        if kind == "image":
            many.featurizer.decode_threads = 4  # type: ignore[attr-defined]  # threads even on a 1-CPU box
        sizes = [7, 1, 64, 500, 3]  # runs shorter and longer than a batch, as polls come
        i = k = 0
        while i < len(msgs):
            room = max(1, BATCH - many.sink.pending(0))
            run = msgs[i:i + min(room, sizes[k % len(sizes)])]
            assert many.process_many(run) == (len(run), None)
            i, k = i + len(run), k + 1
            if many.sink.pending(0) >= BATCH:
                many.sink.flush([0])
        many.sink.flush([0])
        pub.settle()
    dead = one.stats.dead_letters
    assert dead == many.stats.dead_letters >= 4  # the weblog featurizer takes any int timestamp: 4, sensor 5
    assert (one.stats.records, one.stats.rows) == (many.stats.records, many.stats.rows) == (len(msgs), len(msgs) - dead)
    assert one.stats.dead_letter_reasons == many.stats.dead_letter_reasons
    a, b = _stored(settings, kind, "one"), _stored(settings, kind, "many")
    assert list(a) == list(b) and len(a) == -(-len(msgs) // BATCH)
    for bid in a:
        assert a[bid][0] == b[bid][0], f"{bid}: batch bytes differ"
        assert a[bid][1] == b[bid][1], f"{bid}: manifests differ"
        assert a[bid][2] == b[bid][2], f"{bid}: featurizer state differs"
    assert a[next(iter(a))][1]["fingerprints"]["chain"]  # the chains compared above exist
    if kind == "image":  # the threaded path ran, on most records, and the broken pictures were among them
        assert many.featurizer.decoded_ahead > N // 2  # type: ignore[attr-defined]
        assert one.featurizer.decoded_ahead == 0  # type: ignore[attr-defined]
        assert dead >= 4 + N // 37 + N // 53
    letters = read_topic(settings, dead_letter_topic(settings, kind), decode=False, expect=2 * dead)
    assert len(letters) == 2 * dead  # each pipeline dead-lettered the same records, with the same bytes
    counts: dict[bytes, int] = {}
    for letter in letters:
        counts[letter.raw] = counts.get(letter.raw, 0) + 1
    assert sorted(counts.values()) == [2] * len(counts)

def test_registry_outage_stops_at_its_record(settings: Settings, tmp_path: Path) -> None:
    """A registry that cannot be reached: nothing is processed or dead-lettered, the caller retries."""
    msgs = _records(settings, "sensor")[:10]
    with Publisher(settings) as pub:
        s = settings.with_(registry_url="http://127.0.0.1:9", batch_max_records=BATCH)
        p = Pipeline(s, "sensor", namespace="outage", registry=open_registry(s.registry_url, s.registry_dir),
                     publisher=pub, max_seconds=None)
        done, outage = p.process_many(msgs[4:])  # msgs[4] is a well-framed record: its schema is looked up
    assert done == 0 and outage is not None
    assert p.stats.records == 0 and p.stats.dead_letters == 0 and p.sink.pending(0) == 0


def test_image_decode_threads_setting_reaches_the_worker_featurizer(settings: Settings, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """STREAMLEARN_IMAGE_DECODE_THREADS (a CPU quota the process cannot see) sets the decode threads; 0 keeps
    the featurizer's own default."""
    from streaming import config

    monkeypatch.setenv("STREAMLEARN_IMAGE_DECODE_THREADS", "3")
    assert config.load({"home": str(tmp_path)}).image_decode_threads == 3
    with Publisher(settings) as pub:
        one = _pipeline(settings.with_(image_decode_threads=1), "image", "one", pub)
        default = _pipeline(settings, "image", "default", pub)
    assert one.featurizer.decode_threads == 1  # type: ignore[attr-defined]
    assert default.featurizer.decode_threads == type(default.featurizer)().decode_threads >= 1  # type: ignore[attr-defined]


def test_records_dropped_unpersisted_are_taken_off_the_run_counts(settings: Settings) -> None:
    """A partition revoked (or re-read from the store) drops its unpersisted batches, and they are read and
    counted again: after a kill -9 and a rebalance the run's summary said 600 records and rows for 300
    written. Dropped records leave the counts; what is persisted stays counted once."""
    msgs = _records(settings, "sensor")
    with Publisher(settings) as pub:
        p = _pipeline(settings, "sensor", "uncount", pub)
        first = msgs[: BATCH + 40]  # one batch persisted, 40 records open
        p.process_many(first[:BATCH])
        p.sink.flush([0])
        p.process_many(first[BATCH:])
        before = (p.stats.records, p.stats.rows, p.stats.dead_letters)
        assert before[0] == BATCH + 40
        assert p.forget(0) == 40
        after = (p.stats.records, p.stats.rows, p.stats.dead_letters)
        assert after[0] == BATCH and after[1] + after[2] == BATCH
        p.restore(0)  # the next owner (here: the same pipeline) re-reads the 40 from the store's end
        p.process_many(msgs[BATCH:BATCH + 40])
        p.sink.flush([0])
        pub.settle()
    assert (p.stats.records, p.stats.rows, p.stats.dead_letters) == before


def test_a_record_of_another_kinds_schema_is_a_decode_dead_letter_naming_both(settings: Settings) -> None:
    """A stream worker reads its kind's records as written (no reader schema): a WebLogEvent published to the
    sensor topic was read, then refused field by field ("sensor_id: expected a non-empty string, got None").
    Its writer schema is now checked once per schema id against the kind's record name."""
    from streamlearn.commands.publish import generated

    with Publisher(settings) as pub:
        weblog = pub.encode(raw_topic(settings, "weblog"), "WebLogEvent", next(iter(generated("weblog", 1, seed=5))))
        sensor = pub.encode(raw_topic(settings, "sensor"), "SensorReading", next(iter(generated("sensor", 1, seed=5))))
        pipeline = _pipeline(settings, "sensor", "wrongkind", pub)
        topic = raw_topic(settings, "sensor")
        msgs = [Msg(topic, 0, i, 0, b"k", raw, []) for i, raw in enumerate([sensor, weblog, sensor, weblog])]
        assert pipeline.process_many(msgs[:2]) == (2, None)
        pipeline.process(msgs[2])
        pipeline.process(msgs[3])
        pipeline.flush_dead_letters()
        pub.settle()
    assert (pipeline.stats.rows, pipeline.stats.dead_letters) == (2, 2)
    letters = read_topic(settings, dead_letter_topic(settings, "sensor"), decode=False, expect=2)
    for letter in letters:
        reason = dict(letter.headers)["dl.message"].decode()
        assert "is a WebLogEvent record, not a SensorReading" in reason, reason
        assert letter.raw == weblog
