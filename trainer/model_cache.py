"""Re-use of one built and compiled Keras model across the training runs of a process.

Why: a trainer run on a few thousand rows spends most of its time *tracing* TensorFlow functions,
not computing: a fresh ``spec.build`` + ``compile`` makes ``fit`` trace the train step and the
optimizer's apply again (~3 s of a ~4 s run of ``sensor_forecaster``). A :class:`ModelCache` keeps
the model of the previous run and puts it back into exactly the state a fresh build would have, so
``fit`` re-uses the traced train function (docs/TRAINER_REUSE.md).

Bit-identity with a fresh build (the determinism promise of :mod:`trainer.training`) rests on
resetting *all* state a run can read:

* every model variable (trainable, non-trainable such as the guard's statistics or the exemplar
  memory, and ``SeedGenerator`` states of dropout-like layers) to its value right after
  ``spec.build(features, seed)``, snapshotted per seed (a new seed builds a throwaway model once);
* the Python and numpy RNG states to what they were right after that build (a fresh run's
  ``adapt`` or user code sees the same random stream);
* every optimizer variable (iterations, moments, learning rate) to its value when first built
  (built here before the first ``fit``, with the very call ``fit`` would make while tracing).

The tf.data pipeline is new every run with the same seed. Outside a distribution strategy a fresh
model's first ``fit`` builds its loss, metrics and optimizer while tracing, without drawing a batch
(Keras' TF ``_maybe_symbolic_build``), so a re-used model sees the same shuffle order; inside one
it would draw a batch first, which is one reason nothing is cached there. Compiled metrics are
reset by ``fit`` at every epoch. A spec whose layers keep Python-side state
that training changes cannot be reset this way: set ``ModelSpec.reuse_model = False`` and it gets a
fresh build every run. Nothing is cached inside a ``tf.distribute`` strategy scope.

The model handed out is the cache's own object: it is valid until the next :meth:`ModelCache.checkout`
of the same spec, so a caller that keeps models side by side must not pass a cache.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainer.spec import FeatureInfo, ModelSpec


@dataclass(frozen=True)
class _Initial:
    """The state right after ``spec.build(features, seed)`` under ``set_random_seed(seed)``."""

    variables: list[np.ndarray]
    python_rng: Any
    numpy_rng: Any


@dataclass
class _Entry:
    spec: ModelSpec
    features: FeatureInfo
    weighted: bool
    run_eagerly: bool
    model: Any
    signature: list[tuple[tuple[int, ...], str]]
    optimizer_initial: list[np.ndarray]
    initial: dict[int, _Initial] = field(default_factory=dict)

    def matches(self, spec: ModelSpec, features: FeatureInfo, weighted: bool, run_eagerly: bool) -> bool:
        return (self.spec == spec and self.features == features and self.weighted == weighted
                and self.run_eagerly == run_eagerly)


def _signature(model: Any) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(int(d) for d in v.shape), str(v.dtype)) for v in model.variables]


def _values(variables: Any) -> list[np.ndarray]:
    return [np.array(v.numpy(), copy=True) for v in variables]


def _snapshot(model: Any) -> _Initial:
    return _Initial(_values(model.variables), random.getstate(), np.random.get_state())


class ModelCache:
    """At most one compiled model per spec name, re-used while spec, features and data layout match."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self.hits = 0
        self.misses = 0

    def checkout(self, spec: ModelSpec, features: FeatureInfo, seed: int, *, weighted: bool, run_eagerly: bool,
                 compile_model: Callable[[Any], None]) -> Any:
        """The model for one run, in the state of a fresh ``spec.build(features, seed)``, compiled.

        ``keras.utils.set_random_seed(seed)`` must have been called just before, as for a fresh
        build. ``compile_model(model)`` compiles a newly built model (a hit re-uses the compiled one);
        ``hits`` and ``misses`` count which of the two happened.
        """
        import keras
        import tensorflow as tf

        entry = self._entries.get(spec.name)
        usable = spec.reuse_model and not tf.distribute.has_strategy()
        if usable and entry is not None and entry.matches(spec, features, weighted, run_eagerly):
            initial = entry.initial.get(seed)
            if initial is None:  # same architecture, new seed: its initial state comes from a throwaway build
                probe = spec.build(features, seed)
                if _signature(probe) == entry.signature:
                    initial = entry.initial[seed] = _snapshot(probe)
                del probe
            if initial is not None:
                for var, value in zip(entry.model.variables, initial.variables, strict=True):
                    var.assign(value)
                for var, value in zip(entry.model.optimizer.variables, entry.optimizer_initial, strict=True):
                    var.assign(value)
                random.setstate(initial.python_rng)
                np.random.set_state(initial.numpy_rng)
                self.hits += 1
                return entry.model
            keras.utils.set_random_seed(seed)  # the probe drew from the RNGs; start the fresh build clean
        self.misses += 1
        model = spec.build(features, seed)
        initial = _snapshot(model)
        compile_model(model)
        if not usable:
            self._entries.pop(spec.name, None)
            return model
        # What the first fit's _symbolic_build would do; built here so its initial values can be kept.
        model.optimizer.build(model.trainable_variables)
        self._entries[spec.name] = _Entry(spec, features, weighted, run_eagerly, model, _signature(model),
                                          _values(model.optimizer.variables), {seed: initial})
        return model
