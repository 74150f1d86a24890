"""Learning quality of the retraining loop, against online baselines measured on the same stream.

Digits: the 1,797 scikit-learn digits in their natural order are rendered to PNGs
(``ingest.generators.digits``), featurized by the image featurizer (``image-v1``) and written as
feature-store batches of 100 rows. After each new batch the trainer retrains ``digits_cnn``
(warm start, reservoir, gate), so every version is scored prequentially on the next batch, which
it has never seen. The figure is the accuracy of the *served* model (the promoted one) on each new
batch. In the same run, River's online models see exactly the same feature vectors one by one
(test-then-train): ``StandardScaler | OneVsRest(LogisticRegression)`` and a Hoeffding tree. Goal:
the CNN's ending accuracy (mean over the last 5 batches) is >= the best River model's on the same
batches.

Sensor: ``ingest.sensors.generate`` readings, featurized by ``sensor-v1`` into batches of 500;
``sensor_forecaster`` retrains after each batch; its MAE on the next batch (forecast of
``next_value_delta``) is compared with persistence (predict the last value, i.e. a delta of 0) on
the same rows. Goal: MAE <= 0.8x persistence (mean over the last 3 batches).

Writes ``reports/bench/learning.json`` and ``reports/bench/learning.png``; prints the JSON.

    python -m benchmarks.bench_learning
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPORT_DIR, machine, write_report
from streaming import config
from streaming.config import Settings
from streaming.store import FeatureStore, read_batch

DIGITS_BATCH = 100
SENSOR_BATCH = 500
SENSOR_READINGS = 6000
END_BATCHES = 5


def _river_models() -> dict[str, Any]:
    from river import linear_model, multiclass, preprocessing, tree

    return {
        "river_scaler_ovr_logreg": preprocessing.StandardScaler()
        | multiclass.OneVsRestClassifier(linear_model.LogisticRegression()),
        "river_hoeffding_tree": tree.HoeffdingTreeClassifier(grace_period=50),
    }


def _river_prequential(batches: list[dict[str, np.ndarray]]) -> dict[str, list[float]]:
    """Per-batch test-then-train accuracy of each River model (row by row, batch order)."""
    scores: dict[str, list[float]] = {}
    for name, model in _river_models().items():
        per_batch = []
        for arrays in batches:
            hits = 0
            for x, y in zip(arrays["x"], arrays["digit"], strict=True):
                features = {i: float(v) for i, v in enumerate(x)}
                hits += int(model.predict_one(features) == int(y))
                model.learn_one(features, int(y))
            per_batch.append(hits / len(arrays["x"]))
        scores[name] = per_batch
    return scores


def _run_loop(settings: Settings, spec: Any, batches: list[Any]) -> list[dict[str, Any]]:
    """Reveal batches one at a time; retrain after each; record every version's gate scores."""
    from streaming.model_registry import ModelRegistry
    from trainer.worker import Trainer

    trainer = Trainer(settings, spec, namespace="bench", events=False, keep_last=100)
    registry = ModelRegistry(settings.model_dir)
    visible_dir = settings.feature_store / "bench" / spec.featurizer_kind
    hidden = [(b.path, b.path.with_suffix(".json")) for b in batches]
    # The store lists a batch iff its .avro exists: move all aside, then reveal one per step.
    parked = Path(tempfile.mkdtemp(prefix="parked-", dir=settings.home))
    for avro, manifest in hidden:
        avro.rename(parked / avro.name)
        manifest.rename(parked / manifest.name)
    rows: list[dict[str, Any]] = []
    for i, (avro, manifest) in enumerate(hidden):
        (parked / manifest.name).rename(visible_dir / manifest.name)
        (parked / avro.name).rename(visible_dir / avro.name)
        if i == 0:
            continue
        started = time.perf_counter()
        outcome = trainer.run_once("bench")
        gate = outcome.decision
        served = gate.candidate_score if gate.promote else gate.current_score
        rows.append({"version": outcome.version, "eval_batch": i, "action": gate.action,
                     "candidate": gate.candidate_score, "current": gate.current_score, "served": served,
                     "promoted": registry.promoted(spec.name), "seconds": round(time.perf_counter() - started, 2)})
    return rows


