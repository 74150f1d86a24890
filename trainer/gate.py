"""The evaluation gate: promote a candidate only when it is sane and at least as good as the current model.

Pure numpy, no TensorFlow, so every rule is unit-tested on small arrays. The order of checks is
the order of the reasons a human wants to read: broken training first (NaN weights or loss),
then broken outputs (non-finite, degenerate), then the comparison on the primary metric.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from trainer.spec import ModelSpec


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    candidate_score: float | None
    current_score: float | None
    primary_metric: str
    direction: str
    tolerance: float

    @property
    def action(self) -> str:
        return "PROMOTED" if self.promote else "REJECTED"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["action"] = self.action
        for k in ("candidate_score", "current_score"):
            if out[k] is not None and not math.isfinite(out[k]):
                out[k] = None  # JSON and Avro have no NaN; the reason says what happened
        return out


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


def decide(spec: ModelSpec, *, y_eval: np.ndarray, candidate_outputs: np.ndarray, candidate_score: float,
           current_score: float | None, weights_finite: bool = True,
           train_loss: float | None = None) -> GateDecision:
    """Decide whether the candidate replaces the current model (``current_score`` None: first version)."""

    def verdict(promote: bool, reason: str) -> GateDecision:
        return GateDecision(promote, reason, candidate_score, current_score, spec.primary_metric,
                            spec.direction, spec.gate_tolerance)

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
    if current_score is None:
        return verdict(True, f"promoted: first version ({metric} {candidate_score:.6g} on held-out data)")
    if not math.isfinite(current_score):
        return verdict(True, f"promoted: current model scores {current_score} on held-out data; "
                             f"candidate {metric} {candidate_score:.6g}")
    word = "higher" if spec.direction == "max" else "lower"
    comparison = (f"candidate {metric} {candidate_score:.6g} vs current {current_score:.6g} "
                  f"({word} is better, tolerance {spec.gate_tolerance:.3g} relative)")
    if spec.better_or_equal(candidate_score, current_score):
        return verdict(True, "promoted: " + comparison)
    return verdict(False, "rejected: worse than current: " + comparison)
