"""The shared check suite every model spec must pass (built-in or user-supplied).

``check_spec(spec)`` trains the spec briefly on synthetic rows shaped like its featurizer's output
and raises :class:`SpecCheckError` listing every failed property:

* the featurizer resolves, and the model's input is ``(None, n_features)`` of that featurizer;
* the output is ``(None, len(output_names))`` (classifiers: one column per class name);
* the same seed builds and trains to the same weights (reproducibility);
* rows whose label is NaN are dropped before training (and targets are finite where required);
* a SavedModel export loads through the serving signature and gives the same predictions as the
  Keras model, and the warm-start weights round-trip too;
* the spec's score function gives a finite number on the model's outputs;
* input scaling is guarded: a feature that was constant in training (column ``CONSTANT_COLUMN``
  of the synthetic rows) moves the outputs by at most ``CONSTANT_FEATURE_BOUND`` when serving
  varies it over +-1e6, and inputs of +-1e30 in every feature still give finite outputs.

Run from the parametrized test ``tests/test_trainer_specs.py`` and by ``streamlearn models check``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from trainer.exceptions import SpecCheckError
from trainer.spec import FeatureInfo, ModelSpec

N_ROWS = 96
#: the synthetic training rows hold this column constant (CONSTANT_VALUE) ...
CONSTANT_COLUMN = 0
CONSTANT_VALUE = 0.5
#: ... and varying it at serving may move any output by at most this much (absolute).
CONSTANT_FEATURE_BOUND = 1e-4
PROBE_VALUES = (-1e6, -3.0, 0.0, 0.26, 1.0, 17.3, 1e6)


def synthetic_columns(spec: ModelSpec, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Label columns for ``n`` rows: valid values, with every 7th primary label unknown (NaN)."""
    if spec.task == "classification":
        k = len(spec.class_names or []) or 2
        primary = rng.integers(0, k, size=n).astype(np.float64)
    else:
        primary = rng.normal(size=n)
    primary[::7] = np.nan
    cols = {spec.label: primary}
    for name in spec.aux_labels:
        aux = rng.integers(0, 2, size=n).astype(np.float64)
        aux[::3] = np.nan
        cols[name] = aux
    return cols


