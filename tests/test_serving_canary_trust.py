"""The canary is judged only by labels from the raw topic ingest produced, never by a request's own label."""

from __future__ import annotations

import json

from serving.client import predict, to_request
from serving.policy import Policy
from serving.versions import CANARY_ROLLED_BACK, CANARY_ROUTING
from streaming.config import Settings
from streaming.model_registry import ModelRegistry
from streaming.producer import Publisher
from tests.helpers import wait_until
from tests.serving_helpers import WEBLOG_FEATURIZER, Running, publish, weblog_event


def test_labels_in_requests_and_forged_raw_events_never_judge_the_canary(settings: Settings) -> None:
    """v1 answers 0 (right: every event is 'normal'), the canary v2 answers 1 (wrong)."""
    registry = ModelRegistry(settings.model_dir)
    model = "canary_trust"
    publish(registry, model, tag=0.0, scale=0.0, n_features=64, n_outputs=1, featurizer=WEBLOG_FEATURIZER)
    v2 = publish(registry, model, tag=1.0, scale=0.0, n_features=64, n_outputs=1, featurizer=WEBLOG_FEATURIZER,
                 promote=False)
    run = Running(settings, model, Policy.parse(f"canary:{v2}:0.5"))
    try:
        wait_until(lambda: run.worker.labels is not None, timeout=60, message="label joiner up")
        # 1. Requests carrying their own label: the old worker judged these at once and rolled back.
        events = [weblog_event(i, label="normal") for i in range(120)]
        reqs = [to_request(model, {"request_id": f"q{i}", "event_json": json.dumps(e)}) for i, e in enumerate(events)]
        answers = predict(settings, model, reqs, timeout_s=90)
        assert {a["model_version"] for a in answers} == {1, v2}
        assert run.manager.current().canary_state == CANARY_ROUTING
        # 2. Labelled raw events with the requested event ids but other content: not the answered events.
        with Publisher(settings) as pub:
            for e in events:
                pub.publish("weblog", dict(e, path="/forged", label="normal"))
        labels = run.worker.labels
        assert labels is not None
        wait_until(lambda: labels.seen >= len(events), timeout=60, message="forged raw events read")
        assert labels.joined == 0 and run.manager.current().canary_state == CANARY_ROUTING
        # 3. Positive control: the very events, labelled on the raw topic, do judge (and roll back) v2.
        with Publisher(settings) as pub:
            for e in events:
                pub.publish("weblog", e)
        wait_until(lambda: run.manager.current().canary_state == CANARY_ROLLED_BACK, timeout=60,
                   message="rollback from raw-topic labels")
        assert labels.joined >= 40
    finally:
        run.stop()
