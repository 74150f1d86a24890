"""One loaded model version: verified, loaded, warmed up, ready to be called on a batch.

Why a concrete function and not ``model.predict``: ``loaded.signatures["serving_default"]`` is a
traced graph with a ``[None, n]`` input, so one call answers a whole dynamic batch without Keras'
per-call setup (which costs tens of milliseconds, i.e. more than the model itself).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.exceptions import ModelLoadError
from serving.input_range import InputRange
from streaming.model_registry import ModelRegistry

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"


@dataclass(eq=False)
class LoadedVersion:
    """A version that passed verification and warm-up. Immutable after construction.

    ``featurizer`` is the one recorded in the version's metadata (None when the metadata names
    none or the featurizer is unknown here; such a version still answers feature-vector requests,
    while raw-event requests get an error answer).
    """

    name: str
    version: int
    metadata: dict[str, Any]
    n_features: int
    n_outputs: int
    class_names: list[str]
    featurizer: Any | None
    featurizer_error: str | None
    target_label: str | None
    loaded_at: float
    _loaded: Any = field(repr=False)
    _fn: Any = field(repr=False)
    #: training range of the inputs (metadata ``input_range``); None when the version records none.
    input_range: InputRange | None = None

    def observe_inputs(self, x: np.ndarray) -> int:
        """Count inputs outside the training range in the serving metrics (see serving.input_range)."""
        return self.input_range.observe(self.name, x) if self.input_range is not None else 0

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Outputs ``float32[len(x), k]`` for a ``float32[len(x), n_features]`` batch, in one call."""
        import tensorflow as tf

        out = self._fn(x=tf.constant(np.asarray(x, dtype=np.float32)))
        result: np.ndarray = out["outputs"].numpy()
        return result

    def predicted_label(self, outputs: np.ndarray) -> str | None:
        """Most likely class name for classifiers (k == len(class_names) > 1); None for regressors."""
        if len(self.class_names) > 1 and len(self.class_names) == outputs.shape[-1]:
            return self.class_names[int(np.argmax(outputs))]
        return None

    def predicted_labels(self, outputs: np.ndarray) -> list[str | None]:
        """:meth:`predicted_label` for a whole batch ``float32[b, k]`` with one argmax."""
        if len(self.class_names) > 1 and len(self.class_names) == outputs.shape[-1]:
            return [self.class_names[i] for i in outputs.argmax(axis=1).tolist()]
        return [None] * len(outputs)

    def error(self, outputs: np.ndarray, labels: dict[str, float | None] | None) -> float | None:
        """Live error of one answer given the event's labels (None when the event carries none).

        Why this rule: one scalar comparable between two versions of the same model. Regressors and
        single-output scores use the squared error; classifiers use ``1 - p(true class)`` where the
        label is the class index.
        """
        if not labels or self.target_label is None:
            return None
        y = labels.get(self.target_label)
        if y is None or not math.isfinite(float(y)):
            return None
        if outputs.shape[-1] == 1:
            return float((float(outputs[0]) - float(y)) ** 2)
        idx = int(y)
        if 0 <= idx < outputs.shape[-1]:
            return float(1.0 - float(outputs[idx]))
        return None

    def signature_metadata(self) -> dict[str, Any]:
        """The TF Serving ``signature_def`` of this version (for GET .../metadata)."""
        return {
            "signature_def": {
                "signature_def": {
                    SIGNATURE: {
                        "inputs": {"x": {"dtype": "DT_FLOAT", "name": "serving_default_x:0",
                                         "tensor_shape": {"dim": [{"size": "-1", "name": ""},
                                                                  {"size": str(self.n_features), "name": ""}],
                                                          "unknown_rank": False}}},
                        "outputs": {"outputs": {"dtype": "DT_FLOAT", "name": "StatefulPartitionedCall:0",
                                                "tensor_shape": {"dim": [{"size": "-1", "name": ""},
                                                                         {"size": str(self.n_outputs),
                                                                          "name": ""}],
                                                                 "unknown_rank": False}}},
                        "method_name": "tensorflow/serving/predict",
                    }
                }
            }
        }


