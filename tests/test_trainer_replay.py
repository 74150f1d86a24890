"""True replay: a version is reproduced from the raw Kafka offsets of its lineage.

Events go through the real path (Publisher -> raw topic -> StreamWorker -> feature store); the
custom spec trains version 1; ``reproduce(from_offsets=True)`` re-reads the recorded offsets,
re-featurizes them with the stateful sensor featurizer (state restored from the preceding batch
of each partition), checks the rebuilt bytes against the recorded sha256 and retrains.
"""

from __future__ import annotations

import json

import pytest

from ingest.sensors import generate
from streaming import config
from streaming.exceptions import ModelIntegrityError
from streaming.model_registry import ModelRegistry, metadata_digest, write_json_atomic
from streaming.producer import Publisher
from streaming.store import FeatureStore
from streaming.worker import StreamWorker
from tests.custom_spec_module import SPEC
from trainer.exceptions import LineageError
from trainer.reproduce import reproduce
from trainer.worker import Trainer


def test_reproduce_from_kafka_offsets(settings: config.Settings) -> None:
    settings = settings.with_(batch_max_records=60)
    with Publisher(settings) as pub:
        for record in generate(420, n_sensors=6, seed=21):
            pub.publish("sensor", record)
        pub.flush()
    StreamWorker(settings, "sensor").run(idle_exit_s=3.0)
    batches = FeatureStore(settings.feature_store).batches("sensor")
    assert sum(b.manifest["record_count"] for b in batches) == 420 and len(batches) >= 6

    outcome = Trainer(settings, SPEC, events=False).run_once("test")
    assert outcome.version == 1
    partitions = {b["ranges"][0]["partition"] for b in outcome.metadata["lineage"]["batches"]}
    assert len(partitions) > 1  # the replay crosses partitions, each with its own featurizer state

    report = reproduce(settings, "tiny_linear", 1, spec=SPEC, from_offsets=True)
    assert report["ok"] and report["source"] == "kafka offsets"
    assert report["abs_difference"] <= 1e-6 and report["max_abs_weight_difference"] <= 1e-6

    # a lineage hash that the replayed bytes do not match is refused, naming the batch
    reg = ModelRegistry(settings.model_dir)
    meta_path = reg.version_dir("tiny_linear", 1) / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["lineage"]["batches"][0]["sha256"] = "f" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelIntegrityError, match="metadata.json sha256 mismatch"):  # a hand edit is refused
        reproduce(settings, "tiny_linear", 1, spec=SPEC, from_offsets=True)
    # ... so re-sign it as a (buggy) writer would, to reach the lineage check itself
    meta["metadata_sha256"] = metadata_digest(meta)
    meta_path.write_text(json.dumps(meta))
    state = reg.state("tiny_linear")
    for entry in state["history"]:
        if entry.get("action") == "CREATED" and entry.get("version") == 1:
            entry["metadata_sha256"] = meta["metadata_sha256"]
    write_json_atomic(reg.model_dir("tiny_linear") / "state.json", state)
    with pytest.raises(LineageError, match="featurizer or the records changed"):
        reproduce(settings, "tiny_linear", 1, spec=SPEC, from_offsets=True)
