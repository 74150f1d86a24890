"""Version management on the real broker: damaged exports are never served; canary rollback."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import REGISTRY

from serving.client import predict, to_request
from serving.policy import Policy
from serving.versions import CANARY_ROLLED_BACK, CANARY_ROUTING
from streaming.config import Settings
from streaming.model_registry import ModelRegistry
from streaming.producer import Publisher
from streaming.topics import predictions_topic, raw_topic
from tests.helpers import read_topic, wait_until
from tests.serving_helpers import (
    WEBLOG_FEATURIZER,
    Running,
    damage_published,
    expected_outputs,
    force_promote,
    publish,
    weblog_event,
)


def _metric(name: str, model: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": model}) or 0.0


@pytest.fixture()
def registry(settings: Settings) -> ModelRegistry:
    return ModelRegistry(settings.model_dir)


def test_damaged_versions_are_never_served_and_the_old_one_keeps_answering(
        settings: Settings, registry: ModelRegistry) -> None:
    model = "dmg"
    publish(registry, model, tag=100.0)
    run = Running(settings, model)
    failures_before = _metric("streamlearn_serving_load_failures_total", model)
    try:
        bad: list[int] = []
        for how in ("truncate_variables", "random_pb", "nan_weights"):  # damaged before publish: manifest agrees
            bad.append(publish(registry, model, tag=666.0, corrupt=how))
        for how in ("manifest_mismatch", "missing_index", "only_pb"):  # damaged after publish
            v = publish(registry, model, tag=666.0, promote=False)
            damage_published(registry, model, v, how)
            force_promote(registry, model, v)
            bad.append(v)
        # each bad version was promoted in turn above; promote each again and wait for the give-up,
        # answering requests all the while from v1
        for n, v in enumerate(bad):
            force_promote(registry, model, v)
            wait_until(lambda v=v: run.manager.load_failure(v)[1], timeout=60, message=f"give up on v{v}")
            reqs = [to_request(model, {"request_id": f"d{n}-{i}", "features": [float(i), 1.0, 2.0, 3.0]})
                    for i in range(8)]
            for req, ans in zip(reqs, predict(settings, model, reqs, timeout_s=60), strict=True):
                assert ans["error"] is None and ans["model_version"] == 1, ans
                np.testing.assert_allclose(ans["outputs"], expected_outputs(req["features"], 100.0), rtol=1e-5)
        assert run.manager.stats.swaps == 1 and set(bad) <= run.manager.stats.failed_versions
        assert not set(bad) & set(run.manager.stats.ready_versions)
        assert _metric("streamlearn_serving_load_failures_total", model) - failures_before >= 2 * len(bad)
        good = publish(registry, model, tag=200.0)  # a good version after all that is swapped in
        wait_until(lambda: run.manager.current().stable.version == good, timeout=30,  # type: ignore[union-attr]
                   message="swap to the good version")
        ans = predict(settings, model, [to_request(model, {"request_id": "after", "features": [1.0] * 4})])[0]
        assert ans["model_version"] == good and ans["error"] is None
    finally:
        run.stop()


def test_canary_rolls_back_when_its_live_error_is_worse(settings: Settings, registry: ModelRegistry) -> None:
    """Score-the-stream mode on labelled web-log events: v1 answers 0 (right: all events are
    'normal'), the canary v2 answers 1 (wrong). The judge must stop routing to v2."""
    model = "canary_web"
    publish(registry, model, tag=0.0, scale=0.0, n_features=64, n_outputs=1, featurizer=WEBLOG_FEATURIZER)
    v2 = publish(registry, model, tag=1.0, scale=0.0, n_features=64, n_outputs=1, featurizer=WEBLOG_FEATURIZER,
                 promote=False)
    run = Running(settings, model, Policy.parse(f"canary:{v2}:0.5"), score_stream="weblog")
    try:
        wait_until(lambda: run.manager.current().canary_state == CANARY_ROUTING, timeout=60, message="canary up")
        with Publisher(settings) as pub:
            for i in range(150):
                pub.publish("weblog", weblog_event(i))
        wait_until(lambda: run.manager.current().canary_state == CANARY_ROLLED_BACK, timeout=60,
                   message="canary rollback")
        assert _metric("streamlearn_serving_canary_rollbacks_total", model) == 1
        assert REGISTRY.get_sample_value("streamlearn_serving_canary_state", {"model": model}) == 2
        read_topic(settings, predictions_topic(settings, model), expect=150, timeout=60)
        cut = _end_offsets(settings, raw_topic(settings, "weblog"))  # everything below was sent before
        with Publisher(settings) as pub:
            for i in range(40):
                pub.publish("weblog", weblog_event(1000 + i))
        values = [p.value for p in read_topic(settings, predictions_topic(settings, model), expect=190, timeout=60)]
        assert len({v["request_id"] for v in values}) == 190 == len(values)
        assert all(v["request_id"] == f"{v['input_topic']}/{v['input_partition']}/{v['input_offset']}"
                   and v["input_topic"] == raw_topic(settings, "weblog") for v in values)
        before = [v["model_version"] for v in values if v["input_offset"] < cut[v["input_partition"]]]
        after = [v["model_version"] for v in values if v["input_offset"] >= cut[v["input_partition"]]]
        assert before.count(v2) >= 30 and before.count(1) >= 30  # both versions answered before the rollback
        assert len(after) == 40 and set(after) == {1}
    finally:
        run.stop()


def _end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=settings.bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic)]
        return {tp.partition: off for tp, off in c.end_offsets(tps).items()}
    finally:
        c.close()


def test_canary_judged_by_labels_arriving_later_on_the_raw_topic(settings: Settings,
                                                                 registry: ModelRegistry) -> None:
    """Requests carry unlabelled web-log events; the labelled events show up later on weblog.raw.
    The join of answers to those labels must roll the worse canary back."""
    import json

    from serving.client import to_request

    model = "canary_late"
    publish(registry, model, tag=0.0, scale=0.0, n_features=64, n_outputs=1, featurizer=WEBLOG_FEATURIZER)
    v2 = publish(registry, model, tag=1.0, scale=0.0, n_features=64, n_outputs=1, featurizer=WEBLOG_FEATURIZER,
                 promote=False)
    run = Running(settings, model, Policy.parse(f"canary:{v2}:0.5"))
    try:
        wait_until(lambda: run.worker.labels is not None, timeout=60, message="label joiner up")
        events = [weblog_event(i, label=None) for i in range(120)]
        reqs = [to_request(model, {"request_id": f"q{i}", "event_json": json.dumps(e)}) for i, e in enumerate(events)]
        answers = predict(settings, model, reqs, timeout_s=90)
        assert all(a["error"] is None for a in answers)
        assert {a["model_version"] for a in answers} == {1, v2}
        assert run.manager.current().canary_state == CANARY_ROUTING  # no labels yet: nothing to judge
        with Publisher(settings) as pub:
            for e in events:
                pub.publish("weblog", dict(e, label="normal"))
        wait_until(lambda: run.manager.current().canary_state == CANARY_ROLLED_BACK, timeout=60,
                   message="rollback from late labels")
        assert run.worker.labels is not None and run.worker.labels.joined >= 60
    finally:
        run.stop()


def test_worker_started_on_a_damaged_promotion_serves_the_previously_promoted_version(
        settings: Settings, registry: ModelRegistry) -> None:
    """A worker that starts after a damaged version was promoted falls back to the last version that
    was promoted before it (never to a rejected one), and moves on once a good one is promoted."""
    model = "dmgstart"
    publish(registry, model, tag=100.0)  # v1, promoted
    rejected = publish(registry, model, tag=300.0, promote=False)  # good but never promoted: must not serve
    damaged = publish(registry, model, tag=666.0, promote=False)
    damage_published(registry, model, damaged, "missing_index")
    force_promote(registry, model, damaged)
    run = Running(settings, model)  # waits until something serves
    try:
        assert run.manager.load_failure(damaged)[1] and run.manager.stats.fallbacks == 1
        assert rejected not in run.manager.stats.ready_versions
        reqs = [to_request(model, {"request_id": f"f{i}", "features": [float(i), 1.0, 2.0, 3.0]}) for i in range(4)]
        for req, ans in zip(reqs, predict(settings, model, reqs, timeout_s=60), strict=True):
            assert ans["error"] is None and ans["model_version"] == 1, ans
            np.testing.assert_allclose(ans["outputs"], expected_outputs(req["features"], 100.0), rtol=1e-5)
        good = publish(registry, model, tag=200.0)
        wait_until(lambda: run.manager.current().stable.version == good, timeout=30,  # type: ignore[union-attr]
                   message="swap to the good version")
    finally:
        run.stop()
