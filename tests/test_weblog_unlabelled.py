"""Web logs without labels: weblog-v2's is_failed label from the log itself, and the web-log model
trained on a real, unlabelled combined log (the shared 10,000-line sample, skipped where absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ingest.weblog import parse_line
from streaming import config
from streaming.features import get_featurizer
from streaming.features.weblog_v2 import OUTCOME_FEATURES
from streaming.store import FeatureStore
from tests.helpers import APACHE_LOGS
from tests.real_fixtures import COMBINED_LOG
from trainer.spec import load_spec
from trainer.synthetic import write_batches
from trainer.worker import Trainer

SHARED_LOG = APACHE_LOGS  # ../shared/data/weblogs/apache_logs from the repo root


def test_weblog_v2_labels_a_real_format_log_without_labels() -> None:
    v1, v2 = get_featurizer("weblog", "weblog-v1"), get_featurizer("weblog")
    assert v2.version == "weblog-v2" and v2.label_names == ["is_bot_or_attack", "is_error", "is_failed"]
    s1, s2 = v1.new_state(), v2.new_state()
    got = []
    for i, line in enumerate(COMBINED_LOG):
        rec = parse_line(line, source="fixture.log", position=i)
        r1, r2 = v1.featurize(rec, s1), v2.featurize(rec, s2)
        assert np.array_equal(r1.x, r2.x)  # the same vector: serving and training agree across versions
        got.append((r2.labels["is_failed"], r2.labels["is_error"], r2.labels["is_bot_or_attack"]))
    assert got == [(0.0, 0.0, None), (0.0, 0.0, None), (1.0, 0.0, None), (1.0, 1.0, None), (0.0, 0.0, None)]


def test_backfilled_lines_carry_the_same_labels_as_live_ones() -> None:
    """A backfill run (`ingest weblog --backfill`, and every generator) goes through featurize_backfill;
    v2 once added `is_failed` only on the live path, so history trained nothing."""
    v2 = get_featurizer("weblog")
    live_state, back_state = v2.new_state(), v2.new_state()
    for i, line in enumerate(COMBINED_LOG):
        rec = parse_line(line, source="fixture.log", position=i)
        live = v2.featurize_event(rec, live_state)
        back = v2.featurize_event(rec, back_state, backfill_run="run-1")
        assert back.labels == live.labels
        assert back.labels["is_failed"] == (1.0 if rec["status"] >= 400 else 0.0)


def test_the_web_log_model_ignores_the_features_that_are_the_answer() -> None:
    spec = load_spec("weblog_classifier")
    assert spec.label == "is_failed" and spec.featurizer_version == "weblog-v2" and spec.balance_classes
    import keras  # noqa: F401  (the spec builds a Keras model)

    from trainer.specs import guard

    features = spec.features()
    model = spec.build(features, spec.seed)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 3, size=(50, features.n_features)).astype(np.float32)
    assert spec.adapt is not None
    spec.adapt(model, x)
    names = get_featurizer("weblog").feature_names
    assert {names[i] for i in guard.ignored_features(model)} == set(OUTCOME_FEATURES)


@pytest.mark.skipif(not SHARED_LOG.is_file(), reason=f"shared real log {SHARED_LOG} is absent on this machine")
def test_the_shared_real_log_trains_a_version_that_beats_the_class_prior(tmp_path: Path) -> None:
    train_on_real_log(SHARED_LOG, tmp_path)


def train_on_real_log(log: Path, tmp_path: Path) -> None:
    with log.open("rb") as fh:
        records = [parse_line(line, source="apache_logs", position=i) for i, line in enumerate(fh)]
    assert len(records) == 10_000 and all(r["label"] is None for r in records)
    settings = config.load({"home": tmp_path}, environ={})
    store = FeatureStore(settings.feature_store)
    write_batches(store, "weblog", records, batch_size=1000, topic="weblog.raw")
    spec = load_spec("weblog_classifier")
    outcome = Trainer(settings, spec, events=False).run_once("test")
    scores = outcome.metadata["scores"]
    print(f"apache_logs: balanced accuracy {scores['candidate']:.4f} vs class prior {scores['baseline']:.4f} "
          f"on {scores['eval_rows']} held-out rows ({outcome.decision.action})")
    assert scores["eval_rows"] >= 2000  # max(N=200, 20% of 10,000 new rows)
    assert scores["baseline"] == 0.5 and scores["baseline_name"].startswith("class prior")
    assert outcome.decision.promote, outcome.decision.reason
    assert scores["candidate"] > scores["baseline"] + scores["margin_vs_baseline"]
