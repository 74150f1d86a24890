"""Distributed training (issue 16, step 5): TF_CONFIG parsing, the batch-file shard, plan agreement, and
one two-worker MultiWorkerMirroredStrategy run on the CPU against the single-process score.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ingest.sensors import generate
from streaming import config
from streaming.model_registry import ModelRegistry
from streaming.store import BatchInfo, FeatureStore
from trainer.data import DataPlan, plan_data
from trainer.distributed import Cluster, fingerprint_number, parse_tf_config, plan_fingerprint, shard
from trainer.exceptions import ClusterConfigError
from trainer.synthetic import write_batches

ROOT = Path(__file__).resolve().parents[1]
#: the 2-worker candidate's holdout MAE must be within this fraction of the single-process one.
SCORE_TOLERANCE = 0.10


def tf_config(workers: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


# -- cheap unit tests: no TensorFlow --------------------------------------------------------------

def test_parse_tf_config_accepts_workers_and_names_what_is_wrong() -> None:
    c = parse_tf_config(tf_config(["a:1", "b:2", "c:3"], 2))
    assert c == Cluster(("a:1", "b:2", "c:3"), 2) and c.size == 3 and not c.is_chief
    assert parse_tf_config(tf_config(["a:1"], 0)).is_chief
    bad = {
        "": "not set",
        "{": "not valid JSON",
        json.dumps({"task": {"type": "worker", "index": 0}}): "'cluster'",
        json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:2"]}, "task": {"type": "worker", "index": 0}}):
            "not supported",
        json.dumps({"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}): "host:port",
        json.dumps({"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}): "twice",
        json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}): "task must be",
        tf_config(["a:1", "b:2"], 2): "task.index",
        tf_config(["a:1", "b:2"], True): "task.index",  # type: ignore[arg-type]
    }
    for text, words in bad.items():
        with pytest.raises(ClusterConfigError, match="TF_CONFIG") as err:
            parse_tf_config(text)
        assert words in str(err.value), (text, str(err.value))


def test_config_reads_tf_config_and_the_timeout() -> None:
    assert config.tf_config({"TF_CONFIG": "x"}) == "x" and config.tf_config({}) == ""
    assert config.load(environ={"STREAMLEARN_DISTRIBUTED_TIMEOUT_S": "12.5"}).distributed_timeout_s == 12.5
    assert "TF_CONFIG" not in config.to_env(config.load(environ={"TF_CONFIG": "{}"}))
    with pytest.raises(config.ConfigError, match="STREAMLEARN_DISTRIBUTED_TIMEOUT_S"):
        config.load(environ={"STREAMLEARN_DISTRIBUTED_TIMEOUT_S": "0"})


def test_shard_is_round_robin_disjoint_and_complete() -> None:
    items = [f"b{i:02d}" for i in range(11)]
    for n in (1, 2, 3, 4, 11, 12):
        parts = [shard(items, i, n) for i in range(n)]
        assert sorted(x for p in parts for x in p) == items  # every batch file once, no overlap
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced to one file
        assert parts == [shard(list(items), i, n) for i in range(n)]  # a pure function of the list
    assert shard(items, 1, 3) == ["b01", "b04", "b07", "b10"]
    with pytest.raises(ValueError, match="index"):
        shard(items, 3, 3)


def _plan(ids: list[str], sha: str = "s") -> DataPlan:
    def info(i: str) -> BatchInfo:
        return BatchInfo(i, Path(f"/x/{i}.avro"), {"sha256": f"{sha}{i}"})

    return DataPlan([info(i) for i in ids[1:-1]], [info(ids[0])], [info(ids[-1])], {"cursor": ids[-2]})


def test_plan_fingerprint_changes_with_the_window_the_parent_and_the_bytes() -> None:
    base = plan_fingerprint(_plan(["a", "b", "c", "d"]), 3)
    assert base == plan_fingerprint(_plan(["a", "b", "c", "d"]), 3) and len(base) == 64
    assert base != plan_fingerprint(_plan(["a", "b", "c", "e"]), 3)
    assert base != plan_fingerprint(_plan(["a", "b", "c", "d"]), 4)
    assert base != plan_fingerprint(_plan(["a", "b", "c", "d"], sha="t"), 3)
    assert fingerprint_number(base) == float(int(base[:12], 16)) < 2 ** 53  # exact in a float64 all-reduce
    # another model or another cluster list is told apart here, not by a TensorFlow shape/group error
    named = plan_fingerprint(_plan(["a", "b", "c", "d"]), 3, model="m", workers=["h:1", "h:2"])
    assert named != plan_fingerprint(_plan(["a", "b", "c", "d"]), 3, model="n", workers=["h:1", "h:2"])
    assert named != plan_fingerprint(_plan(["a", "b", "c", "d"]), 3, model="m", workers=["h:1", "h:2", "h:3"])


# -- one two-process run (slow) -------------------------------------------------------------------

def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_workers_train_like_one_process_and_only_the_chief_publishes(tmp_path: Path) -> None:
    """SLOW (about 1-2.5 min on 2 cores: four TensorFlow imports and two short fits); one test on purpose.

    Two `train --once --distributed` processes on localhost (gRPC collectives on the CPU) train the
    test-sized sensor forecaster on a shared temp feature store; worker 1 has its own, empty model
    registry, which must stay empty (it never writes). The chief's version is gated like a
    single-process one and its holdout MAE is within SCORE_TOLERANCE of a single-process run on the
    same batches (they differ by data order and per-worker batches, not by what they learn from).
    A third process, a chief whose peer never starts, ends within its 3 s timeout with a clear
    message and publishes nothing.
    """
    from tests.distributed_spec import SPEC
    from trainer.worker import Trainer

    home = tmp_path / "home"
    store_dir = tmp_path / "features"
    write_batches(FeatureStore(store_dir), "sensor", generate(1300, n_sensors=6, seed=5), batch_size=100,
                  topic="sensor.raw")
    # One batch of worker 1's shard no longer hashes to its manifest (bit rot). It used to end that worker
    # mid-load and fail every distributed run; now every process leaves it out of the same re-planned window.
    found = FeatureStore(store_dir).batches("sensor", "live")
    damaged = plan_data(SPEC, found, None).train[1]
    with open(damaged.path, "ab") as fh:
        fh.write(b"\0")
    clean = plan_data(SPEC, [b for b in found if b.batch_id != damaged.batch_id], None)
    cfg = tmp_path / "config.toml"
    cfg.write_text('[models]\nsensor_small = "tests.distributed_spec:SPEC"\n')
    addresses = [f"127.0.0.1:{p}" for p in _free_ports(4)]
    workers, lonely = addresses[:2], addresses[2:]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMLEARN_", "TF_CONFIG"))}

    def start(name: str, tf_conf: str, timeout_s: str = "300") -> subprocess.Popen[str]:
        env = {**base, "PYTHONPATH": str(ROOT), "STREAMLEARN_CONFIG": str(cfg), "STREAMLEARN_HOME": str(home / name),
               "STREAMLEARN_FEATURE_STORE": str(store_dir), "STREAMLEARN_MODEL_DIR": str(tmp_path / f"models-{name}"),
               "STREAMLEARN_DISTRIBUTED_TIMEOUT_S": timeout_s, "TF_CONFIG": tf_conf}
        return subprocess.Popen(
            [sys.executable, "-m", "streamlearn.cli", "train", "sensor_small", "--once", "--distributed",
             "--no-events"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    started = time.monotonic()
    procs = [start(f"w{i}", tf_config(workers, i)) for i in range(2)]
    # Beside them, a chief whose second worker never starts: it must give up after its timeout.
    procs.append(start("alone", tf_config(lonely, 0), timeout_s="3"))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    dist_seconds = time.monotonic() - started
    alone_rc, _, alone_err = outs.pop()
    assert alone_rc == -9 and "did not all join within distributed_timeout_s=3 s" in alone_err, alone_err[-3000:]
    assert ModelRegistry(tmp_path / "models-alone").latest("sensor_small") is None
    for rc, _out, err in outs:
        assert rc == 0, err[-3000:]
    chief, worker = (json.loads(o.strip().splitlines()[-1]) for _, o, _ in outs)
    assert chief["role"] == "chief" and chief["version"] == 1 and chief["promote"], chief
    assert worker["role"] == "worker" and "version" not in worker
    assert worker["trained_batches"] == len(shard(clean.train, 1, 2)) == 4
    assert f"batch {damaged.batch_id}" in outs[1][2] and "Set aside, as the chief does" in outs[1][2]
    assert not any((tmp_path / "models-w1").rglob("*")), "worker 1 wrote to its model registry"

    reg = ModelRegistry(tmp_path / "models-w0")
    meta = reg.verify("sensor_small", 1)
    assert meta["trigger"] == "distributed" and reg.promoted("sensor_small") == 1
    roles = [b["role"] for b in meta["lineage"]["batches"]]
    assert roles == ["train"] * 9 + ["holdout"] * 3  # the whole window, as one process would record it
    assert damaged.batch_id not in [b["batch_id"] for b in meta["lineage"]["batches"]]

    started = time.monotonic()
    single = Trainer(config.load({"home": tmp_path / "single", "feature_store": store_dir, "metrics_port": -1}),
                     dataclasses.replace(SPEC), events=False).run_once("test")
    single_seconds = time.monotonic() - started
    s_meta = single.metadata
    assert [b["batch_id"] for b in s_meta["lineage"]["batches"]] == [b["batch_id"] for b in meta["lineage"]["batches"]]
    dist_mae, single_mae = float(meta["scores"]["candidate"]), float(s_meta["scores"]["candidate"])
    print(f"\ndistributed (2 workers): mae {dist_mae:.4f} in {dist_seconds:.1f} s wall; "
          f"single process: mae {single_mae:.4f} in {single_seconds:.1f} s (in this process, TF import included)")
    assert np.isfinite(dist_mae) and abs(dist_mae - single_mae) <= SCORE_TOLERANCE * single_mae
    assert dist_mae < float(meta["scores"]["baseline"])  # and it learned something: beats persistence
