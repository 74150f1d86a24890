"""kill -9 of a trainer during training and during export leaves the registry consistent.

The trainer runs in a subprocess (``python -c`` of :data:`SCRIPT`); the test waits for the
phase to begin (TensorBoard run directory = training, registry staging directory = export) and
sends SIGKILL. Afterwards: every listed version verifies, the promoted version is unchanged, the
dead writer's staging directory is cleaned, and a fresh trainer publishes the next version.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.generators import digits
from streaming import config
from streaming.model_registry import ModelRegistry
from streaming.store import FeatureStore
from tests.helpers import ROOT, wait_until
from trainer.synthetic import write_batches

SCRIPT = r"""
import dataclasses, sys
from streaming import config
from trainer.spec import load_spec
from trainer.worker import Trainer
settings = config.load({"home": sys.argv[1]}, environ={})
spec = dataclasses.replace(load_spec("digits_cnn"), epochs=int(sys.argv[2]), min_holdout_rows=60)
print("version", Trainer(settings, spec, events=False).run_once("test").version, flush=True)
"""


def run_trainer(home: Path, epochs: int) -> subprocess.Popen[str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("STREAMLEARN_")}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(home), str(epochs)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with 4 digit batches in the store and version 1 promoted (trained on 3 of them)."""
    home = tmp_path_factory.mktemp("crash") / "home"
    settings = config.load({"home": home}, environ={})
    store = FeatureStore(settings.feature_store)
    recs = list(digits(300, seed=3))
    write_batches(store, "image", recs[:180], batch_size=60, topic="image.raw")
    proc = run_trainer(home, 1)
    out, err = proc.communicate(timeout=280)
    assert proc.returncode == 0, err[-2000:]
    write_batches(store, "image", recs[180:], batch_size=60, topic="image.raw", first_offset=180,
                  created_at_ms=1_700_000_000_100)
    return home


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["training", "export"])
def test_kill_9_leaves_registry_consistent(trained_home: Path, tmp_path: Path, phase: str) -> None:
    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    settings = config.load({"home": home}, environ={})
    reg = ModelRegistry(settings.model_dir)
    mdir = settings.model_dir / "digits_cnn"
    assert reg.promoted("digits_cnn") == 1 and reg.versions("digits_cnn") == [1]

    def in_phase() -> bool:
        if phase == "training":
            tb = mdir / "tensorboard"
            return tb.is_dir() and any(p.name.startswith(".run-") and any(p.rglob("events.*")) for p in tb.iterdir())
        return any(p.name.startswith(".tmp-") and any(p.iterdir()) for p in mdir.iterdir())

    # many epochs make the training phase long; the export phase follows a 1-epoch run
    proc = run_trainer(home, 200 if phase == "training" else 1)
    try:
        wait_until(in_phase, timeout=240, interval=0.005, message=f"trainer to reach {phase}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    for version in reg.versions("digits_cnn"):
        reg.verify("digits_cnn", version)
    if reg.versions("digits_cnn") == [1]:
        assert reg.promoted("digits_cnn") == 1  # the normal case: killed before the atomic rename
    else:  # the kill landed just after the rename: the complete version must carry its decision
        assert reg.metadata("digits_cnn", 2)["gate"]["action"] in ("PROMOTED", "REJECTED")
    reg.clean_staging("digits_cnn")
    assert not [p for p in mdir.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    # a restarted trainer carries on from the consistent state
    proc = run_trainer(home, 1)
    out, err = proc.communicate(timeout=280)
    assert proc.returncode == 0, err[-2000:]
    assert int(out.split()[-1]) == max(reg.versions("digits_cnn"))
    for version in reg.versions("digits_cnn"):
        reg.verify("digits_cnn", version)
