"""One deterministic training run: build from the spec, warm-start, fit through tf.data, log to TensorBoard.

Shared by the trainer worker, the reproduce command, the check suite and the benchmark, so all of
them train exactly the same way. Determinism: ``keras.utils.set_random_seed(seed)`` (Python, numpy
and TF seeds), ``tf.config.experimental.enable_op_determinism()``, a seeded ``shuffle``, and the
spec's builder seeding every initializer; on one machine the same inputs give the same weights.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streaming.progress import Progress, progress
from trainer.spec import FeatureInfo, ModelSpec

if TYPE_CHECKING:
    from trainer.model_cache import ModelCache

log = logging.getLogger(__name__)
_CONFIGURED = False


def configure_tensorflow(intra_threads: int = 2, inter_threads: int = 1) -> Any:
    """Import TensorFlow quietly, with few threads and op determinism; returns the module.

    ``TF_CPP_MIN_LOG_LEVEL`` configures the TF C++ library's own logging and must be set before
    the import; ``setdefault`` keeps a value chosen by the user. This is not a streamlearn
    setting, so it does not go through streaming.config.
    """
    global _CONFIGURED
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    if not _CONFIGURED:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(intra_threads)
            tf.config.threading.set_inter_op_parallelism_threads(inter_threads)
        except RuntimeError:  # the runtime was initialised by someone else first; keep its threads
            log.debug("TensorFlow threads already configured")
        tf.config.experimental.enable_op_determinism()
        tf.get_logger().setLevel(logging.ERROR)
        _CONFIGURED = True
    return tf


@dataclass
class TrainResult:
    model: Any
    warm_started: bool
    final_loss: float
    history: dict[str, list[float]] = field(default_factory=dict)
    rows: int = 0


def train_candidate(spec: ModelSpec, features: FeatureInfo, x: np.ndarray, y: np.ndarray, *, seed: int,
                    init_weights: Path | None = None, log_dir: Path | None = None,
                    epochs: int | None = None, run_eagerly: bool = False,
                    cache: ModelCache | None = None) -> TrainResult:
    """Fit a fresh model from ``spec`` on ``(x, y)``; warm-start from ``init_weights`` when they fit.

    ``cache``: re-use the compiled model of this process's previous run, reset to exactly the state
    of a fresh build (bit-identical results, no re-tracing; trainer.model_cache). The returned model
    is then the cache's: valid until the next run through the same cache.
    """
    tf = configure_tensorflow()
    import keras

    from trainer import model_io
    from trainer.specs.common import make_optimizer

    def compile_model(model: Any) -> None:
        # run_eagerly: the check suite trains on two tiny batches, where tracing costs more than it saves.
        model.compile(optimizer=make_optimizer(spec.learning_rate), loss=spec.loss(), metrics=spec.metrics(),
                      run_eagerly=run_eagerly)

    keras.utils.set_random_seed(seed)
    weighted = bool(spec.balance_classes and spec.task == "classification" and len(y))
    if cache is not None:
        model = cache.checkout(spec, features, seed, weighted=weighted, run_eagerly=run_eagerly,
                               compile_model=compile_model)
    else:
        model = spec.build(features, seed)
    warm = model_io.load_weights(model, init_weights) if init_weights is not None else False
    if not warm and spec.adapt is not None and len(x):
        spec.adapt(model, x)
    if cache is None:
        compile_model(model)
    tensors: tuple[np.ndarray, ...] = (x.astype(np.float32), y.astype(np.float32))
    if weighted:
        tensors = (*tensors, class_balance_weights(y))
    ds = (tf.data.Dataset.from_tensor_slices(tensors)
          .shuffle(max(1, len(x)), seed=seed, reshuffle_each_iteration=True)
          .batch(spec.batch_size))
    callbacks: list[Any] = [keras.callbacks.TerminateOnNaN()]
    if log_dir is not None:
        from trainer.tensorboard import epoch_logger

        callbacks.append(epoch_logger(log_dir))
    n_epochs = epochs or epoch_budget(spec, len(x))
    rows = int(len(x))
    with progress(n_epochs * rows, f"train {spec.name} epoch 1/{n_epochs} ({rows:,} rows)", unit="rows") as bar:
        callbacks.append(_progress_callback(keras, bar, spec.name, n_epochs, rows, spec.batch_size))
        hist = model.fit(ds, epochs=n_epochs, verbose=0, callbacks=callbacks, shuffle=False)
    if spec.after_fit is not None and len(x):
        spec.after_fit(model, x, y)
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    losses = history.get("loss") or [float("nan")]
    final = losses[-1]
    return TrainResult(model, warm, final if math.isfinite(final) else float("nan"), history, int(len(x)))


def _progress_callback(keras: Any, bar: Progress, name: str, epochs: int, rows: int, batch_size: int) -> Any:
    """Keras callback feeding streaming.progress: rows per training batch, the epoch in the description."""

    class _Progress(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            done_in_epoch = min(rows, (batch + 1) * batch_size)
            bar.advance(done_in_epoch - min(rows, batch * batch_size))

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if epoch + 1 < epochs:
                bar.set_description(f"train {name} epoch {epoch + 2}/{epochs} ({rows:,} rows)")

    return _Progress()
def epoch_budget(spec: ModelSpec, rows: int) -> int:
    """``spec.epochs``, raised so that training takes at least ``spec.min_train_steps`` gradient steps.

    Why: a version trained on the first few hundred rows of a stream got 4 steps per epoch, i.e. a
    few dozen steps in all, and served an undertrained model for the next batches; a step floor
    costs nothing on large data (the epochs dominate there) and is deterministic like the epochs.
    """
    steps_per_epoch = max(1, math.ceil(rows / max(1, spec.batch_size)))
    return max(spec.epochs, math.ceil(spec.min_train_steps / steps_per_epoch))


def class_balance_weights(y: np.ndarray) -> np.ndarray:
    """Per-row weights ``n / (classes present * rows of the row's class)`` for one-hot ``y``.

    Why: on a log where 2% of requests fail, plain cross-entropy learns "always ok" (balanced
    accuracy 0.5, the majority baseline); weighting makes each class count equally, as the metric does.
    """
    ids = np.argmax(y, axis=1)
    counts = np.bincount(ids, minlength=y.shape[1]).astype(np.float64)
    present = int(np.count_nonzero(counts))
    w = len(ids) / (present * counts[ids])
    return w.astype(np.float32)


def predict(model: Any, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Outputs of an in-memory Keras model (same function the SavedModel signature wraps)."""
    if len(x) == 0:
        return np.zeros((0, int(model.output_shape[-1])), dtype=np.float32)
    return np.asarray(model.predict(x.astype(np.float32), batch_size=batch_size, verbose=0), dtype=np.float32)


def write_gate_summary(log_dir: Path, version: int, decision: dict[str, Any]) -> None:
    """Scalars of the gate (candidate, current, baseline, promoted 0/1) under ``<log_dir>/gate`` at step = version."""
    from trainer.tensorboard import write_scalars

    metric = decision.get("primary_metric", "score")
    write_scalars(log_dir / "gate", version, {
        f"gate/candidate_{metric}": decision.get("candidate_score"),
        f"gate/current_{metric}": decision.get("current_score"),
        f"gate/baseline_{metric}": decision.get("baseline_score"),
        "gate/promoted": 1.0 if decision.get("promote") else 0.0,
    })
