"""Every model spec (the three built-ins and a user's custom one) passes the shared check suite."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from streaming import config
from streaming.features import get_featurizer
from trainer.checks import check_spec
from trainer.exceptions import SpecCheckError, SpecError
from trainer.spec import all_specs, load_spec, spec_sources

CUSTOM = {"tiny_linear": "tests.custom_spec_module:SPEC"}


@pytest.fixture()
def local_settings(tmp_path: Path) -> config.Settings:
    return config.load({"home": tmp_path}, environ={}).with_(model_specs=CUSTOM)


@pytest.mark.parametrize("name", ["weblog_classifier", "sensor_forecaster", "digits_cnn", "tiny_linear"])
def test_shared_checks_pass(name: str, local_settings: config.Settings) -> None:
    spec = load_spec(name, local_settings)
    check_spec(spec)
    fz = get_featurizer(spec.featurizer_kind, spec.featurizer_version)
    assert spec.features().n_features == fz.n_features


def test_builtins_are_listed_with_their_featurizers(local_settings: config.Settings) -> None:
    names = {s.name: s.featurizer_kind for s in all_specs(local_settings)}
    assert names == {"weblog_classifier": "weblog", "sensor_forecaster": "sensor", "digits_cnn": "image",
                     "tiny_linear": "sensor"}


def test_a_spec_with_the_wrong_output_width_fails_the_checks() -> None:
    spec = load_spec("digits_cnn")
    broken = dataclasses.replace(spec, output_names=["a", "b"], class_names=["a", "b"])
    with pytest.raises(SpecCheckError, match=r"output shape \(None, 10\) != \(None, 2\)"):
        check_spec(broken)


def test_a_nondeterministic_builder_fails_the_checks() -> None:
    spec = load_spec("sensor_forecaster")
    counter = iter(range(100))

    def build(features, seed):  # type: ignore[no-untyped-def]
        return spec.build(features, seed + next(counter))  # a different seed every call

    with pytest.raises(SpecCheckError, match="same seed did not give the same weights"):
        check_spec(dataclasses.replace(spec, build=build))


def test_entry_point_specs_are_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "custom_models-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: custom-models\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[streamlearn.models]\ntiny_ep = tests.custom_spec_module:tiny_ep_spec\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert spec_sources()["tiny_ep"] == "tests.custom_spec_module:tiny_ep_spec"
    assert load_spec("tiny_ep").name == "tiny_ep"


def test_unknown_and_malformed_specs_say_what_to_do(local_settings: config.Settings) -> None:
    with pytest.raises(SpecError, match="unknown model 'nope'.*entry point"):
        load_spec("nope", local_settings)
    bad = local_settings.with_(model_specs={"x": "no_colon_here"})
    with pytest.raises(SpecError, match="package.module:ATTRIBUTE"):
        load_spec("x", bad)
    wrong = local_settings.with_(model_specs={"x": "tests.custom_spec_module:SPEC"})
    with pytest.raises(SpecError, match="calls itself 'tiny_linear'"):
        load_spec("x", wrong)
