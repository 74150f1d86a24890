"""The demo report tells the truth: cold starts apart from latency, seconds throughout, every version plotted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import pytest

from streaming.topics import MODELS
from streamlearn.observe import version_scores
from streamlearn.plots import render_plots
from streamlearn.report import latency_split, summary_lines


def synthetic_observations() -> dict[str, Any]:
    """A 60 s run: requests queue for 20 s until each model first answers at t=20 s."""
    models = list(MODELS)
    preds: list[list[Any]] = []
    for i in range(40):  # queued requests sent at 0..19 s, all answered at ~20 s
        preds.append([20.0 + i * 0.01, models[0], 1, 20.0 - i * 0.5 + 0.01, False])
    for i in range(400):  # steady traffic afterwards: 10 ms each
        preds.append([21.0 + i * 0.09, models[0], 1 if i < 200 else 2, 0.010, False])
    versions = {models[0]: [
        {"version": 1, "decision": "PROMOTED", "metric": "accuracy", "direction": "max", "candidate": 0.8,
         "current": None, "baseline": 0.5, "created_s": 19.0},
        {"version": 2, "decision": "REJECTED", "metric": "accuracy", "direction": "max", "candidate": 0.7,
         "current": 0.82, "baseline": 0.5, "created_s": 40.0}],
        models[1]: [{"version": v, "decision": "PROMOTED", "metric": "mae", "direction": "min",
                     "candidate": 2.0 / v, "current": None if v == 1 else 2.0 / (v - 1), "created_s": 10.0 * v}
                    for v in (1, 2, 3)],
        models[2]: []}
    samples = [{"t_s": float(t), "end_offsets": {"raw.weblog": 100 * t, f"predictions.{models[0]}":
                                                 0 if t < 20 else 11 * (t - 20)}} for t in range(0, 62, 2)]
    return {"started_unix_s": 1_800_000_000.0, "traffic_stopped_s": 55.0, "ended_s": 61.0,
            "raw_topics": {"weblog": "raw.weblog"},
            "prediction_topics": {m: f"predictions.{m}" for m in models},
            "samples": samples, "predictions": preds, "first_answer_s": {models[0]: 20.0},
            "swaps": [[39.0, models[0], 2]], "versions": versions, "restarts": []}


def test_latency_counts_only_requests_sent_after_the_first_answer() -> None:
    steady, cold = latency_split(synthetic_observations(), list(MODELS)[0])
    assert len(cold) == 40 and len(steady) == 400
    assert max(steady) == pytest.approx(0.010)
    assert max(cold) > 19


def test_version_scores_reads_current_and_optional_baseline_defensively() -> None:
    meta = {"gate": {"action": "REJECTED", "candidate_score": 0.7, "current_score": 0.8, "primary_metric": "acc"},
            "scores": {"metric": "acc", "candidate": 0.7, "current": 0.8, "baseline": {"score": 0.5}},
            "direction": "max", "created_at": 1_800_000_000_000}
    s = version_scores(meta)
    assert (s["candidate"], s["current"], s["baseline"], s["decision"], s["direction"]) == (0.7, 0.8, 0.5,
                                                                                           "REJECTED", "max")
    assert version_scores({})["candidate"] is None and version_scores({"gate": None})["decision"] is None


def test_plots_are_drawn_for_every_model_and_version(tmp_path: Path) -> None:
    paths = render_plots(synthetic_observations(), tmp_path)
    for p in paths:
        img = mpimg.imread(p)
        assert img.shape[0] > 300 and img.shape[1] > 800, p


def test_summary_lines_are_short_and_name_cold_start() -> None:
    m0 = list(MODELS)[0]
    summary = {"duration_s": 61.0, "events_on_topics": {"weblog": 6000}, "dead_letters": {"weblog": 3},
               "batches": {"weblog": 12}, "duplicated_predictions": 0, "worker_restarts": 1,
               "plots": ["scores.png"],
               "models": {m0: {"promoted_version": 1, "versions": [1, 2], "first_answer_s": 20.0,
                               "scores": synthetic_observations()["versions"][m0],
                               "latency_after_first_answer_s": {"p50": 0.01, "p99": 0.02},
                               "cold_start_wait_s": {"requests": 40}}}}
    lines = summary_lines(summary, Path("reports/x"))
    assert len(lines) == 3
    assert "6,000 events" in lines[0] and "1 worker restarts" in lines[0]
    assert "serving v1 (2 versions kept, v1-v2)" in lines[1] and "accuracy↑ 0.8 (baseline 0.5)" in lines[1]
    assert "p50 10 ms" in lines[1] and "first answer at 20.0 s, 40 requests queued before it" in lines[1]
    json.dumps(summary)


def test_summary_names_the_kept_range_after_retention() -> None:
    """Retention deletes old versions: the newest served version is above the count kept, and the
    line must not read as "v19 of 15 versions"."""
    m0 = list(MODELS)[0]
    summary = {"duration_s": 1.0, "events_on_topics": {}, "dead_letters": {}, "batches": {},
               "duplicated_predictions": 0, "worker_restarts": 0, "plots": [],
               "models": {m0: {"promoted_version": 19, "versions": list(range(5, 20)), "first_answer_s": None,
                               "scores": [], "latency_after_first_answer_s": {"p50": None, "p99": None},
                               "cold_start_wait_s": {"requests": 0}}}}
    line = summary_lines(summary)[1]
    assert "serving v19 (15 versions kept, v5-v19)" in line, line
    summary["models"][m0]["versions"] = []
    summary["models"][m0]["promoted_version"] = None
    assert "serving v- (no versions kept)" in summary_lines(summary)[1]


def test_live_window_leaves_out_requests_queued_before_the_first_answer() -> None:
    import time

    from streamlearn.observe import PredictionLog

    log = PredictionLog()
    now = time.time()
    log.add("m", "queued", 1, 60_000.0, False, produced_at=now - 5)  # sent 65 s ago, before any model
    log.add("m", "steady", 1, 12.0, False, produced_at=now - 1)
    assert [r[3] for r in log.window(10)] == [60_000.0, 12.0]
    assert [r[3] for r in log.window(10, steady=True)] == [12.0]
    assert log.first_answers() == {"m": now - 5}
