"""Model specs: everything the trainer needs to know about one model, and where specs come from.

A spec bundles the feature spec (featurizer kind + version), a Keras model builder, the loss and
metrics, how targets are made from the store's label columns, the primary metric and its
direction, and the fixed training budget. The trainer, the gate, the reproduce command and the
shared check suite only talk to specs, so adding a model never means editing the trainer.

Where specs come from (later sources override earlier ones with the same name):

1. the built-ins of :mod:`trainer.specs` (``weblog_classifier``, ``sensor_forecaster``, ``digits_cnn``);
2. Python entry points of group ``streamlearn.models`` (``name = "pkg.module:SPEC"``), so an
   installed package can add a model without forking streamlearn;
3. ``settings.model_specs`` (the ``[models]`` table of the config file: ``name = "module:attr"``).

The attribute may be a :class:`ModelSpec` or a zero-argument callable returning one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from trainer.exceptions import SpecError

if TYPE_CHECKING:  # TensorFlow is imported lazily so `streamlearn --help` stays fast.
    import keras

    from streaming.config import Settings

ENTRY_POINT_GROUP = "streamlearn.models"
Task = Literal["classification", "regression"]
Direction = Literal["max", "min"]


@dataclass(frozen=True)
class FeatureInfo:
    """What a model needs to know about its featurizer (from ``get_featurizer(kind, version)``)."""

    kind: str
    version: str
    n_features: int
    input_shape: tuple[int, ...]
    label_names: tuple[str, ...]
    feature_names: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version, "n_features": self.n_features,
                "input_shape": list(self.input_shape), "label_names": list(self.label_names),
                "feature_names": list(self.feature_names)}


@dataclass(frozen=True)
class ModelSpec:
    """One trainable model. Builders and factories are called fresh for every training run.

    ``build(features, seed)`` returns an *uncompiled* ``keras.Model`` whose input is
    ``(None, features.n_features)`` (reshape inside the model, see :func:`trainer.specs.common.inputs`)
    and whose single output is ``(None, len(output_names))``.

    ``make_targets(columns)`` maps the store's label columns (float64 arrays with NaN for "unknown")
    to the ``y`` array the loss expects; rows whose ``label`` is NaN are dropped *before* it is called.

    ``score(y, outputs)`` computes the primary metric with numpy on held-out data (the gate and the
    reproduce command use it); ``direction`` says whether higher ("max") or lower ("min") is better.

    Example: a linear forecaster of the sensor's next change, as a user's module would declare it
    for ``--config`` or an entry point (the test suite runs this)::

        >>> import keras
        >>> import numpy as np
        >>> from trainer.specs import common, guard
        >>> def build(features, seed):
        ...     x, h = guard.guarded_inputs(features)  # clipped, standardized inputs
        ...     return keras.Model(x, keras.layers.Dense(1, name="outputs")(h))
        >>> spec = ModelSpec(
        ...     name="my_linear", featurizer_kind="sensor", featurizer_version=None,
        ...     label="next_value_delta", task="regression", build=build, adapt=guard.guard_adapter(),
        ...     loss=lambda: keras.losses.Huber(), metrics=lambda: [],
        ...     make_targets=common.column_targets("next_value_delta"), score=common.forecast_mae,
        ...     primary_metric="mae", direction="min", output_names=["next_value_delta"], baseline="zero")
        >>> features = spec.features()  # the current sensor featurizer, shared with serving
        >>> model = spec.build(features, spec.seed)
        >>> model.input_shape == (None, features.n_features), model.output_shape
        (True, (None, 1))
        >>> spec.improvement(candidate=0.4, reference=0.5) > 0  # lower MAE is better
        True
    """

    name: str
    featurizer_kind: str
    featurizer_version: str | None
    label: str
    task: Task
    build: Callable[[FeatureInfo, int], keras.Model]
    loss: Callable[[], Any]
    metrics: Callable[[], list[Any]]
    make_targets: Callable[[dict[str, np.ndarray]], np.ndarray]
    score: Callable[[np.ndarray, np.ndarray], float]
    primary_metric: str
    direction: Direction
    output_names: Sequence[str]
    class_names: Sequence[str] | None = None
    #: optional ``adapt(model, x_train)`` run on a cold start only (e.g. a Normalization layer).
    adapt: Callable[[Any, np.ndarray], None] | None = None
    #: optional ``after_fit(model, x_train, y_train)`` run after every fit (warm or cold), e.g. to
    #: store exemplars in non-trainable weights (:mod:`trainer.specs.exemplars`).
    after_fit: Callable[[Any, np.ndarray, np.ndarray], None] | None = None
    aux_labels: Sequence[str] = ()
    epochs: int = 3
    #: training runs at least this many gradient steps (more epochs on small data), see training.epoch_budget.
    min_train_steps: int = 0
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 1234
    #: noise floor of the gate, relative to |reference score|: a candidate must beat the current
    #: version and the baseline by more than max(this * |reference|, GATE_Z * paired bootstrap SE).
    gate_tolerance: float = 0.005
    #: cap of the reservoir of older batches mixed into each retrain.
    reservoir_batches: int = 20
    #: new rows trained on directly per version (newest batches first); older new batches only enter
    #: the reservoir. Bounds one retrain's memory (~rows x n_features x 4 bytes) when the stream
    #: outruns the trainer (trainer.data.direct_count).
    max_new_rows: int = 50_000
    #: newest batches held out at least (trained on by the next version; see min_holdout_rows).
    holdout_batches: int = 1
    #: the holdout grows (newest batches first) until it holds max(min_holdout_rows,
    #: holdout_fraction * new rows) rows; see docs/MODELS.md "The gate" for why these numbers.
    min_holdout_rows: int = 200
    holdout_fraction: float = 0.2
    #: what the gate compares against on the same rows: "prior" (class prior of the training rows;
    #: its argmax is the majority class), "zero" (persistence when the target is a change from the
    #: last value), "mean" (training mean of the target); "auto": prior for classifiers, mean else.
    baseline: Literal["auto", "prior", "zero", "mean"] = "auto"
    #: weight training rows by inverse class frequency (rare classes, balanced-accuracy metrics).
    balance_classes: bool = False
    #: let a trainer process re-use the compiled model of its previous run, reset to a fresh build's
    #: state (trainer.model_cache); False for a spec whose layers keep Python-side state that
    #: training changes, which such a reset cannot restore (docs/TRAINER_REUSE.md).
    reuse_model: bool = True
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def improvement(self, candidate: float, reference: float) -> float:
        """How much better ``candidate`` is than ``reference`` (positive: better), in metric units."""
        return candidate - reference if self.direction == "max" else reference - candidate

    def baseline_kind(self) -> str:
        """The resolved baseline: "prior", "zero" or "mean"."""
        if self.baseline != "auto":
            return self.baseline
        return "prior" if self.task == "classification" else "mean"

    def features(self) -> FeatureInfo:
        """Resolve the featurizer this spec trains on (its registered n_features and input_shape)."""
        get_featurizer = _get_featurizer()
        try:
            fz = get_featurizer(self.featurizer_kind, self.featurizer_version)
        except Exception as exc:  # UnknownKindError / UnknownFeaturizerError from streaming.features
            raise SpecError(
                f"featurizer_kind/featurizer_version: model {self.name!r} needs featurizer "
                f"{self.featurizer_kind!r} {self.featurizer_version or '(current)'}: {exc}"
            ) from exc
        return FeatureInfo(fz.kind, fz.version, int(fz.n_features), tuple(int(d) for d in fz.input_shape),
                           tuple(fz.label_names), tuple(str(n) for n in getattr(fz, "feature_names", ())))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "task": self.task, "label": self.label, "aux_labels": list(self.aux_labels),
                "primary_metric": self.primary_metric, "direction": self.direction,
                "output_names": list(self.output_names),
                "class_names": list(self.class_names) if self.class_names is not None else None,
                "epochs": self.epochs, "min_train_steps": self.min_train_steps, "batch_size": self.batch_size,
                "learning_rate": self.learning_rate,
                "seed": self.seed, "gate_tolerance": self.gate_tolerance,
                "reservoir_batches": self.reservoir_batches, "max_new_rows": self.max_new_rows,
                "holdout_batches": self.holdout_batches,
                "min_holdout_rows": self.min_holdout_rows, "holdout_fraction": self.holdout_fraction,
                "baseline": self.baseline_kind(), "balance_classes": self.balance_classes}


def _get_featurizer() -> Callable[..., Any]:
    try:
        from streaming.features import get_featurizer
    except ImportError:  # pragma: no cover - the package __init__ re-exports it per the contract
        from streaming.features.base import get_featurizer
    return get_featurizer


def _import_target(target: str, origin: str) -> ModelSpec:
    """Import ``module:attr`` and return the spec it names (calling it when it is a factory)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise SpecError(f"{origin}: {target!r} must look like 'package.module:ATTRIBUTE'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"{origin}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?") from exc
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the plugin's own code failed while importing
        raise SpecError(f"{origin}: importing module {module_name!r} failed: {type(exc).__name__}: "
                        f"{str(exc)[:300]}; fix the plugin") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise SpecError(f"{origin}: module {module_name!r} has no attribute {attr!r}") from exc
    if not isinstance(obj, ModelSpec) and callable(obj):
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001 - a plugin's factory that raises
            raise SpecError(f"{origin}: {target!r} raised {type(exc).__name__}: {str(exc)[:300]}; fix the "
                            "plugin") from exc
    if not isinstance(obj, ModelSpec):
        raise SpecError(f"{origin}: {target!r} is a {type(obj).__name__}, not a trainer.spec.ModelSpec")
    return obj


def _entry_point_targets() -> dict[str, str]:
    out: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        out[ep.name] = ep.value
    return out


def spec_sources(settings: Settings | None = None) -> dict[str, str]:
    """``{model name: "module:attr"}`` of every known spec, built-ins first, config last."""
    from trainer.specs import BUILTIN_SPECS

    sources = dict(BUILTIN_SPECS)
    sources.update(_entry_point_targets())
    if settings is not None:
        sources.update(settings.model_specs)
    return sources


def load_spec(name: str, settings: Settings | None = None) -> ModelSpec:
    """The spec of model ``name`` (raises SpecError listing the known names when unknown)."""
    sources = spec_sources(settings)
    if name not in sources:
        raise SpecError(
            f"model: unknown model {name!r}; known: {sorted(sources)}. Add one with an entry point in group "
            f"{ENTRY_POINT_GROUP!r} or a [models] line 'name = \"module:attr\"' in the config file"
        )
    spec = _import_target(sources[name], f"model {name!r}")
    if spec.name != name:
        raise SpecError(f"model {name!r}: its spec calls itself {spec.name!r}; make the names agree")
    return spec


def all_specs(settings: Settings | None = None) -> list[ModelSpec]:
    return [load_spec(name, settings) for name in sorted(spec_sources(settings))]
