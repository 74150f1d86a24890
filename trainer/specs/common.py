"""Building blocks shared by model specs: input reshaping, target makers, numpy scores, Keras metrics.

Why numpy scores next to Keras metrics: the gate and the reproduce command score SavedModels
(what serving really runs) on held-out rows, outside any Keras ``fit``; the Keras metrics only
feed TensorBoard during training. Both are defined here so a spec names each once.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras

    from trainer.spec import FeatureInfo


def inputs(features: FeatureInfo) -> tuple[Any, Any]:
    """``(Input of (n_features,) named "x", that input reshaped to features.input_shape)``.

    Every built-in model starts this way, so the SavedModel signature takes the flat feature
    vector serving gets from the featurizer while the layers see e.g. an 8x8x1 image.
    """
    import keras

    x = keras.Input(shape=(features.n_features,), name="x", dtype="float32")
    if tuple(features.input_shape) == (features.n_features,):
        return x, x
    return x, keras.layers.Reshape(tuple(features.input_shape), name="to_input_shape")(x)


def not_class_ids(ids: np.ndarray, n_classes: int) -> np.ndarray:
    """Mask of the labels that are no class id, i.e. not an integer in [0, n_classes) (NaN included: drop
    unlabelled rows first). One rule for the trainer's row filter (trainer.data.labelled) and the targets."""
    return (ids < 0) | (ids >= n_classes) | (ids != np.round(ids))


def one_hot_targets(label: str, n_classes: int) -> Any:
    """Target maker: integer class label column -> one-hot float32 (N, n_classes)."""

    def make(columns: dict[str, np.ndarray]) -> np.ndarray:
        ids = np.asarray(columns[label], dtype=np.float64)
        invalid = not_class_ids(ids, n_classes)
        if invalid.any():
            bad = ids[invalid][:5]
            raise ValueError(f"label {label!r}: class ids must be integers in [0, {n_classes}), got {bad}")
        out = np.zeros((ids.shape[0], n_classes), dtype=np.float32)
        out[np.arange(ids.shape[0]), ids.astype(np.int64)] = 1.0
        return out

    return make


def column_targets(*labels: str) -> Any:
    """Target maker: stack label columns as float32 (N, len(labels)); NaN stays NaN (masked by the loss)."""

    def make(columns: dict[str, np.ndarray]) -> np.ndarray:
        n = len(next(iter(columns.values())))
        cols = [np.asarray(columns[name], dtype=np.float32) if name in columns
                else np.full(n, np.nan, dtype=np.float32) for name in labels]
        return np.stack(cols, axis=1)

    return make


# -- numpy scores (gate, reproduce, benchmark) ---------------------------------------------------

def accuracy(y: np.ndarray, outputs: np.ndarray) -> float:
    """Share of rows whose argmax output is the one-hot target's class."""
    if len(y) == 0:
        return float("nan")
    return float(np.mean(np.argmax(outputs, axis=1) == np.argmax(y, axis=1)))


def balanced_accuracy(y: np.ndarray, outputs: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (one-hot).

    Why for the web-log classifier: attacks are rare, so plain accuracy rewards "always normal";
    unlike AUC it is still defined on an evaluation batch that holds only one class.
    """
    if len(y) == 0:
        return float("nan")
    truth = np.argmax(y, axis=1)
    pred = np.argmax(outputs, axis=1)
    recalls = [float(np.mean(pred[truth == c] == c)) for c in np.unique(truth)]
    return float(np.mean(recalls))


def forecast_mae(y: np.ndarray, outputs: np.ndarray) -> float:
    """Mean absolute error of column 0 (the forecast) over rows whose target is known."""
    mask = ~np.isnan(y[:, 0])
    if not mask.any():
        return float("nan")
    return float(np.mean(np.abs(outputs[mask, 0] - y[mask, 0])))


# -- Keras pieces (training + TensorBoard) -------------------------------------------------------

def classifier_metrics(n_classes: int, positive_class: int | None) -> list[Any]:
    """accuracy, precision, recall, AUC (+ balanced accuracy) for one-hot targets and softmax outputs.

    ``positive_class`` set (binary tasks): precision/recall/AUC are those of that class; None
    (multi-class): micro-averaged over the one-hot columns.
    """
    import keras

    out: list[Any] = [keras.metrics.CategoricalAccuracy(name="accuracy"), BalancedAccuracy(n_classes)]
    if positive_class is None:
        out += [keras.metrics.Precision(name="precision"), keras.metrics.Recall(name="recall"),
                keras.metrics.AUC(name="auc")]
    else:
        out += [keras.metrics.Precision(class_id=positive_class, name="precision"),
                keras.metrics.Recall(class_id=positive_class, name="recall"),
                _column_auc(positive_class)]
    return out


def _column_auc(column: int) -> Any:
    import keras

    class ColumnAUC(keras.metrics.AUC):
        """AUC of one output column against the same target column (binary one-hot tasks)."""

        def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
            return super().update_state(y_true[:, column], y_pred[:, column], sample_weight)

    return ColumnAUC(name="auc")


@functools.cache
def _balanced_accuracy_class() -> Any:
    import keras
    from keras import ops

    class _BalancedAccuracy(keras.metrics.Metric):
        """Streaming mean per-class recall (argmax) over the classes seen so far."""

        def __init__(self, n_classes: int, name: str = "balanced_accuracy", **kwargs: Any) -> None:
            super().__init__(name=name, **kwargs)
            self.n_classes = n_classes
            self.hits = self.add_variable(shape=(n_classes,), initializer="zeros", name="hits")
            self.counts = self.add_variable(shape=(n_classes,), initializer="zeros", name="counts")

        def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
            truth = ops.argmax(y_true, axis=1)
            pred = ops.argmax(y_pred, axis=1)
            onehot = ops.one_hot(truth, self.n_classes)
            hit = ops.cast(ops.equal(truth, pred), "float32")
            self.counts.assign_add(ops.sum(onehot, axis=0))
            self.hits.assign_add(ops.sum(onehot * ops.expand_dims(hit, 1), axis=0))

        def result(self) -> Any:
            seen = ops.cast(self.counts > 0, "float32")
            recall = ops.divide_no_nan(self.hits, self.counts)
            return ops.divide_no_nan(ops.sum(recall * seen), ops.sum(seen))

        def reset_state(self) -> None:
            self.hits.assign(ops.zeros_like(self.hits))
            self.counts.assign(ops.zeros_like(self.counts))

    return _BalancedAccuracy


def BalancedAccuracy(n_classes: int) -> Any:
    """A Keras metric instance computing :func:`balanced_accuracy` per epoch (for TensorBoard)."""
    return _balanced_accuracy_class()(n_classes)


def make_optimizer(learning_rate: float) -> keras.optimizers.Optimizer:
    import keras

    return keras.optimizers.Adam(learning_rate=learning_rate)
