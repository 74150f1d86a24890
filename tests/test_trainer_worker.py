"""The trainer worker against the real embedded broker: versions, gate decisions, events, drift, loop."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np

from ingest.generators import digits
from ingest.sensors import generate
from streaming import config
from streaming.features import get_featurizer
from streaming.model_registry import ModelRegistry
from streaming.store import FeatureStore
from streaming.topics import model_updates_topic, raw_topic
from tests.helpers import read_topic, wait_until
from trainer.model_io import SavedModelPredictor
from trainer.spec import load_spec
from trainer.synthetic import write_batches
from trainer.worker import DRIFT_ALARMS, Trainer

# min_holdout_rows=80: test-sized streams (the default N=200 needs more data than these tests write)
DIGITS = dataclasses.replace(load_spec("digits_cnn"), epochs=2, min_holdout_rows=80)
T0 = 1_700_000_000_000


def shifted(records):  # type: ignore[no-untyped-def]
    """The same images with every label moved to the next digit: a sudden concept drift."""
    for r in records:
        yield {**r, "label": str((int(r["label"]) + 1) % 10)}


def test_versions_gate_events_lineage_and_drift(settings: config.Settings) -> None:
    store = FeatureStore(settings.feature_store)
    topic = raw_topic(settings, "image")
    recs = list(digits(600, seed=1))
    write_batches(store, "image", recs[:240], batch_size=80, topic=topic)
    trainer = Trainer(settings, DIGITS)
    try:
        first = trainer.run_once("test")
        assert first.version == 1 and first.decision.promote
        reg = ModelRegistry(settings.model_dir)
        assert reg.promoted("digits_cnn") == 1
        meta = reg.verify("digits_cnn", 1)
        assert meta["featurizer"]["version"] == "image-v2" and meta["featurizer"]["input_shape"] == [8, 8, 1]
        assert meta["class_names"] == [str(d) for d in range(10)] and meta["task"] == "classification"
        assert meta["target"] == "digit"
        assert meta["schema_ids"] == [1] and meta["tf_version"] and meta["parent_version"] is None
        roles = [(b["role"], b["ranges"][0]["first_offset"], b["ranges"][0]["last_offset"])
                 for b in meta["lineage"]["batches"]]
        assert roles == [("train", 0, 79), ("train", 80, 159), ("holdout", 160, 239)]
        assert meta["lineage"]["offsets"] == {f"{topic}/0": [[0, 79], [80, 159], [160, 239]]}
        assert all(len(b["sha256"]) == 64 for b in meta["lineage"]["batches"])
        tb = settings.model_dir / "digits_cnn" / "tensorboard" / "v1"
        assert list((tb / "train").glob("events.out.tfevents.*")) and list((tb / "gate").glob("events.*"))

        # drift: a stable error level on unseen batches, then labels shift to the next digit; far
        # fewer new batches than retrain_every_batches and a long timer, so only drift can trigger
        write_batches(store, "image", recs[240:400], batch_size=80, topic=topic, first_offset=240,
                      created_at_ms=T0 + 10)
        write_batches(store, "image", shifted(recs[400:600]), batch_size=100, topic=topic, first_offset=400,
                      created_at_ms=T0 + 20)
        before = DRIFT_ALARMS.labels("digits_cnn")._value.get()
        looping = Trainer(settings.with_(retrain_every_batches=100, retrain_every_seconds=3600.0), DIGITS)
        stop = threading.Event()
        loop = threading.Thread(target=looping.run_forever, args=(stop, 0.1))
        loop.start()
        try:
            wait_until(lambda: len(reg.versions("digits_cnn")) >= 2, timeout=240, message="a drift retrain")
        finally:
            stop.set()
            loop.join(timeout=120)
            looping.close()
        assert DRIFT_ALARMS.labels("digits_cnn")._value.get() == before + 1
        assert reg.metadata("digits_cnn", 2)["trigger"] == "drift"

        # a candidate whose training blows up (NaN learning rate -> NaN weights) is rejected
        write_batches(store, "image", recs[:160], batch_size=80, topic=topic, first_offset=600,
                      created_at_ms=T0 + 30)
        promoted = reg.promoted("digits_cnn")
        broken = Trainer(settings, dataclasses.replace(DIGITS, learning_rate=float("nan")))
        third = broken.run_once("test")
        broken.close()
        assert third.version == 3 and not third.decision.promote
        assert "NaN" in third.decision.reason and reg.promoted("digits_cnn") == promoted
        assert reg.verify("digits_cnn", 3)["gate"]["action"] == "REJECTED"
        history = [(e["action"], e["version"]) for e in reg.history("digits_cnn")]
        decision2 = reg.metadata("digits_cnn", 2)["gate"]["action"]
        assert history == [("CREATED", 1), ("PROMOTED", 1), ("CREATED", 2), (decision2, 2), ("CREATED", 3),
                           ("REJECTED", 3)]
    finally:
        trainer.close()
    events = read_topic(settings, model_updates_topic(settings), expect=6)
    got = [(e.key.decode() if isinstance(e.key, bytes) else e.key, e.value["version"], e.value["action"])
           for e in events]
    assert got == [("digits_cnn", 1, "CREATED"), ("digits_cnn", 1, "PROMOTED"), ("digits_cnn", 2, "CREATED"),
                   ("digits_cnn", 2, decision2), ("digits_cnn", 3, "CREATED"), ("digits_cnn", 3, "REJECTED")]
    promoted_event = events[1].value
    assert promoted_event["primary_metric"] == "accuracy" and promoted_event["current_score"] is None
    assert 0.0 <= promoted_event["candidate_score"] <= 1.0 and "first version" in promoted_event["reason"]
    assert "NaN" in events[5].value["reason"]


def test_custom_spec_trains_in_the_loop_and_its_saved_model_predicts(settings: config.Settings) -> None:
    settings = settings.with_(model_specs={"tiny_linear": "tests.custom_spec_module:SPEC"},
                              retrain_every_batches=3, retrain_every_seconds=3600.0)
    store = FeatureStore(settings.feature_store)
    spec = load_spec("tiny_linear", settings)
    trainer = Trainer(settings, spec, events=False)
    stop = threading.Event()
    loop = threading.Thread(target=trainer.run_forever, args=(stop, 0.1))
    loop.start()
    reg = ModelRegistry(settings.model_dir)
    try:
        records = list(generate(300, n_sensors=3, seed=4))
        write_batches(store, "sensor", records[:200], batch_size=100, topic=raw_topic(settings, "sensor"))
        assert reg.versions("tiny_linear") == []  # 2 batches < retrain_every_batches
        write_batches(store, "sensor", records[200:], batch_size=100, topic=raw_topic(settings, "sensor"),
                      first_offset=200, created_at_ms=T0 + 10)
        # promoted or not is the gate's call (beating persistence beyond noise on 100 rows)
        wait_until(lambda: reg.versions("tiny_linear") == [1], timeout=240, message="version 1 of tiny_linear")
    finally:
        stop.set()
        loop.join(timeout=120)
    assert not loop.is_alive()
    meta = reg.verify("tiny_linear", 1)
    assert meta["trigger"] == "batches" and meta["output_names"] == ["next_value_delta"]
    fz = get_featurizer("sensor")
    predictor = SavedModelPredictor(reg.version_dir("tiny_linear", 1))
    x = np.random.default_rng(0).normal(size=(5, fz.n_features)).astype(np.float32)
    out = predictor.predict(x)
    assert out.shape == (5, 1) and np.all(np.isfinite(out))
    assert tuple(predictor.input_spec().shape.as_list()) == (None, fz.n_features)


def test_a_damaged_batch_is_set_aside_and_training_goes_on(settings: config.Settings) -> None:
    """One feature batch whose file no longer hashes to its manifest (a flipped byte: bit rot, a partial
    restore) failed every retrain with "sha256 ... the file changed" for as long as it stayed in the
    training window (a reservoir batch for good), and every drift check with it. The trainer now sets it
    aside, says so, and trains on the rest; the version's lineage names only what it used."""
    from pathlib import Path

    from trainer.worker import DAMAGED

    store = FeatureStore(settings.feature_store)
    topic = raw_topic(settings, "image")
    write_batches(store, "image", list(digits(320, seed=1)), batch_size=80, topic=topic)
    damaged = store.batches("image")[1]
    path = Path(damaged.path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    before = DAMAGED.labels("digits_cnn")._value.get()
    trainer = Trainer(settings, DIGITS)
    try:
        out = trainer.run_once("test")
    finally:
        trainer.close()
    assert out.version == 1
    used = [b["batch_id"] for b in out.metadata["lineage"]["batches"]]
    assert damaged.batch_id not in used and len(used) == 3, used
    assert trainer.set_aside == {damaged.batch_id}
    assert DAMAGED.labels("digits_cnn")._value.get() == before + 1


def test_a_batch_deleted_while_the_run_reads_it_is_planned_out_and_other_missing_files_are_errors(
        settings: config.Settings, monkeypatch: Any) -> None:
    """`store gc` may delete a planned batch before the fit reads it: the run is planned again without it.
    Only that case: any FileNotFoundError of the run used to be taken for it, retried and then reported
    as "a batch was deleted", hiding e.g. a missing model file behind a wrong message."""
    from pathlib import Path

    import pytest

    import trainer.data

    store = FeatureStore(settings.feature_store)
    write_batches(store, "image", list(digits(320, seed=1)), batch_size=80, topic=raw_topic(settings, "image"))
    doomed = store.batches("image")[1]
    real = trainer.data.file_sha256

    def gc_meanwhile(path: Any) -> str:
        if Path(doomed.path).exists():  # what `store gc` in another process does
            FeatureStore(settings.feature_store).remove_batch("image", doomed.batch_id)
        return real(path)

    def broken_fit(*_a: Any, **_k: Any) -> Any:
        raise FileNotFoundError(2, "No such file or directory", "/somewhere/else")

    t = Trainer(settings, DIGITS)
    try:
        with pytest.raises(FileNotFoundError, match="/somewhere/else"):
            t.run_once("test", fit=broken_fit)
        monkeypatch.setattr(trainer.data, "file_sha256", gc_meanwhile)
        out = t.run_once("test")
        used = [b["batch_id"] for b in out.metadata["lineage"]["batches"]]
        assert out.version == 1 and doomed.batch_id not in used and len(used) == 3, used
    finally:
        t.close()


def test_a_run_that_cannot_train_is_not_retried_on_the_same_batches_at_every_poll(settings: config.Settings) -> None:
    """Batches with no labelled row: the loop ran a cycle on them once a second (65 "cycle started" lines a
    minute under `up`, each reloading the batches). Now it waits for new batches (or the timer)."""
    store = FeatureStore(settings.feature_store)
    topic = raw_topic(settings, "image")
    unlabelled = [{**r, "label": None} for r in digits(160, seed=3)]
    write_batches(store, "image", unlabelled, batch_size=80, topic=topic)
    trainer = Trainer(settings.with_(retrain_every_batches=1, retrain_every_seconds=3600.0), DIGITS, events=False)
    runs: list[str] = []
    polls: list[int] = []
    run_once, unseen_batches = trainer.run_once, trainer.unseen_batches

    def counting_run(trigger: str) -> Any:
        runs.append(trigger)
        return run_once(trigger)

    def counting_unseen() -> Any:
        polls.append(1)
        return unseen_batches()

    trainer.run_once, trainer.unseen_batches = counting_run, counting_unseen  # type: ignore[method-assign,assignment]
    stop = threading.Event()
    loop = threading.Thread(target=trainer.run_forever, args=(stop, 0.02))
    loop.start()
    try:
        wait_until(lambda: len(polls) >= 40, timeout=120, message="40 polls of the loop")
        assert runs == ["batches"], runs  # one attempt, not one per poll
        write_batches(store, "image", unlabelled[:80], batch_size=80, topic=topic, first_offset=160,
                      created_at_ms=T0 + 10)
        wait_until(lambda: len(runs) == 2, timeout=120, message="a new attempt once a new batch arrived")
        seen = len(polls)
        wait_until(lambda: len(polls) >= seen + 40, timeout=120, message="40 more polls")
        assert len(runs) == 2, runs
    finally:
        stop.set()
        loop.join(timeout=120)
        trainer.close()


def test_a_batch_deleted_while_a_run_trains_is_not_in_the_published_lineage(settings: config.Settings) -> None:
    """`store gc` between a cycle's plan and its publish: the version was promoted with a lineage naming
    deleted batches (`retrain --reproduce` then failed). The run now checks before publishing and plans
    again without them."""
    import functools

    from trainer.evaluate import fit_and_evaluate

    store = FeatureStore(settings.feature_store)
    write_batches(store, "image", list(digits(320, seed=5)), batch_size=80, topic=raw_topic(settings, "image"))
    trainer = Trainer(settings, DIGITS, events=False)
    fits: list[list[str]] = []

    def fit_then_gc(spec, features, plan, **kw):  # type: ignore[no-untyped-def]
        fits.append([b.batch_id for b in plan.train_new])
        if len(fits) == 1:
            store.remove_batch("image", plan.train_new[0].batch_id)  # what gc did meanwhile
        return functools.partial(fit_and_evaluate, cache=trainer.model_cache)(spec, features, plan, **kw)

    try:
        outcome = trainer.run_once("test", fit=fit_then_gc)
    finally:
        trainer.close()
    assert len(fits) == 2 and fits[0][0] not in fits[1]
    lineage = {b["batch_id"] for b in ModelRegistry(settings.model_dir).verify("digits_cnn", outcome.version)
               ["lineage"]["batches"]}
    assert fits[0][0] not in lineage and lineage <= {b.batch_id for b in store.batches("image")}


def test_a_damaged_newest_version_does_not_stop_the_periodic_trainer(settings: config.Settings) -> None:
    """The newest version's metadata.json truncated: `train M` (periodic) exited 1 at once, a crash loop
    under `up`. The loop now logs it and retries with a back-off."""
    from tests.test_model_registry import fake_export

    reg = ModelRegistry(settings.model_dir)
    reg.publish("digits_cnn", fake_export(reg, "digits_cnn"), {"task": "classification"})
    meta = reg.version_dir("digits_cnn", 1) / "metadata.json"
    meta.write_text(meta.read_text()[:40])
    trainer = Trainer(settings, DIGITS, events=False)
    calls: list[int] = []
    unseen = trainer.unseen_batches

    def counting() -> Any:
        calls.append(1)
        return unseen()

    trainer.unseen_batches = counting  # type: ignore[method-assign]
    stop = threading.Event()
    loop = threading.Thread(target=trainer.run_forever, args=(stop, 0.02))
    loop.start()
    try:
        wait_until(lambda: len(calls) >= 2, timeout=60, message="a second look after the first failed")
        assert loop.is_alive()
    finally:
        stop.set()
        loop.join(timeout=60)
        trainer.close()
