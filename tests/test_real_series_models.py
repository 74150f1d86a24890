"""Irregular real-like series through the current sensor featurizer (sensor-v3: v2's cadence-free
features plus median levels) and the sensor forecaster: decades-old weekly data with gaps and NaNs,
a yearly series from 1700, and a serving probe that varies a feature constant in training.

The records are fed to the featurizer directly (ingest's event-time policy is tested elsewhere).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from streaming import config
from streaming.exceptions import FeatureValidationError
from streaming.features import get_featurizer
from streaming.features.base import MIN_EVENT_TIME_MS
from streaming.model_registry import ModelRegistry
from streaming.store import FeatureStore, read_batch
from tests.real_fixtures import weekly_series, yearly_series
from trainer.model_io import SavedModelPredictor
from trainer.spec import load_spec
from trainer.specs import guard
from trainer.synthetic import write_batches
from trainer.worker import Trainer


def _clean(records: list[dict]) -> tuple[list[dict], list[str]]:
    """Featurize once to split valid readings from the ones a stream worker would dead-letter."""
    fz = get_featurizer("sensor")
    state = fz.new_state()
    ok, reasons = [], []
    for r in records:
        try:
            fz.featurize(r, state)
            ok.append(r)
        except FeatureValidationError as exc:
            reasons.append(str(exc))
    return ok, reasons


def test_sensor_v2_features_are_in_range_from_sub_second_to_yearly() -> None:
    fz = get_featurizer("sensor")
    assert fz.version == "sensor-v3" and fz.n_features == len(fz.feature_names) == 22  # v2 + median features
    idx = {n: i for i, n in enumerate(fz.feature_names)}
    for step_ms, years_back in ((10, 0), (86_400_000 * 7, 50), (31_556_952_000, 320)):
        state = fz.new_state()
        t0 = 1_600_000_000_000 - years_back * 31_556_952_000
        rows = [fz.featurize({"sensor_id": "s", "timestamp": t0 + i * step_ms, "value": 5.0 + (i % 3),
                              "values": {}, "label": None}, state) for i in range(40)]
        x = np.stack([r.x for r in rows[2:]])
        assert np.all(np.isfinite(x)) and np.all(np.abs(x) < 50), (step_ms, np.abs(x).max(axis=0))
        assert np.allclose(x[:, idx["log_gap_s"]], np.log(step_ms / 1000.0), atol=1e-4)
        assert np.allclose(x[:, idx["gap_vs_typical"]], 0.0, atol=1e-6)  # a regular cadence
    # sub-second cadences stay apart (log1p squashed them), a missing week stands out
    assert np.log(0.01) < np.log(0.1) - 2
    state = fz.new_state()
    week = 7 * 86_400_000
    times = [i * week for i in range(10)] + [11 * week]  # 1970: epoch ms around 0, then a skipped week
    rows = [fz.featurize({"sensor_id": "w", "timestamp": t, "value": 1.0 * i, "values": {}, "label": None}, state)
            for i, t in enumerate(times)]
    gap = fz.featurize_for_prediction({"sensor_id": "w", "timestamp": 12 * week, "value": 12.0, "values": {},
                                       "label": None}, state)
    assert rows[-1].x[idx["gap_vs_typical"]] == 0.0  # the row of t-1 still had the usual gap
    assert gap.x[idx["gap_vs_typical"]] == 0.0
    last = fz.featurize_for_prediction({"sensor_id": "w", "timestamp": 14 * week, "value": 13.0, "values": {},
                                        "label": None}, state)
    assert last.x[idx["gap_vs_typical"]] == pytest.approx(np.log(2.0), abs=1e-5)


def test_history_before_1678_and_nan_are_rejected_with_their_reason() -> None:
    fz = get_featurizer("sensor")
    with pytest.raises(FeatureValidationError, match="1678-01-01"):
        fz.featurize({"sensor_id": "s", "timestamp": -9_300_000_000_000, "value": 1.0, "values": {}}, fz.new_state())
    with pytest.raises(FeatureValidationError, match="NaN"):
        fz.featurize({"sensor_id": "s", "timestamp": -5_000_000_000_000, "value": float("nan"), "values": {}},
                     fz.new_state())
    assert get_featurizer("sensor", "sensor-v1").min_event_time_ms == MIN_EVENT_TIME_MS  # one floor for every version


def test_weekly_series_from_decades_ago_trains_beats_persistence_and_is_robust(tmp_path: Path) -> None:
    records, reasons = _clean(weekly_series())
    assert reasons and all("NaN" in r for r in reasons)  # the nan readings, and only they
    settings = config.load({"home": tmp_path}, environ={})
    store = FeatureStore(settings.feature_store)
    write_batches(store, "sensor", records, batch_size=200, topic="sensor.raw")
    spec = load_spec("sensor_forecaster")  # the built-in spec as a user gets it
    trainer = Trainer(settings, spec, events=False)
    outcome = trainer.run_once("test")
    meta = outcome.metadata
    scores = meta["scores"]
    assert scores["eval_rows"] >= spec.min_holdout_rows and scores["baseline_name"] == "persistence (last value)"
    assert scores["metric"] == "mae" and scores["better"] == "lower"
    ratio = scores["candidate"] / scores["baseline"]
    print(f"weekly series: MAE {scores['candidate']:.4f} / persistence {scores['baseline']:.4f} = {ratio:.3f} "
          f"on {scores['eval_rows']} held-out rows")
    assert ratio <= 0.8, f"MAE {scores['candidate']:.4f} vs persistence {scores['baseline']:.4f} on the holdout"
    assert outcome.decision.promote and meta["input_range"]["min"] and len(meta["input_range"]["max"]) == 22

    # the serving probe: every training row was read at 00:00, so hour_sin/hour_cos were constant
    version_dir = ModelRegistry(settings.model_dir).version_dir("sensor_forecaster", outcome.version)
    predictor = SavedModelPredictor(version_dir)
    fz = get_featurizer("sensor")
    idx = {n: i for i, n in enumerate(fz.feature_names)}
    batch = read_batch(store.batches("sensor")[-1].path)
    assert np.ptp(batch["x"][:, idx["hour_sin"]]) == 0.0
    row = batch["x"][-1:].copy()
    base = predictor.predict(row)[0, 0]
    moved = []
    for hour in (1, 6, 12):
        probe = row.copy()
        probe[0, idx["hour_sin"]] = np.sin(2 * np.pi * hour / 24)
        probe[0, idx["hour_cos"]] = np.cos(2 * np.pi * hour / 24)
        moved.append(abs(float(predictor.predict(probe)[0, 0]) - float(base)))
    assert max(moved) <= 1e-4, moved  # was 32,192 units at 01:00 with the old scaling
    # a raw event at another hour: the forecast stays near the series, not at 1.4 million
    state = fz.new_state()
    for r in records[-20:]:
        fz.featurize_for_prediction(r, state)
    odd = dict(records[-1], timestamp=records[-1]["timestamp"] + 7 * 86_400_000 + 3_600_000 * 5, value=371.5)
    x = fz.featurize_for_prediction(odd, state).x[None, :]
    forecast = fz.forecast(371.5, float(predictor.predict(x)[0, 0]))
    assert abs(forecast - 371.5) < 5.0, forecast


def test_yearly_series_from_1700_trains_and_the_guard_ignores_its_constant_features(tmp_path: Path) -> None:
    records, reasons = _clean(yearly_series())
    assert not reasons and len(records) == 321
    settings = config.load({"home": tmp_path}, environ={})
    store = FeatureStore(settings.feature_store)
    write_batches(store, "sensor", records, batch_size=40, topic="sensor.raw")
    # a yearly series is short: 321 readings; hold out 80 of them (N is a per-spec setting)
    spec = dataclasses.replace(load_spec("sensor_forecaster"), min_holdout_rows=80, epochs=60, batch_size=32)
    outcome = Trainer(settings, spec, events=False).run_once("test")
    scores = outcome.metadata["scores"]
    assert scores["eval_rows"] >= 80 and scores["candidate"] < scores["baseline"]
    print(f"yearly series: MAE {scores['candidate']:.4f} / persistence {scores['baseline']:.4f} = "
          f"{scores['candidate'] / scores['baseline']:.3f} on {scores['eval_rows']} held-out rows")
    assert outcome.decision.promote, outcome.decision.reason
    from trainer.model_io import load_weights

    model = spec.build(spec.features(), spec.seed)
    version_dir = ModelRegistry(settings.model_dir).version_dir("sensor_forecaster", outcome.version)
    assert load_weights(model, version_dir / "keras" / "weights.npz")
    names = get_featurizer("sensor").feature_names
    ignored = {names[i] for i in guard.ignored_features(model)}
    # every reading at 00:00 on 1 January (+- the calendar's drift against the mean year for doy)
    assert {"hour_sin", "hour_cos"} <= ignored and "value" not in ignored