def configure_tf_threads(threads: int) -> bool:
    """Limit TensorFlow's op thread pools (intra and inter) to ``threads``; False if TF already ran.

    Why: serving models are small and each batch is one signature call, so a thread pool adds
    hand-off cost and, on a shared CPU, lets one batch's ops wait behind other processes. Measured on
    the 2-core dev box: a 64->32->2 MLP on 256 rows took 0.31 ms per call single-threaded against
    0.54-1.09 ms with the default pools. The first import goes through serving.tfimport (no Keras).
    """
    from serving.tfimport import import_tensorflow

    tf = import_tensorflow()

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow was initialised already (e.g. a test process); keep its pools
        log.debug("TensorFlow already initialised; thread pools left as they are")
        return False
    return True


def _resolve_featurizer(meta: dict[str, Any]) -> tuple[Any | None, str | None]:
    spec = meta.get("featurizer")
    if not isinstance(spec, dict) or not spec.get("kind"):
        return None, "metadata.json names no featurizer; send feature vectors"
    try:
        from streaming.features import get_featurizer

        return get_featurizer(str(spec["kind"]), spec.get("version")), None
    except Exception as exc:  # unknown kind/version or the features package missing
        return None, f"featurizer {spec.get('kind')}/{spec.get('version')} unavailable: {exc}"


def load_version(registry: ModelRegistry, name: str, version: int,
                 warmup_inputs: list[np.ndarray] | None = None) -> LoadedVersion:
    """Verify, load and warm up ``name``/``version``; raises ModelLoadError if any step fails.

    Warm-up runs the real signature on recorded recent inputs (or one zero row) and checks the
    output shape and that every value is finite, so a version that loads but computes garbage
    (e.g. NaN weights) is refused before it answers anybody.
    """
    started = time.monotonic()
    try:
        meta = registry.verify(name, version)
    except Exception as exc:
        raise ModelLoadError(f"version: {name}/{version} failed verification: {exc}") from exc
    try:
        import tensorflow as tf

        loaded = tf.saved_model.load(str(registry.version_dir(name, version)))
        fn = loaded.signatures[SIGNATURE]
        in_spec = fn.structured_input_signature[1]["x"]
        out_spec = fn.structured_outputs["outputs"]
        n_features = int(in_spec.shape[-1])
        n_outputs = int(out_spec.shape[-1])
    except Exception as exc:  # TF raises many types for damaged exports (DecodeError, NotFound, ...)
        raise ModelLoadError(
            f"version: {name}/{version} could not be loaded as a SavedModel with a '{SIGNATURE}' signature "
            f"taking x: float32[None, n] ({type(exc).__name__}: {str(exc)[:300]}); re-export it"
        ) from exc
    featurizer, feat_error = _resolve_featurizer(meta)
    if featurizer is not None and int(featurizer.n_features) != n_features:
        raise ModelLoadError(
            f"version: {name}/{version} takes {n_features} features but its featurizer "
            f"{featurizer.kind}/{featurizer.version} makes {featurizer.n_features}; re-export the model"
        )
    target = meta.get("target")
    if target is None and featurizer is not None and getattr(featurizer, "label_names", None):
        target = featurizer.label_names[0]
    lv = LoadedVersion(
        name=name, version=int(version), metadata=meta, n_features=n_features, n_outputs=n_outputs,
        class_names=[str(c) for c in meta.get("class_names") or []], featurizer=featurizer,
        featurizer_error=feat_error, target_label=str(target) if target is not None else None,
        loaded_at=time.time(), _loaded=loaded, _fn=fn,
        input_range=InputRange.from_metadata(meta, n_features),
    )
    rows = [r for r in (warmup_inputs or []) if r.shape == (n_features,)]
    x = np.stack(rows).astype(np.float32) if rows else np.zeros((1, n_features), np.float32)
    try:
        out = lv.predict(x)
    except Exception as exc:
        raise ModelLoadError(f"version: {name}/{version} failed warm-up on {len(x)} inputs: {exc}") from exc
    if out.shape != (len(x), n_outputs) or not np.all(np.isfinite(out)):
        raise ModelLoadError(
            f"version: {name}/{version} warm-up produced shape {out.shape} (want {(len(x), n_outputs)}) "
            "or non-finite outputs; re-train or re-export it"
        )
    log.info("loaded %s/%d (%d features -> %d outputs) in %.2fs, warmed on %d inputs",
             name, version, n_features, n_outputs, time.monotonic() - started, len(x))
    return lv
