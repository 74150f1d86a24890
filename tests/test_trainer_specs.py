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


def test_a_label_the_featurizer_does_not_emit_fails_the_checks() -> None:
    """The checks made the label column up, so such a spec was "ok" and could never train ("hold no row
    with label ..."; a periodic trainer waited for labelled data for ever)."""
    broken = dataclasses.replace(load_spec("sensor_forecaster"), label="no_such_label")
    with pytest.raises(SpecCheckError, match=r"label\(s\) \['no_such_label'\] are not emitted by featurizer sensor/"):
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


def test_a_plugin_that_fails_is_one_failed_line_and_the_others_are_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A plugin whose import raised (or called sys.exit) ended `models check` in a traceback (or silently),
    and no model after it was checked."""
    from streamlearn.cli import main

    (tmp_path / "explode_mod.py").write_text("raise RuntimeError('plugin import exploded')\n")
    (tmp_path / "exit_mod.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "factory_mod.py").write_text("def make():\n    raise ValueError('no spec today')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[models]\nboom = "explode_mod:SPEC"\nquit = "exit_mod:SPEC"\n'
                                      'factory = "factory_mod:make"\n')
    assert main(["--home", str(home), "models", "check", "boom", "quit", "factory", "nope"]) == 1
    out = capsys.readouterr().out
    assert "boom: FAILED: " in out and "RuntimeError: plugin import exploded" in out, out
    assert "quit: FAILED: " in out and "SystemExit" in out, out
    assert "factory: FAILED: " in out and "ValueError: no spec today" in out, out
    assert "nope: FAILED: " in out and "unknown model 'nope'" in out, out
