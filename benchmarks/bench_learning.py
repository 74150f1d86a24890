"""Learning quality of the retraining loop, measured test-then-train, against River and the baselines.

Honest protocol (the same for every stream): batches arrive one at a time. **Before** batch ``i`` is
revealed to the trainer, the version that is serving at that moment (the promoted one) scores it;
then the batch is revealed and the trainer runs once (train, gate, maybe promote; it may also
decline with "not enough data" when the gate's holdout of max(N rows, 20% of new rows) is not
there yet). No score is ever chosen on the batch it is reported for. In the same run:

* **River** online models see exactly the same feature vectors row by row, test-then-train (each
  row predicted, then learnt), and are scored per batch with the spec's own metric; the best of
  them per stream is the comparison;
* the **baseline** scores each batch knowing only the batches before it: the class prior
  (majority class) for classifiers, persistence (no change from the last value) for the forecaster.

Streams: the 1,797 scikit-learn digits (``digits_cnn``, accuracy), a generated sensor stream
(``ingest.sensors.generate``, ``sensor_forecaster``, MAE of the next value), and the real
10,000-line Apache log sample (``weblog_classifier``: will the request fail, balanced accuracy)
where ``../shared/data/weblogs/apache_logs`` (or ``--weblog PATH``) exists.

Figures (over the batches our loop served, i.e. from the first promoted version on, row-weighted):
``vs_best_river`` = ours / best River for higher-is-better metrics and best River / ours for MAE
(goal >= 1.0), ``vs_baseline`` likewise (goal > 1.0).

Writes ``reports/bench/learning.json`` and ``reports/bench/learning.png``; prints the JSON.

    python -m benchmarks.bench_learning [--weblog PATH] [--jobs N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPORT_DIR, machine, write_report
from streaming import config
from streaming.config import Settings
from streaming.store import BatchInfo, FeatureStore, read_batch
from streaming.store_index import append as index_append

DIGITS_BATCH = 100
SENSOR_BATCH = 500
SENSOR_READINGS = 6000
WEBLOG_BATCH = 1000
WEBLOG_DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "weblogs" / "apache_logs"


def _river_models(task: str, n_classes: int) -> dict[str, Any]:
    from river import linear_model, multiclass, naive_bayes, optim, preprocessing, tree

    if task == "regression":
        return {
            # SGD(0.005): River's default step (0.01) diverged on the sensor stream's anomaly spikes
            "river_scaler_linreg": preprocessing.StandardScaler()
            | linear_model.LinearRegression(optimizer=optim.SGD(0.005)),
            "river_hoeffding_tree_reg": preprocessing.StandardScaler() | tree.HoeffdingTreeRegressor(grace_period=50),
        }
    logreg = (linear_model.LogisticRegression() if n_classes == 2
              else multiclass.OneVsRestClassifier(linear_model.LogisticRegression()))
    return {
        "river_scaler_logreg": preprocessing.StandardScaler() | logreg,
        "river_hoeffding_tree": tree.HoeffdingTreeClassifier(grace_period=50),
        "river_gaussian_nb": naive_bayes.GaussianNB(),
    }


def _river_outputs(spec: Any, model: Any, x: np.ndarray, y: np.ndarray, cols: list[int]) -> np.ndarray:
    """Row by row: predict (in the spec's output format), then learn. Returns the predictions."""
    k = len(spec.output_names)
    out = np.zeros((len(x), k), dtype=np.float32)
    for i in range(len(x)):
        feats = {j: float(x[i, j]) for j in cols}
        if spec.task == "classification":
            target = int(np.argmax(y[i]))
            pred = model.predict_one(feats)
            out[i, int(pred) if pred is not None else 0] = 1.0
            model.learn_one(feats, target)
        else:
            pred = model.predict_one(feats)
            out[i, 0] = float(pred) if pred is not None and np.isfinite(pred) else 0.0
            model.learn_one(feats, float(y[i, 0]))
    return out


def _local(path: Path | str) -> Path:
    """A local path: the benchmark parks and reveals batch files, which needs a local feature store."""
    if not isinstance(path, Path):
        raise SystemExit(f"bench_learning needs a local feature store; got {path!r}")
    return path


def _loop(settings: Settings, spec: Any, batches: list[BatchInfo], river_cols: list[int]) -> dict[str, Any]:
    """Test-then-train over ``batches``: served version, River models and baseline, per batch."""
    from streaming.model_registry import ModelRegistry
    from trainer.data import labelled
    from trainer.exceptions import NotEnoughDataError
    from trainer.gate import baseline_outputs
    from trainer.model_io import SavedModelPredictor
    from trainer.worker import Trainer

    trainer = Trainer(settings, spec, namespace="bench", events=False, keep_last=1000)
    registry = ModelRegistry(settings.model_dir)
    visible = _local(settings.feature_store) / "bench" / spec.featurizer_kind
    parked = Path(tempfile.mkdtemp(prefix="parked-", dir=settings.home))
    paths = {b.batch_id: _local(b.path) for b in batches}
    for b in batches:  # the store lists a batch iff its .avro exists: park all, reveal one per step
        # The store's index journal (streaming/store_index.py) is told like a writer/deleter would:
        # "del" before the files go, "add" after they are back (_reveal). Without it a revealed batch
        # reached the trainer only when the index's background scan found it, after newer ones, and
        # the cursor had passed it: batch 1 of every stream was never trained on.
        index_append(visible, "del", b.batch_id)
        path = paths[b.batch_id]
        path.rename(parked / path.name)
        path.with_suffix(".json").rename(parked / path.with_suffix(".json").name)
    n_classes = len(spec.class_names or [])
    river = _river_models(spec.task, n_classes)
    seen_y: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    predictors: dict[int, Any] = {}
    for i, b in enumerate(batches):
        path = paths[b.batch_id]
        arrays = read_batch(parked / path.name)
        columns = {name: arrays[name] if name in arrays else np.full(len(arrays["x"]), np.nan)
                   for name in (spec.label, *spec.aux_labels)}
        x, y = labelled(spec, arrays["x"], columns)
        served = registry.promoted(spec.name)
        row: dict[str, Any] = {"batch": i, "rows": int(len(y)), "served_version": served}
        if served is not None and len(y):
            if served not in predictors:
                predictors[served] = SavedModelPredictor(registry.version_dir(spec.name, served))
            row["ours"] = float(spec.score(y, predictors[served].predict(x)))
        if seen_y and len(y):
            base = baseline_outputs(spec, np.concatenate(seen_y), len(y), len(spec.output_names))
            row["baseline"] = float(spec.score(y, base))
        row["river"] = {name: float(spec.score(y, _river_outputs(spec, m, x, y, river_cols))) if len(y) else None
                        for name, m in river.items()}
        seen_y.append(y)
        (parked / path.with_suffix(".json").name).rename(visible / path.with_suffix(".json").name)
        (parked / path.name).rename(visible / path.name)
        index_append(visible, "add", b.batch_id, b.manifest)
        started = time.perf_counter()
        try:
            outcome = trainer.run_once("bench")
            row["trained"] = {"version": outcome.version, "action": outcome.decision.action,
                              "eval_rows": outcome.decision.eval_rows}
        except NotEnoughDataError:
            row["trained"] = None
        row["train_seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
    return _summary(spec, rows, list(river))


def _summary(spec: Any, rows: list[dict[str, Any]], river_names: list[str]) -> dict[str, Any]:
    scored = [r for r in rows if "ours" in r and "baseline" in r]
    weights = np.asarray([r["rows"] for r in scored], dtype=np.float64)

    def mean(values: list[float]) -> float:
        return float(np.average(values, weights=weights)) if len(values) else float("nan")

    ours = mean([r["ours"] for r in scored])
    base = mean([r["baseline"] for r in scored])
    river = {n: mean([r["river"][n] for r in scored]) for n in river_names}
    higher = spec.direction == "max"
    best = (max if higher else min)(river, key=lambda n: river[n])

    def ratio(a: float, b: float) -> float | None:
        if not (np.isfinite(a) and np.isfinite(b)) or (b if higher else a) == 0:
            return None
        return a / b if higher else b / a

    vs_river, vs_base = ratio(ours, river[best]), ratio(ours, base)
    return {
        "model": spec.name, "metric": spec.primary_metric, "better": "higher" if higher else "lower",
        "batches": len(rows), "scored_batches": len(scored), "scored_rows": int(weights.sum()),
        "first_scored_batch": scored[0]["batch"] if scored else None,
        "versions": sum(1 for r in rows if r.get("trained")),
        "promotions": sum(1 for r in rows if (r.get("trained") or {}).get("action") == "PROMOTED"),
        "ours": ours, "baseline": base, "baseline_name": spec.baseline_kind(), "river": river,
        "best_river_model": best, "vs_best_river": vs_river, "vs_best_river_goal": ">= 1.0",
        "vs_baseline": vs_base, "vs_baseline_goal": "> 1.0",
        "goal_met": bool(vs_river is not None and vs_base is not None and vs_river >= 1.0 and vs_base > 1.0),
        "per_batch": rows,
    }


def _load_spec(name: str, settings: Settings, seed: int | None) -> Any:
    """The spec, with its training seed replaced when ``seed`` is given (``--seed``: spread over runs)."""
    import dataclasses

    from trainer.spec import load_spec

    spec = load_spec(name, settings)
    return spec if seed is None else dataclasses.replace(spec, seed=seed)


def bench_digits(settings: Settings, seed: int | None = None) -> dict[str, Any]:
    from ingest.generators import digits
    from trainer.synthetic import write_batches

    spec = _load_spec("digits_cnn", settings, seed)
    batches = write_batches(FeatureStore(settings.feature_store), "image", digits(), batch_size=DIGITS_BATCH,
                            topic="bench.image", namespace="bench")
    return _loop(settings, spec, batches, list(range(spec.features().n_features)))


def bench_sensor(settings: Settings, seed: int | None = None) -> dict[str, Any]:
    from ingest.sensors import generate
    from trainer.synthetic import write_batches

    spec = _load_spec("sensor_forecaster", settings, seed)
    batches = write_batches(FeatureStore(settings.feature_store), "sensor",
                            generate(SENSOR_READINGS, n_sensors=10, seed=11), batch_size=SENSOR_BATCH,
                            topic="bench.sensor", namespace="bench")
    out = _loop(settings, spec, batches, list(range(spec.features().n_features)))
    out["generator"] = f"ingest.sensors.generate(n={SENSOR_READINGS}, n_sensors=10, seed=11)"
    return out


def bench_weblog(settings: Settings, log: Path, seed: int | None = None) -> dict[str, Any]:
    from ingest.weblog import parse_line
    from streaming.features.weblog_v2 import OUTCOME_FEATURES
    from trainer.synthetic import write_batches

    spec = _load_spec("weblog_classifier", settings, seed)
    with log.open("rb") as fh:
        records = [parse_line(line, source=log.name, position=i) for i, line in enumerate(fh)]
    batches = write_batches(FeatureStore(settings.feature_store), "weblog", records, batch_size=WEBLOG_BATCH,
                            topic="bench.weblog", namespace="bench")
    names = spec.features().feature_names
    cols = [i for i, n in enumerate(names) if n not in OUTCOME_FEATURES]  # River gets the same inputs
    out = _loop(settings, spec, batches, cols)
    out["log"] = str(log)
    out["task"] = "is_failed: status >= 400, predicted from the request (status, size, latency excluded)"
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = [k for k in ("digits", "sensor", "weblog") if isinstance(result.get(k), dict)
               and "per_batch" in result[k]]
    fig, axes = plt.subplots(1, len(streams), figsize=(6 * len(streams), 4.5), squeeze=False)
    for ax, key in zip(axes[0], streams, strict=True):
        s = result[key]
        rows = s["per_batch"]
        xs = [r["batch"] for r in rows if "ours" in r]
        ax.plot(xs, [r["ours"] for r in rows if "ours" in r], "o-",
                label=f"{s['model']} (version served before the batch)")
        xb = [r["batch"] for r in rows if "baseline" in r]
        ax.plot(xb, [r["baseline"] for r in rows if "baseline" in r], "s--", label=f"baseline ({s['baseline_name']})")
        for name in s["river"]:
            ax.plot([r["batch"] for r in rows], [r["river"][name] for r in rows], ".:", label=name)
        ax.set_xlabel("batch (scored before the trainer sees it)")
        ax.set_ylabel(f"{s['metric']} ({s['better']} is better)")
        ax.set_title(key)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


STREAMS = ("digits", "sensor", "weblog")


def _one_stream(settings: Settings, stream: str, log: Path, seed: int | None) -> dict[str, Any]:
    """One stream's test-then-train loop (in this process or a pool worker)."""
    from trainer.training import configure_tensorflow

    configure_tensorflow()
    started = time.perf_counter()
    if stream == "digits":
        out = bench_digits(settings, seed)
    elif stream == "sensor":
        out = bench_sensor(settings, seed)
    else:
        out = bench_weblog(settings, log, seed) if log.is_file() else {"skipped": f"{log} is absent"}
    out["stream_seconds"] = round(time.perf_counter() - started, 1)
    return out


def run(settings: Settings, weblog: Path | None = None, streams: tuple[str, ...] = STREAMS,
        seed: int | None = None, jobs: int | None = None) -> dict[str, Any]:
    """The learning benchmarks of ``streams`` on ``settings``' store and model dir (no Kafka needed).

    ``seed`` replaces each spec's training seed (initializers, shuffling); the streams themselves and
    River's side do not depend on it, so runs with several seeds show our models' seed-to-seed spread.

    ``jobs`` streams run at once, each in its own process (default: up to 2, one per core). Why: one
    stream's loop keeps about one core busy (TensorFlow on small batches, River row by row), so on
    two cores running them one after another left a core idle for 3 min; the streams share nothing
    (own kind directory and model name) and training is deterministic, so the figures do not change.
    """
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "learning", "protocol": "test-then-train", "machine": machine(),
                              "seed": seed}
    log = weblog or WEBLOG_DEFAULT
    wanted = [s for s in STREAMS if s in streams]
    jobs = max(1, min(jobs or min(2, os.cpu_count() or 1), len(wanted)))
    result["jobs"] = jobs
    if jobs == 1:
        for stream in wanted:
            result[stream] = _one_stream(settings, stream, log, seed)
    else:
        # spawn, not fork: a fork of a process that already imported TensorFlow can hang in its threads
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {stream: pool.submit(_one_stream, settings, stream, log, seed) for stream in wanted}
            for stream, future in futures.items():
                result[stream] = future.result()
    result["seconds"] = round(time.perf_counter() - started, 1)
    table = []
    for key in STREAMS:
        s = result.get(key)
        if s is None or "skipped" in s:
            continue
        table.append({"figure": f"{s['model']} {s['metric']} / best River ({s['best_river_model']})",
                      "value": round(s["ours"], 4), "baseline": round(s["river"][s["best_river_model"]], 4),
                      "ratio": None if s["vs_best_river"] is None else round(s["vs_best_river"], 3),
                      "goal": ">= 1.0"})
        table.append({"figure": f"{s['model']} {s['metric']} / baseline ({s['baseline_name']})",
                      "value": round(s["ours"], 4), "baseline": round(s["baseline"], 4),
                      "ratio": None if s["vs_baseline"] is None else round(s["vs_baseline"], 3), "goal": "> 1.0"})
    result["table"] = table
    png = REPORT_DIR / "learning.png"
    plot(result, png)
    result["plot"] = str(png)
    write_report("learning", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weblog", type=Path, default=None,
                        help=f"combined/common log to learn from (default {WEBLOG_DEFAULT})")
    parser.add_argument("--streams", default=",".join(STREAMS),
                        help=f"comma-separated streams to run (default {','.join(STREAMS)})")
    parser.add_argument("--jobs", type=int, default=None,
                        help="streams run at once, each in its own process (default: up to 2, one per core)")
    parser.add_argument("--seed", type=int, default=None,
                        help="training seed of every spec (default: each spec's own); run several to see the spread")
    args = parser.parse_args()
    streams = tuple(s.strip() for s in args.streams.split(",") if s.strip())
    unknown = sorted(set(streams) - set(STREAMS))
    if unknown:
        parser.error(f"--streams: unknown {unknown}; choose from {list(STREAMS)}")
    home = Path(tempfile.mkdtemp(prefix="streamlearn-bench-learning-"))
    settings = config.load({"home": home, "metrics_port": -1})
    print(json.dumps(run(settings, args.weblog, streams, args.seed, args.jobs), indent=2, default=str))


if __name__ == "__main__":
    main()
