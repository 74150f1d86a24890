"""`streamlearn models list|show|diff|promote|rollback` on a registry of small fake exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streaming import config
from streaming.model_registry import ModelRegistry
from streaming.topics import model_updates_topic
from streamlearn.cli import main
from tests.helpers import read_topic


def export(reg: ModelRegistry, name: str, seed: int, score: float, batches: list[str]) -> int:
    staging = reg.staging(name)
    (staging / "saved_model.pb").write_bytes(b"pb%d" % seed)
    (staging / "variables").mkdir()
    (staging / "variables" / "variables.index").write_bytes(b"ix%d" % seed)
    (staging / "keras").mkdir()
    with (staging / "keras" / "weights.npz").open("wb") as fh:
        np.savez(fh, w0000=np.full((2, 2), float(seed), dtype=np.float32))
    meta = {"primary_metric": "accuracy", "scores": {"candidate": score, "current": None},
            "gate": {"reason": f"score {score}"}, "featurizer": {"kind": "image", "version": "image-v1"},
            "lineage": {"batches": [{"batch_id": b, "role": "train", "sha256": "0" * 64} for b in batches]},
            "seed": 1, "parent_version": None}
    return reg.publish(name, staging, meta)


def cli(settings: config.Settings, *args: str) -> int:
    return main(["--home", str(settings.home), "--bootstrap", settings.bootstrap,
                 "--topic-prefix", settings.topic_prefix, *args])


def test_models_commands(settings: config.Settings, capsys: pytest.CaptureFixture[str]) -> None:
    reg = ModelRegistry(settings.model_dir)
    export(reg, "m", 1, 0.8, ["a", "b"])
    export(reg, "m", 2, 0.9, ["b", "c"])
    assert cli(settings, "models", "promote", "m/1", "--reason", "first") == 0
    assert cli(settings, "models", "promote", "m/2") == 0
    capsys.readouterr()
    assert cli(settings, "models", "list", "--json") == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["m"]["versions"] == [1, 2] and rows["m"]["promoted"] == 2 and rows["m"]["promoted_score"] == 0.9
    assert {"weblog_classifier", "sensor_forecaster", "digits_cnn"} <= set(rows)
    assert cli(settings, "models", "diff", "m/1", "m/2") == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff["batches"] == {"only_a": ["a"], "only_b": ["c"], "role_changed": []}
    assert diff["weights_l2_distance"] == pytest.approx(2.0)
    assert cli(settings, "models", "rollback", "m") == 0
    assert "rolled back from version 2 to 1" in capsys.readouterr().out
    assert reg.promoted("m") == 1
    assert cli(settings, "models", "show", "m") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 1 and shown["promoted"] and shown["integrity"] == "ok"
    assert [h["action"] for h in shown["history"]] == ["CREATED", "PROMOTED", "ROLLED_BACK"]
    # a damaged version is refused by promote, with the reason
    (reg.version_dir("m", 2) / "saved_model.pb").write_bytes(b"evil")
    assert cli(settings, "models", "promote", "m/2") == 1
    assert "sha256 mismatch" in capsys.readouterr().err and reg.promoted("m") == 1
    events = read_topic(settings, model_updates_topic(settings), expect=3)
    assert [(e.value["version"], e.value["action"]) for e in events] == [(1, "PROMOTED"), (2, "PROMOTED"),
                                                                         (1, "ROLLED_BACK")]
    assert events[0].value["reason"] == "first"


def test_show_of_an_unknown_model_says_how_to_train_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--home", str(tmp_path), "models", "show", "digits_cnn"]) == 1
    assert "streamlearn train digits_cnn --once" in capsys.readouterr().err