def bench_digits(settings: Settings) -> dict[str, Any]:
    from ingest.generators import digits
    from trainer.spec import load_spec
    from trainer.synthetic import write_batches

    store = FeatureStore(settings.feature_store)
    batches = write_batches(store, "image", digits(), batch_size=DIGITS_BATCH, topic="bench.image",
                            namespace="bench")
    arrays = [read_batch(b.path) for b in batches]
    river = _river_prequential(arrays)
    rows = _run_loop(settings, load_spec("digits_cnn", settings), batches)
    served = [r["served"] for r in rows]  # accuracy on batches 1..N-1
    end = slice(len(served) - END_BATCHES, len(served))
    river_eval = {k: v[1:] for k, v in river.items()}  # the same batches the CNN versions were scored on
    cnn_end = float(np.mean(served[end]))
    river_end = {k: float(np.mean(v[end])) for k, v in river_eval.items()}
    best = max(river_end, key=lambda k: river_end[k])
    return {
        "batches": len(batches), "rows": int(sum(len(a["x"]) for a in arrays)), "batch_size": DIGITS_BATCH,
        "versions": rows,
        "cnn_served_accuracy_per_batch": served,
        "river_accuracy_per_batch": river_eval,
        "river_cumulative_accuracy": {k: float(np.average(v, weights=[len(a["x"]) for a in arrays]))
                                      for k, v in river.items()},
        "cnn_cumulative_accuracy": float(np.average(served, weights=[len(a["x"]) for a in arrays[1:]])),
        "ending_window_batches": END_BATCHES,
        "cnn_ending_accuracy": cnn_end,
        "river_ending_accuracy": river_end,
        "best_river_model": best,
        "cnn_vs_best_river_ratio": cnn_end / river_end[best] if river_end[best] else None,
        "cnn_vs_best_river_goal": ">= 1.0",
        "goal_met": cnn_end >= river_end[best],
    }


def bench_sensor(settings: Settings) -> dict[str, Any]:
    from ingest.sensors import generate
    from trainer.spec import load_spec
    from trainer.synthetic import write_batches

    store = FeatureStore(settings.feature_store)
    batches = write_batches(store, "sensor", generate(SENSOR_READINGS, n_sensors=10, seed=11),
                            batch_size=SENSOR_BATCH, topic="bench.sensor", namespace="bench")
    persistence = []
    for b in batches:
        delta = read_batch(b.path)["next_value_delta"]
        persistence.append(float(np.nanmean(np.abs(delta))))  # forecast delta 0 = the last value
    rows = _run_loop(settings, load_spec("sensor_forecaster", settings), batches)
    for r in rows:
        r["persistence_mae"] = persistence[r["eval_batch"]]
        r["served_vs_persistence"] = r["served"] / r["persistence_mae"] if r["served"] is not None else None
    ratios = [r["served_vs_persistence"] for r in rows]
    end_ratio = float(np.mean(ratios[-3:]))
    return {
        "generator": f"ingest.sensors.generate(n={SENSOR_READINGS}, n_sensors=10, seed=11)",
        "batches": len(batches), "batch_size": SENSOR_BATCH, "versions": rows,
        "served_mae_per_batch": [r["served"] for r in rows],
        "persistence_mae_per_batch": [r["persistence_mae"] for r in rows],
        "ending_mae_vs_persistence_ratio": end_ratio,
        "ending_mae_vs_persistence_goal": "<= 0.8",
        "goal_met": end_ratio <= 0.8,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    d = result["digits"]
    x = [r["eval_batch"] for r in d["versions"]]
    ax1.plot(x, d["cnn_served_accuracy_per_batch"], "o-", label="digits_cnn (served version)")
    ax1.plot(x, [r["candidate"] for r in d["versions"]], "x", alpha=0.6, label="digits_cnn candidate")
    for name, scores in d["river_accuracy_per_batch"].items():
        ax1.plot(x, scores, ".--", label=name)
    ax1.set_xlabel("batch scored (each version on the next, unseen batch)")
    ax1.set_ylabel("prequential accuracy")
    ax1.set_title(f"sklearn digits, batches of {d['batch_size']}")
    ax1.legend(fontsize=8)
    s = result["sensor"]
    xs = [r["eval_batch"] for r in s["versions"]]
    ax2.plot(xs, s["served_mae_per_batch"], "o-", label="sensor_forecaster (served)")
    ax2.plot(xs, s["persistence_mae_per_batch"], "s--", label="persistence (last value)")
    ax2.set_xlabel("batch scored")
    ax2.set_ylabel("MAE of the next value")
    ax2.set_title(f"sensor stream, batches of {s['batch_size']}")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(settings: Settings) -> dict[str, Any]:
    """Both learning benchmarks on ``settings``' feature store and model dir (no Kafka needed)."""
    from trainer.training import configure_tensorflow

    configure_tensorflow()
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "learning", "machine": machine()}
    result["digits"] = bench_digits(settings)
    result["sensor"] = bench_sensor(settings)
    result["seconds"] = round(time.perf_counter() - started, 1)
    dg = result["digits"]
    result["table"] = [
        {"figure": "digits_cnn ending accuracy / best River", "value": round(dg["cnn_ending_accuracy"], 4),
         "baseline": f"{dg['best_river_model']} {dg['river_ending_accuracy'][dg['best_river_model']]:.4f}",
         "ratio": round(dg["cnn_vs_best_river_ratio"], 3), "goal": ">= 1.0"},
        {"figure": "sensor_forecaster MAE / persistence", "value": None, "baseline": "persistence, same rows",
         "ratio": round(result["sensor"]["ending_mae_vs_persistence_ratio"], 3), "goal": "<= 0.8"},
    ]
    png = REPORT_DIR / "learning.png"
    plot(result, png)
    result["plot"] = str(png)
    write_report("learning", result)
    return result


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="streamlearn-bench-learning-"))
    settings = config.load({"home": home, "metrics_port": -1})
    print(json.dumps(run(settings), indent=2, default=str))


if __name__ == "__main__":
    main()