def synthetic_x(features: FeatureInfo, n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=(n, features.n_features)).astype(np.float32)


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def check_spec(spec: ModelSpec, epochs: int = 1) -> None:
    """Raise SpecCheckError naming every property ``spec`` fails; return None when it passes."""
    from trainer import model_io
    from trainer.data import labelled
    from trainer.training import configure_tensorflow, predict, train_candidate

    configure_tensorflow()
    failures: list[str] = []
    if spec.task not in ("classification", "regression"):
        failures.append(f"task is {spec.task!r}; use 'classification' or 'regression'")
    if spec.direction not in ("max", "min"):
        failures.append(f"direction is {spec.direction!r}; use 'max' or 'min'")
    if spec.task == "classification" and (not spec.class_names or len(spec.class_names) != len(spec.output_names)):
        failures.append("classifiers need class_names with one entry per output column")
    features = spec.features()
    emitted = set(features.label_names)
    missing = [name for name in (spec.label, *spec.aux_labels) if name not in emitted]
    if missing:  # the synthetic columns below made them up, so the check passed and training never could
        failures.append(f"label(s) {missing} are not emitted by featurizer {features.kind}/{features.version} "
                        f"(it emits {sorted(emitted)})")
    if failures:
        raise SpecCheckError(f"model spec {spec.name!r} failed: " + "; ".join(failures))
    rng = np.random.default_rng(7)
    x = synthetic_x(features, N_ROWS, rng)
    x[:, CONSTANT_COLUMN] = CONSTANT_VALUE
    cols = synthetic_columns(spec, N_ROWS, rng)
    try:
        xt, yt = labelled(spec, x, cols)
    except Exception as exc:
        raise SpecCheckError(f"model spec {spec.name!r}: make_targets failed on valid labels: {exc}") from exc
    n_known = int(np.sum(~np.isnan(cols[spec.label])))
    if len(xt) != n_known or len(yt) != n_known:
        failures.append(f"rows with a NaN label were not dropped ({len(xt)} rows kept, {n_known} labelled)")
    if spec.task == "classification" and not np.all(np.isfinite(yt)):
        failures.append("classification targets contain NaN after dropping unlabelled rows")

    probe = spec.build(features, spec.seed)
    in_shape = tuple(probe.input_shape)
    if in_shape != (None, features.n_features):
        failures.append(f"model input shape {in_shape} != (None, {features.n_features}) of featurizer "
                        f"{features.version}")
    out_shape = tuple(probe.output_shape)
    if out_shape != (None, len(spec.output_names)):
        failures.append(f"model output shape {out_shape} != (None, {len(spec.output_names)}) (output_names)")
    if failures:  # shapes are wrong: training would only add noise to the report
        raise SpecCheckError(f"model spec {spec.name!r} failed the shared checks: " + "; ".join(failures))
    first = train_candidate(spec, features, xt, yt, seed=spec.seed, epochs=epochs, run_eagerly=True)
    second = train_candidate(spec, features, xt, yt, seed=spec.seed, epochs=epochs, run_eagerly=True)
    model = first.model
    if not _same(first.model.get_weights(), second.model.get_weights()):
        failures.append("the same seed did not give the same weights (nondeterministic builder or training)")
    if not np.isfinite(first.final_loss):
        failures.append(f"training loss is {first.final_loss} on synthetic data")

    expected = predict(model, x)
    if expected.shape != (N_ROWS, len(spec.output_names)):
        failures.append(f"predictions have shape {expected.shape}, expected {(N_ROWS, len(spec.output_names))}")
    with tempfile.TemporaryDirectory(prefix="streamlearn-check-") as tmp:
        path = Path(tmp) / "1"
        model_io.export_saved_model(model, features.n_features, path)
        loaded = model_io.SavedModelPredictor(path)
        spec_in = loaded.input_spec()
        if tuple(spec_in.shape.as_list()) != (None, features.n_features) or spec_in.dtype.name != "float32":
            failures.append(f"serving signature input is {spec_in}, expected float32[None, {features.n_features}]")
        got = loaded.predict(x)
        if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-5, rtol=1e-5):
            failures.append("SavedModel predictions differ from the Keras model's after a save/load round trip")
        fresh = spec.build(features, spec.seed + 99)
        if not model_io.load_weights(fresh, path / model_io.WEIGHTS_FILE) or not np.allclose(
                predict(fresh, x), expected, atol=1e-5, rtol=1e-5):
            failures.append("warm-start weights did not round-trip to the same predictions")
    failures += scaling_failures(model, x)
    score = spec.score(yt, predict(model, xt))
    if not np.isfinite(score):
        failures.append(f"score ({spec.primary_metric}) is {score} on the model's own outputs")
    if failures:
        raise SpecCheckError(f"model spec {spec.name!r} failed the shared checks: " + "; ".join(failures))


def scaling_failures(model: object, x: np.ndarray) -> list[str]:
    """The scaling guard checks of :func:`check_spec` on a trained ``model`` (see the module doc)."""
    from trainer.training import predict

    out: list[str] = []
    base_rows = np.repeat(x[:4], len(PROBE_VALUES), axis=0)
    probes = base_rows.copy()
    probes[:, CONSTANT_COLUMN] = np.tile(np.asarray(PROBE_VALUES, dtype=np.float32), 4)
    moved = float(np.max(np.abs(predict(model, probes) - predict(model, base_rows))))
    if not moved <= CONSTANT_FEATURE_BOUND:
        out.append(f"a feature constant in training ({CONSTANT_COLUMN}) moved the outputs by {moved:.6g} "
                   f"(> {CONSTANT_FEATURE_BOUND:g}) when varied at serving; guard the input scaling "
                   "(trainer.specs.guard.guarded_inputs + guard_adapter)")
    extreme = np.concatenate([np.full((1, x.shape[1]), 1e30, np.float32),
                              np.full((1, x.shape[1]), -1e30, np.float32)])
    if not np.all(np.isfinite(predict(model, extreme))):
        out.append("inputs of +-1e30 gave non-finite outputs; clip standardized inputs (trainer.specs.guard)")
    return out
