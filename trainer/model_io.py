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
import weakref
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

WEIGHTS_FILE = "keras/weights.npz"


#: per live Keras model: (n_features, its traced serving function); see export_saved_model.
_SERVE_FUNCTIONS: weakref.WeakKeyDictionary[Any, tuple[int, Any]] = weakref.WeakKeyDictionary()


def export_saved_model(model: Any, n_features: int, path: Path) -> None:
    """Write ``model`` as a SavedModel with the serving signature, plus its warm-start weights.

    The serving function traced for a model object is kept (weakly) and used again by its next
    export: a trainer re-uses one model across runs (trainer.model_cache), and the traced graph
    reads the model's variables, so each save writes the weights of that moment with the same
    graph a fresh trace would give, minus the tracing (docs/TRAINER_REUSE.md).
    """
    import tensorflow as tf

    known = _SERVE_FUNCTIONS.get(model)
    if known is not None and known[0] == n_features:
        serve = known[1]
    else:
        serve = _serving_function(tf, weakref.ref(model), n_features)
        _SERVE_FUNCTIONS[model] = (n_features, serve)
    signatures = {"serving_default": serve.get_concrete_function()}
    module = tf.Module()
    # Only the model's variables, not the Keras object: serving reads the signature alone, and the
    # Keras object would drag its optimizer slots and metrics into the export (3x the variables of
    # an Adam-trained model; saving and loading cost in proportion).
    module.weights = list(model.variables)
    module.serve = serve
    try:
        tf.saved_model.save(module, str(path), signatures=signatures)
    except (AssertionError, ValueError) as exc:  # e.g. a user layer's variable Keras does not track
        log.warning("export: the serving function uses state outside model.variables (%s); exporting the "
                    "whole Keras object", exc)
        module = tf.Module()
        module.model = model
        module.serve = serve
        tf.saved_model.save(module, str(path), signatures=signatures)
    save_weights(model, path / WEIGHTS_FILE)


def _serving_function(tf: Any, model_ref: weakref.ReferenceType[Any], n_features: int) -> Any:
    """The ``serving_default`` function; it holds the model weakly so the cache above can let go of it."""

    @tf.function(input_signature=[tf.TensorSpec([None, n_features], tf.float32, name="x")])
    def serve(x: Any) -> dict[str, Any]:
        model = model_ref()
        if model is None:  # pragma: no cover - only traced while the model is alive
            raise RuntimeError("model: the Keras model of this serving function is gone; export it again")
        return {"outputs": tf.cast(model(x, training=False), tf.float32)}

    return serve


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
