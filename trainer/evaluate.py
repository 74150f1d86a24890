"""Train a candidate on a data plan and score it and the current model on the held-out batches.

One function for the worker and the reproduce command, so a reproduction runs literally the same
code path as the original training: same batch order, same warm start, same seed, same scoring.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trainer import model_io
from trainer.data import DataPlan, labelled, load_batches
from trainer.exceptions import NotEnoughDataError
from trainer.gate import GateDecision, baseline_outputs, decide
from trainer.spec import FeatureInfo, ModelSpec
from trainer.training import TrainResult, predict, train_candidate

if TYPE_CHECKING:
    from trainer.model_cache import ModelCache


@dataclass
class Evaluation:
    result: TrainResult
    decision: GateDecision
    hashes: dict[str, str]
    eval_rows: int
    train_rows: int
    candidate_outputs: np.ndarray
    y_eval: np.ndarray
    #: per-feature min and max of the training rows (serving counts inputs outside them).
    input_range: dict[str, list[float]] | None = None

    @property
    def model(self) -> Any:
        return self.result.model


def fit_and_evaluate(spec: ModelSpec, features: FeatureInfo, plan: DataPlan, *, parent_dir: Path | None,
                     seed: int, log_dir: Path | None = None,
                     expected_sha: dict[str, str] | None = None, cache: ModelCache | None = None) -> Evaluation:
    """Train on ``plan.train`` (warm-started from ``parent_dir``), gate on ``plan.holdout``.

    ``cache``: the trainer's :class:`trainer.model_cache.ModelCache` (same results, less tracing).
    """
    x_tr, cols_tr, h_tr = load_batches(spec, plan.train, features.n_features, expected_sha)
    x_ev, cols_ev, h_ev = load_batches(spec, plan.holdout, features.n_features, expected_sha)
    hashes = dict(zip([b.batch_id for b in plan.train], h_tr, strict=True))
    hashes.update(zip([b.batch_id for b in plan.holdout], h_ev, strict=True))
    xt, yt = labelled(spec, x_tr, cols_tr)
    xe, ye = labelled(spec, x_ev, cols_ev)
    if len(xt) == 0:
        raise NotEnoughDataError(
            f"model {spec.name!r}: the {len(plan.train)} training batch(es) hold no row with label "
            f"{spec.label!r}; labelled events are needed to train"
        )
    init = parent_dir / model_io.WEIGHTS_FILE if parent_dir is not None else None
    result = train_candidate(spec, features, xt, yt, seed=seed, init_weights=init, log_dir=log_dir, cache=cache)
    return evaluate_candidate(spec, result, xt, yt, xe, ye, parent_dir=parent_dir, hashes=hashes)


def evaluate_candidate(spec: ModelSpec, result: TrainResult, xt: np.ndarray, yt: np.ndarray, xe: np.ndarray,
                       ye: np.ndarray, *, parent_dir: Path | None, hashes: dict[str, str]) -> Evaluation:
    """Score a trained candidate, the current model and the baseline on the held-out rows; gate.

    Shared by the single-process fit above and the chief of a distributed run
    (trainer.distributed), so both gate exactly the same way on all training rows.
    """
    weights_ok = model_io.weights_finite(result.model)
    cand_out = predict(result.model, xe) if weights_ok else np.full((len(xe), len(spec.output_names)), np.nan)
    cand_score = float(spec.score(ye, cand_out)) if len(ye) and weights_ok else float("nan")
    current: float | None = None
    current_out: np.ndarray | None = None
    if parent_dir is not None and len(ye):
        current_out = model_io.SavedModelPredictor(parent_dir).predict(xe)
        current = float(spec.score(ye, current_out))
    base_out = baseline_outputs(spec, yt, len(ye), len(spec.output_names))
    decision = decide(spec, y_eval=ye, candidate_outputs=cand_out, candidate_score=cand_score,
                      current_score=current, weights_finite=weights_ok,
                      train_loss=result.final_loss, current_outputs=current_out, baseline_outputs=base_out)
    return Evaluation(result, decision, hashes, int(len(ye)), int(len(yt)), cand_out, ye,
                      input_range(xt))


def input_range(x: np.ndarray) -> dict[str, list[float]]:
    """Per-feature ``{"min": [...], "max": [...]}`` of training rows (metadata ``input_range``)."""
    if len(x) == 0:
        return {"min": [], "max": []}
    return {"min": [float(v) for v in np.min(x, axis=0)], "max": [float(v) for v in np.max(x, axis=0)]}
