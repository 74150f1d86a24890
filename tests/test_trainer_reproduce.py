"""`retrain --reproduce`: a version retrained from its lineage reaches the recorded score (1e-6)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ingest.generators import digits
from streaming import config
from streaming.model_registry import ModelRegistry
from streaming.store import FeatureStore
from streamlearn.cli import main
from trainer.exceptions import LineageError
from trainer.reproduce import reproduce
from trainer.spec import load_spec
from trainer.synthetic import write_batches
from trainer.worker import Trainer

# min_holdout_rows=80: test-sized streams (the default N=200 needs more data than these tests write)
DIGITS = dataclasses.replace(load_spec("digits_cnn"), epochs=2, min_holdout_rows=80)


def test_reproduce_warm_started_version_from_lineage(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    settings = config.load({"home": tmp_path / "home"}, environ={})
    store = FeatureStore(settings.feature_store)
    recs = list(digits(400, seed=2))
    write_batches(store, "image", recs[:240], batch_size=80, topic="image.raw")
    trainer = Trainer(settings, DIGITS, events=False)
    assert trainer.run_once().version == 1
    write_batches(store, "image", recs[240:], batch_size=80, topic="image.raw", first_offset=240,
                  created_at_ms=1_700_000_000_100)
    second = trainer.run_once()
    assert second.version == 2 and second.metadata["warm_started"] and second.metadata["parent_version"] == 1

    report = reproduce(settings, "digits_cnn", 2, spec=DIGITS)
    assert report["ok"] and report["abs_difference"] <= 1e-6
    assert report["max_abs_weight_difference"] <= 1e-6
    assert report["reproduced_decision"] == second.decision.action

    # the CLI path (spec from the registry of specs: the built-in has other epochs -> refused, clearly)
    monkeypatch.delenv("STREAMLEARN_CONFIG", raising=False)
    code = main(["--home", str(tmp_path / "home"), "retrain", "--reproduce", "digits_cnn/2"])
    assert code == 1 and "differ from those recorded" in capsys.readouterr().err

    # a lineage batch whose bytes changed is refused before any training
    meta = ModelRegistry(settings.model_dir).metadata("digits_cnn", 2)
    victim = settings.feature_store / meta["lineage"]["batches"][-1]["file"]
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(LineageError, match="sha256"):
        reproduce(settings, "digits_cnn", 2, spec=DIGITS)


def test_cli_reproduces_with_the_configured_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Custom spec from the config file, trained then reproduced through `streamlearn retrain`."""
    from ingest.sensors import generate

    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[models]\ntiny_linear = "tests.custom_spec_module:SPEC"\n')
    monkeypatch.delenv("STREAMLEARN_CONFIG", raising=False)
    settings = config.load({"home": home}, environ={})
    write_batches(FeatureStore(settings.feature_store), "sensor", generate(300, n_sensors=3, seed=9),
                  batch_size=100, topic="sensor.raw")
    assert main(["--home", str(home), "train", "tiny_linear", "--once", "--no-events"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the gate decides (a linear model barely beats persistence on 200 rows); both outcomes reproduce
    assert out["version"] == 1 and out["action"] in ("PROMOTED", "REJECTED")
    assert main(["--home", str(home), "retrain", "--reproduce", "tiny_linear/1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["abs_difference"] <= 1e-6
    assert main(["--home", str(home), "models", "show", "tiny_linear/1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["integrity"] == "ok" and shown["promoted"] is (out["action"] == "PROMOTED")
    assert "held-out rows" in shown["summary"] and "persistence" in shown["summary"]
    assert shown["scores"]["baseline"] is not None and shown["scores"]["eval_rows"] >= 50


def test_a_distributed_version_is_refused_before_any_work(tmp_path: Path) -> None:
    """One process retrained a distributed run's version on another row order and split: the score
    differed and the report said the gate decision would have flipped."""
    from tests.test_model_registry import fake_export
    from trainer.exceptions import ReproductionError

    settings = config.load({"home": tmp_path / "home"}, environ={})
    reg = ModelRegistry(settings.model_dir)
    reg.publish("digits_cnn", fake_export(reg, "digits_cnn"), {"trigger": "distributed", "lineage": {"batches": []}})
    with pytest.raises(ReproductionError, match="trained by a distributed run .*docs/DISTRIBUTED.md"):
        reproduce(settings, "digits_cnn", 1, spec=DIGITS)


def test_a_version_trained_before_a_store_promote_reproduces_from_the_archive(tmp_path: Path) -> None:
    """`store promote` moves live/<kind> to replaced-<time>/<kind> and a replay's batch boundaries differ,
    so reproducing any earlier version said its batches were gone (and advised a replay into live, which
    is refused)."""
    settings = config.load({"home": tmp_path / "home"}, environ={})
    write_batches(FeatureStore(settings.feature_store), "image", list(digits(240, seed=3)), batch_size=80,
                  topic="image.raw")
    assert Trainer(settings, DIGITS, events=False).run_once().version == 1
    live, archive = Path(settings.feature_store) / "live" / "image", Path(settings.feature_store) / "replaced-1"
    archive.mkdir()
    live.rename(archive / "image")  # what `store promote` does with the old live batches
    live.mkdir()  # the promoted namespace: other batches (none of the version's)
    report = reproduce(settings, "digits_cnn", 1, spec=DIGITS)
    assert report["ok"] and report["abs_difference"] <= 1e-6
