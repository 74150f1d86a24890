"""The evaluation gate: promote a candidate only when it is sane and beats both the current model
and a baseline beyond noise, on the same held-out rows.

Pure numpy, no TensorFlow, so every rule is unit-tested on small arrays. The order of checks is
the order of the reasons a human wants to read: broken training first (NaN weights or loss),
then broken outputs (non-finite, degenerate), then the baseline (a model that cannot beat
"predict the majority class" or "predict the last value" is not a model), then the current
version. "Beyond noise" is a margin of ``max(gate_tolerance * |reference|, GATE_Z * paired
bootstrap standard error)``; a tie is a rejection. See docs/MODELS.md "The gate".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from trainer.spec import ModelSpec

#: a candidate must beat a reference by more than GATE_Z paired-bootstrap standard errors.
GATE_Z = 1.0
BOOTSTRAP_SAMPLES = 200
BASELINE_NAMES = {"prior": "class prior (majority class)", "zero": "persistence (last value)",
                  "mean": "training mean"}


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    candidate_score: float | None
    current_score: float | None
    primary_metric: str
    direction: str
    tolerance: float
    baseline_score: float | None = None
    baseline: str | None = None
    #: the improvement each comparison had to exceed (metric units), None when not compared.
    margin_vs_current: float | None = None
    margin_vs_baseline: float | None = None
    eval_rows: int = 0

    @property
    def action(self) -> str:
        return "PROMOTED" if self.promote else "REJECTED"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["action"] = self.action
        out["better"] = "higher" if self.direction == "max" else "lower"
        for k in ("candidate_score", "current_score", "baseline_score", "margin_vs_current",
                  "margin_vs_baseline"):
            if out[k] is not None and not math.isfinite(out[k]):
                out[k] = None  # JSON and Avro have no NaN; the reason says what happened
        return out


def baseline_outputs(spec: ModelSpec, y_train: np.ndarray, n_eval: int, n_outputs: int) -> np.ndarray:
    """What the spec's baseline answers for each of ``n_eval`` rows, knowing only the training targets.

    "prior": the training class frequencies (argmax = the majority class); "mean": the training mean
    of every target column; "zero": all zeros, i.e. persistence when the target is the change from the
    last value (the sensor forecaster's ``next_value_delta``).
    """
    out = np.zeros((n_eval, n_outputs), dtype=np.float32)
    kind = spec.baseline_kind()
    if kind == "zero" or len(y_train) == 0:
        return out
    with np.errstate(all="ignore"):
        level = np.nanmean(np.asarray(y_train, dtype=np.float64), axis=0)
    level = np.where(np.isfinite(level), level, 0.0)[:n_outputs]
    out[:, : len(level)] = level
    return out


def paired_standard_error(spec: ModelSpec, y: np.ndarray, a: np.ndarray, b: np.ndarray,
                          samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> float:
    """Bootstrap standard error of ``score(a) - score(b)`` on the same rows (resampled together).

    Why paired: both models answer the same rows, so row difficulty cancels and the noise of the
    *difference* is what decides whether one is better; why a bootstrap: balanced accuracy and MAE
    have no simple variance formula that holds on a few hundred rows with rare classes.
    """
    n = len(y)
    if n < 2:
        return float("inf")
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(samples):
        idx = rng.integers(0, n, size=n)
        d = float(spec.score(y[idx], a[idx])) - float(spec.score(y[idx], b[idx]))
        if math.isfinite(d):
            diffs.append(d)
    return float(np.std(diffs)) if len(diffs) >= 2 else float("inf")


def _margin(spec: ModelSpec, y: np.ndarray, cand: np.ndarray, other: np.ndarray | None, reference: float) -> float:
    floor = spec.gate_tolerance * abs(reference)
    if other is None:
        return floor
    return max(floor, GATE_Z * paired_standard_error(spec, y, cand, other))


def degenerate_reason(spec: ModelSpec, y: np.ndarray, outputs: np.ndarray) -> str | None:
    """Why ``outputs`` are degenerate on the evaluation rows, or None when they are not.

    Classifiers: one class predicted for every row although the rows hold several classes (a
    batch with a single true class cannot tell a collapsed model from a good one, so it passes).
    Regression: the forecast column is constant.
    """
    if len(outputs) < 2:
        return None
    if spec.task == "classification":
        truth = np.unique(np.argmax(y, axis=1))
        pred = np.unique(np.argmax(outputs, axis=1))
        if len(truth) > 1 and len(pred) == 1:
            name = spec.class_names[int(pred[0])] if spec.class_names else str(int(pred[0]))
            return f"degenerate outputs: class {name!r} predicted for all {len(outputs)} evaluation rows"
        return None
    forecast = outputs[:, 0]
    spread = float(np.ptp(forecast))
    scale = float(np.nanstd(y[:, 0])) if y.size else 0.0
    if spread <= 1e-6 * max(scale, 1e-12):
        return f"degenerate outputs: constant forecast {float(forecast[0]):.6g} for all {len(outputs)} rows"
    return None


def _one_class_hint(spec: ModelSpec, y: np.ndarray) -> str:
    """Why a classifier cannot beat its baseline when every held-out row has one class, or "". Why: a small
    site's log with no failed request gave "balanced_accuracy 1 vs baseline 1", which said neither that
    the data hold a single class nor what to do."""
    if spec.task != "classification" or not len(y):
        return ""
    present = np.unique(np.argmax(y, axis=1)) if y.ndim == 2 and y.shape[1] > 1 else np.unique(np.asarray(y) > 0.5)
    if len(present) > 1:
        return ""
    only = int(present[0])
    name = spec.class_names[only] if spec.class_names and only < len(spec.class_names) else str(only)
    return (f". Every held-out row is of one class ({name!r}): there is nothing to tell apart, and any model "
            "ties with the baseline. Train on data that holds the other classes too (for a web log: failed "
            "requests, 4xx/5xx)")


def decide(spec: ModelSpec, *, y_eval: np.ndarray, candidate_outputs: np.ndarray, candidate_score: float,
           current_score: float | None, weights_finite: bool = True,
           train_loss: float | None = None, current_outputs: np.ndarray | None = None,
           baseline_outputs: np.ndarray | None = None) -> GateDecision:
    """Decide whether the candidate replaces the current model (``current_score`` None: first version).

    Promote only a sane candidate that beats the baseline (when ``baseline_outputs`` are given) and
    the current version by more than the noise margin on the same held-out rows; a tie is a rejection.
    The margins are ``max(gate_tolerance * |reference|, GATE_Z * paired bootstrap SE)``; without the
    reference's outputs only the tolerance floor applies.
    """
    baseline_name = BASELINE_NAMES.get(spec.baseline_kind(), spec.baseline_kind())
    base_score: float | None = None
    if baseline_outputs is not None and len(y_eval):
        base_score = float(spec.score(y_eval, baseline_outputs))
    margins: dict[str, float | None] = {"current": None, "baseline": None}

    def verdict(promote: bool, reason: str) -> GateDecision:
        return GateDecision(promote, reason, candidate_score, current_score, spec.primary_metric,
                            spec.direction, spec.gate_tolerance, base_score,
                            baseline_name if baseline_outputs is not None else None,
                            margins["current"], margins["baseline"], int(len(y_eval)))

    if not weights_finite:
        return verdict(False, "rejected: candidate has NaN or infinite weights")
    if train_loss is not None and not math.isfinite(train_loss):
        return verdict(False, f"rejected: training loss is {train_loss}")
    if len(y_eval) == 0:
        return verdict(False, "rejected: no labelled evaluation rows in the held-out batches")
    if not np.all(np.isfinite(candidate_outputs)):
        return verdict(False, "rejected: candidate outputs contain NaN or infinity")
    if candidate_score is None or not math.isfinite(candidate_score):
        return verdict(False, f"rejected: candidate {spec.primary_metric} is {candidate_score}")
    why = degenerate_reason(spec, y_eval, candidate_outputs)
    if why:
        return verdict(False, "rejected: " + why)
    metric = spec.primary_metric
    word = "higher" if spec.direction == "max" else "lower"
    rows = f"{len(y_eval)} held-out rows, {word} is better"
    if base_score is not None and math.isfinite(base_score):
        need_b = _margin(spec, y_eval, candidate_outputs, baseline_outputs, base_score)
        margins["baseline"] = need_b
        if not spec.improvement(candidate_score, base_score) > need_b:
            return verdict(False, f"rejected: does not beat the baseline ({baseline_name}) beyond noise: "
                                  f"candidate {metric} {candidate_score:.6g} vs baseline {base_score:.6g}, "
                                  f"needs more than {need_b:.3g} better ({rows})" + _one_class_hint(spec, y_eval))
    vs_base = f"; baseline {base_score:.6g}" if base_score is not None else ""
    if current_score is None:
        return verdict(True, f"promoted: first version ({metric} {candidate_score:.6g}{vs_base}; {rows})")
    if not math.isfinite(current_score):
        return verdict(True, f"promoted: current model scores {current_score} on held-out data; "
                             f"candidate {metric} {candidate_score:.6g}{vs_base}")
    need_c = _margin(spec, y_eval, candidate_outputs, current_outputs, current_score)
    margins["current"] = need_c
    comparison = (f"candidate {metric} {candidate_score:.6g} vs current {current_score:.6g}{vs_base} "
                  f"(needs more than {need_c:.3g} better; {rows})")
    if spec.improvement(candidate_score, current_score) > need_c:
        return verdict(True, "promoted: " + comparison)
    return verdict(False, "rejected: not better than current beyond noise (a tie is no promotion): "
                          + comparison)
