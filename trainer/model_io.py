"""SavedModel export in the serving contract, SavedModel scoring, and warm-start weights.

Contract (docs/ARCHITECTURE.md, serving depends on it): TF Serving layout, signature
``serving_default`` taking ``x: float32[None, n_features]`` and returning
``{"outputs": float32[None, k]}``. The Keras model already reshapes ``x`` to the featurizer's
``input_shape`` inside itself, so the signature is the flat vector serving gets from the featurizer.

Warm starts read ``keras/weights.npz`` stored next to the SavedModel (TF Serving ignores extra
files; the manifest covers it). Why not restore from the SavedModel's variables: the Keras model
has to be rebuilt from the spec anyway, and a plain list of arrays in ``get_weights()`` order is
trivial to check for shape compatibility (a changed architecture cold-starts instead of crashing).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

WEIGHTS_FILE = "keras/weights.npz"


def export_saved_model(model: Any, n_features: int, path: Path) -> None:
    """Write ``model`` as a SavedModel with the serving signature, plus its warm-start weights."""
    import tensorflow as tf

    module = tf.Module()
    module.model = model

    @tf.function(input_signature=[tf.TensorSpec([None, n_features], tf.float32, name="x")])
    def serve(x: Any) -> dict[str, Any]:
        return {"outputs": tf.cast(model(x, training=False), tf.float32)}

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve.get_concrete_function()})
    save_weights(model, path / WEIGHTS_FILE)


def save_weights(model: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {f"w{i:04d}": np.asarray(w) for i, w in enumerate(model.get_weights())}
    with path.open("wb") as fh:
        np.savez(fh, allow_pickle=False, **arrays)


def load_weights(model: Any, path: Path) -> bool:
    """Set ``model``'s weights from ``path``; False (model untouched) when missing or shapes differ."""
    if not path.is_file():
        return False
    with np.load(path) as data:
        arrays = [data[k] for k in sorted(data.files)]
    current = model.get_weights()
    if len(arrays) != len(current) or any(a.shape != c.shape for a, c in zip(arrays, current, strict=True)):
        log.warning("warm start: weights in %s do not fit the model (architecture changed); cold start", path)
        return False
    model.set_weights(arrays)
    for layer in model.layers:  # e.g. Normalization derives its mean/variance tensors from variables
        finalize = getattr(layer, "finalize_state", None)
        if callable(finalize):
            finalize()
    return True


def weights_finite(model: Any) -> bool:
    return all(bool(np.all(np.isfinite(w))) for w in model.get_weights())


class SavedModelPredictor:
    """Calls the ``serving_default`` signature of a SavedModel directory, exactly as serving does."""

    def __init__(self, path: Path) -> None:
        import tensorflow as tf

        self.path = Path(path)
        self._loaded = tf.saved_model.load(str(path))
        self._fn = self._loaded.signatures["serving_default"]

    def input_spec(self) -> Any:
        return self._fn.structured_input_signature[1]["x"]

    def predict(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        import tensorflow as tf

        x = np.asarray(x, dtype=np.float32)
        parts = [self._fn(x=tf.constant(x[i:i + batch_size]))["outputs"].numpy()
                 for i in range(0, len(x), batch_size)]
        if not parts:
            k = int(self._fn.structured_outputs["outputs"].shape[-1])
            return np.zeros((0, k), dtype=np.float32)
        return np.concatenate(parts, axis=0)
