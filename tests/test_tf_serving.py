"""TF Serving reads the registry correctly: a models.config with specific versions and stable/canary labels.

The generated text is parsed with the ``tensorflow-serving-api`` protos (the format TF Serving's
``--model_config_file`` reads), so a syntax or field-name slip fails here, not in production.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from streaming.model_registry import ModelRegistry, write_json_atomic
from streaming.tf_serving import CONFIG_FILE, render_config
from streamlearn.cli import main
from tests.test_trainer_cli_models import export

model_server_config_pb2 = pytest.importorskip(
    "tensorflow_serving.config.model_server_config_pb2",
    reason="tensorflow-serving-api is a dev dependency (requirements-nodeps.lock, installed with --no-deps)")
from google.protobuf import text_format  # noqa: E402


def parse(text: str) -> dict[str, dict]:
    cfg = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    return {c.name: {"base_path": c.base_path, "platform": c.model_platform,
                     "versions": list(c.model_version_policy.specific.versions),
                     "policy": c.model_version_policy.WhichOneof("policy_choice"),
                     "labels": dict(c.version_labels)}
            for c in cfg.model_config_list.config}


def test_rejected_candidates_are_never_served(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    for seed in (1, 2, 3):  # v3 is the newest directory, a candidate the gate rejected
        export(reg, "digits_cnn", seed, 0.9, ["a"])
    reg.set_promoted("digits_cnn", 2, "gate")
    reg.record("digits_cnn", 3, "REJECTED", "worse than v2")
    export(reg, "sensor_forecaster", 1, 0.5, ["b"])  # never promoted: not served at all
    cfg = parse((reg.root / CONFIG_FILE).read_text())  # rewritten by the promotion itself
    assert set(cfg) == {"digits_cnn"}
    d = cfg["digits_cnn"]
    assert d["policy"] == "specific" and d["versions"] == [2] and d["labels"] == {"stable": 2}
    assert d["base_path"] == str((tmp_path / "models" / "digits_cnn").absolute()) and d["platform"] == "tensorflow"


def test_promotion_and_rollback_rewrite_the_config_and_canary_is_labelled(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    for seed in (1, 2, 3):
        export(reg, "m", seed, 0.9, ["a"])
    reg.set_promoted("m", 1, "first")
    reg.set_promoted("m", 2, "better")
    assert parse((reg.root / CONFIG_FILE).read_text())["m"]["labels"] == {"stable": 2}
    reg.rollback("m")
    assert parse((reg.root / CONFIG_FILE).read_text())["m"]["labels"] == {"stable": 1}
    state = reg.state("m")
    state["canary"] = 3
    write_json_atomic(reg.root / "m" / "state.json", state)
    m = parse(render_config(reg, base_path="/models/"))["m"]
    assert m["versions"] == [1, 3] and m["labels"] == {"stable": 1, "canary": 3}
    assert m["base_path"] == "/models/m"


def test_empty_registry_is_a_valid_empty_config(tmp_path: Path) -> None:
    assert parse(render_config(ModelRegistry(tmp_path / "none"))) == {}


def test_cli_prints_and_writes_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    reg = ModelRegistry(home / "models")
    export(reg, "digits_cnn", 1, 0.9, ["a"])
    reg.set_promoted("digits_cnn", 1, "first")
    assert main(["--home", str(home), "models", "tf-serving-config", "--base-path", "/models"]) == 0
    assert parse(capsys.readouterr().out)["digits_cnn"]["base_path"] == "/models/digits_cnn"
    out = tmp_path / "tfs" / "models.config"
    out.parent.mkdir()
    assert main(["--home", str(home), "models", "tf-serving-config", "-o", str(out)]) == 0
    assert parse(out.read_text())["digits_cnn"]["versions"] == [1]
    # a directory gets models.config inside it (it was a traceback); an unwritable path is one error line
    out.unlink()
    assert main(["--home", str(home), "models", "tf-serving-config", "-o", str(out.parent)]) == 0
    assert parse(out.read_text())["digits_cnn"]["versions"] == [1]
    assert main(["--home", str(home), "models", "tf-serving-config", "-o", str(tmp_path / "no" / "such")]) == 1
    assert "error: --output: cannot write" in capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == ["models.config"]  # no temporary file left
