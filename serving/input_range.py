"""Count prediction inputs outside the range the served version saw in training.

Why: a model is only tested on inputs like its training rows. The trainer records every version's
per-feature training ``min``/``max`` in ``metadata.json["input_range"]``; serving compares each
input it predicts on and counts

* ``streamlearn_serving_inputs_out_of_range_total{model}``: inputs with at least one feature
  outside its training range (``rate()`` over requests gives the share), and
* ``streamlearn_serving_features_out_of_range_total{model, feature}``: per feature. Labels stay
  bounded: ``feature`` is one of the featurizer's ``feature_names`` (``x<i>`` when the metadata
  names none), i.e. at most ``n_features`` series per model, never request data.

The model still answers (its input guard clips standardized inputs, see trainer.specs.guard); the
counters tell an operator that live traffic left the training distribution, e.g. a weekly series
that suddenly reports at another hour of the day.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import Counter

OUT_OF_RANGE = Counter("streamlearn_serving_inputs_out_of_range_total",
                       "Prediction inputs with a feature outside the served version's training range",
                       ["model"])
FEATURES_OUT_OF_RANGE = Counter("streamlearn_serving_features_out_of_range_total",
                                "Features outside the served version's training range, by feature name",
                                ["model", "feature"])
#: relative slack around the training range (float32 round-off of a value equal to the bound).
SLACK = 1e-6


@dataclass(frozen=True)
class InputRange:
    low: np.ndarray
    high: np.ndarray
    names: tuple[str, ...]

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], n_features: int) -> InputRange | None:
        """The range recorded by the trainer, or None (older versions, foreign exports)."""
        rng = meta.get("input_range")
        if not isinstance(rng, dict):
            return None
        try:
            low = np.asarray(rng.get("min"), dtype=np.float64)
            high = np.asarray(rng.get("max"), dtype=np.float64)
        except (TypeError, ValueError):
            return None
        if low.shape != (n_features,) or high.shape != (n_features,):
            return None
        names = list((meta.get("featurizer") or {}).get("feature_names") or [])
        if len(names) != n_features:
            names = [f"x{i}" for i in range(n_features)]
        slack = SLACK * (1.0 + np.abs(high - low) + np.maximum(np.abs(low), np.abs(high)))
        return cls(low - slack, high + slack, tuple(str(n) for n in names))

    def outside(self, x: np.ndarray) -> np.ndarray:
        """Boolean ``(rows, n_features)``: which features of which rows fall outside the range."""
        x64 = np.asarray(x, dtype=np.float64)
        return (x64 < self.low) | (x64 > self.high) | ~np.isfinite(x64)

    def observe(self, model: str, x: np.ndarray) -> int:
        """Count the out-of-range inputs of one batch in the metrics; returns how many rows were."""
        mask = self.outside(x)
        rows = int(np.count_nonzero(mask.any(axis=1)))
        if rows:
            OUT_OF_RANGE.labels(model).inc(rows)
            for i in np.flatnonzero(mask.any(axis=0)):
                FEATURES_OUT_OF_RANGE.labels(model, self.names[int(i)]).inc(int(np.count_nonzero(mask[:, i])))
        return rows
