"""Warm standby for serving (streaming/standby.py, docs/STANDBY.md).

The lock tests are cheap (no Kafka, no TensorFlow). One slow test runs a real pair of
`streamlearn serve --standby` processes on the session broker, kills the active one with -9 under
load and checks that the standby answers, with no request lost or answered twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from streaming.config import Settings
from streaming.exceptions import MemberSlotBusyError
from streaming.members import Lease, instance_id, local_entries, members_dir
from streaming.standby import Standby, claim_or_standby
from streaming.topics import predictions_topic
from streamlearn.status import serving_roles, worker_rows
from tests.helpers import read_topic, streamlearn_cmd, subprocess_env, wait_until

GROUP = "standby-test-group"


def _in_thread(standby: Standby, stop: threading.Event) -> tuple[threading.Thread, list[Lease | None]]:
    out: list[Lease | None] = []
    thread = threading.Thread(target=lambda: out.append(standby.wait_active(stop, tick_s=0.05)), daemon=True)
    thread.start()
    return thread, out


def test_same_command_pairs_up_active_and_standby_per_slot(settings: Settings) -> None:
    held: list[Any] = []
    try:
        for _ in range(4):
            held.append(claim_or_standby(settings, GROUP, "serve-x"))
        kinds = [(type(c).__name__, c.slot) for c in held]
        assert kinds == [("Lease", 0), ("Standby", 0), ("Lease", 1), ("Standby", 1)]
        with pytest.raises(MemberSlotBusyError, match="slot 0 .* active and a standby"):
            claim_or_standby(settings, GROUP, "serve-x", slot=0)
        states = {(e["slot"], e["state"]) for e in local_entries(settings, GROUP) if e["alive"]}
        assert states == {(0, "active"), (0, "standby"), (1, "active"), (1, "standby")}
        standby = [e for e in local_entries(settings, GROUP) if e["state"] == "standby"]
        assert all(e["instance_id"] is None and e["standby_for"] for e in standby), standby
    finally:
        for c in held:
            c.release(leave=False) if isinstance(c, Lease) else c.release()


def test_standby_takes_the_slot_when_the_active_one_releases_it_and_stop_ends_the_wait(settings: Settings) -> None:
    active = claim_or_standby(settings, GROUP, "serve-x")
    standby = claim_or_standby(settings, GROUP, "serve-x")
    assert isinstance(active, Lease) and isinstance(standby, Standby)
    stop = threading.Event()
    thread, out = _in_thread(standby, stop)
    active.release(leave=False)
    thread.join(timeout=10)
    assert out and out[0] is not None, "the standby did not take over the released slot"
    lease = out[0]
    try:
        assert (lease.slot, lease.instance_id) == (0, instance_id(settings, GROUP, 0))
        entries = [e for e in local_entries(settings, GROUP) if e["alive"]]
        assert [(e["slot"], e["state"]) for e in entries] == [(0, "active")], entries
        # the next process of the same command becomes the new standby; stop ends its wait with no lease
        second = claim_or_standby(settings, GROUP, "serve-x")
        assert isinstance(second, Standby) and second.slot == 0
        stop2 = threading.Event()
        thread2, out2 = _in_thread(second, stop2)
        stop2.set()
        thread2.join(timeout=10)
        assert out2 == [None]
        second.release()
    finally:
        lease.release(leave=False)


HOLDER = textwrap.dedent("""
    import sys, time
    from streaming import config
    from streaming.standby import claim_or_standby
    lease = claim_or_standby(config.load({"home": sys.argv[1]}), sys.argv[2], "serve-x", slot=0)
    print("held", flush=True)
    sys.stdin.read()  # until killed
""")


def test_kill_9_of_the_holder_wakes_the_standby(settings: Settings) -> None:
    """The kernel drops the flock of a process killed with -9; the blocked standby gets it at once."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(settings.home), GROUP], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=subprocess_env(settings, PYTHONPATH=str(Path.cwd())))
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
        standby = claim_or_standby(settings, GROUP, "serve-x")
        assert isinstance(standby, Standby) and standby.active_pid() == proc.pid
        # what `streamlearn status` shows for the pair
        assert serving_roles(settings) == {proc.pid: "active", os.getpid(): "standby (loading)"}
        standby.set_status(ready=True, version=3)
        services = [{"name": "serve-x", "pid": proc.pid, "state": "running", "started_unix_s": 1.0},
                    {"name": "serve-x-standby", "pid": os.getpid(), "state": "running", "started_unix_s": 1.0}]
        rows = worker_rows(settings, {"services": services}, True, kafka=False)
        assert [r.state for r in rows] == ["alive, active", "alive, standby (warm v3)"]
        stop = threading.Event()
        thread, out = _in_thread(standby, stop)
        assert not out, "took over a slot whose holder lives"
        proc.kill()
        thread.join(timeout=10)
        assert out and out[0] is not None
        out[0].release(leave=False)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert not (members_dir(settings, GROUP) / "slot0.standby.json").exists()


# -- the real pair -------------------------------------------------------------------------------------

MODEL = "standby_m"


def _roles(settings: Settings) -> dict[str, int]:
    group = settings.group(f"serving.{MODEL}")
    return {str(e["state"]) + ("-ready" if e.get("ready") else ""): int(e["pid"])
            for e in local_entries(settings, group) if e["alive"]}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_kill_9_of_the_active_server_the_warm_standby_answers_exactly_once(settings: Settings,
                                                                          tmp_path: Path) -> None:
    """Slow (two TensorFlow processes: 27 s at load 5, 70-120 s at load 10-19 on 2 cores): one test on purpose.

    The standby holds no group member while the active server lives, picks up a version promoted while
    it waits, answers after the active one is killed with -9 (same slot: the zombie's transaction is
    fenced), every request is answered exactly once, and the restarted process becomes the new standby.
    """
    from schemas.registry import open_registry
    from schemas.serde import AvroDeserializer
    from serving.client import ensure_model_topics
    from streaming.members import describe_group
    from streaming.model_registry import ModelRegistry
    from tests.serving_helpers import GroupProgress, RequestLoad, assert_each_answered_once, publish

    registry = ModelRegistry(settings.model_dir)
    publish(registry, MODEL, tag=1.0)
    ensure_model_topics(settings, MODEL)
    env = subprocess_env(settings)
    logs = [open(tmp_path / f"serve{i}.log", "wb") for i in range(3)]  # noqa: SIM115 - closed below
    procs = [subprocess.Popen(streamlearn_cmd("serve", MODEL, "--standby"), env=env, stdout=logs[i],
                              stderr=subprocess.STDOUT) for i in range(2)]
    def tail() -> str:
        return "\n".join(f"--- serve{i}\n" + (tmp_path / f"serve{i}.log").read_text(errors="replace")[-2000:]
                         for i in range(3))

    progress = GroupProgress(settings, MODEL)
    load = RequestLoad(settings, MODEL, "s", 7)
    group = settings.group(f"serving.{MODEL}")
    try:
        load.start()
        wait_until(lambda: {"active", "standby-ready"} <= set(_roles(settings)), timeout=240, interval=0.2,
                   message="an active server and a warm standby")
        roles = _roles(settings)
        wait_until(lambda: progress.done() > 20, timeout=120, interval=0.2, message=f"answers\n{tail()}")
        _state, members = describe_group(settings, group)
        assert [m.pid for m in members] == [roles["active"]], (members, roles)  # the standby consumes nothing
        publish(registry, MODEL, tag=2.0)  # promoted while the standby waits: it loads it before taking over
        standby_info = members_dir(settings, group) / "slot0.standby.json"
        wait_until(lambda: b'"version": 2' in standby_info.read_bytes(), timeout=120, interval=0.2,
                   message="the standby to load v2")
        active = next(p for p in procs if p.pid == roles["active"])
        active.kill()  # SIGKILL: the open transaction is left behind
        active.wait(timeout=10)
        seen = progress.done()
        wait_until(lambda: progress.done() > seen + 20, timeout=60, interval=0.1,
                   message=f"answers by the standby after the kill\n{tail()}")
        assert _roles(settings) == {"active": roles["standby-ready"]}
        restarted = subprocess.Popen(streamlearn_cmd("serve", MODEL, "--standby"), env=env, stdout=logs[2],
                                     stderr=subprocess.STDOUT)
        procs.append(restarted)
        # its role is decided before it loads TensorFlow (the model load was shown above already)
        wait_until(lambda: restarted.pid in (_roles(settings).get("standby"), _roles(settings).get("standby-ready")),
                   timeout=60, interval=0.2, message=f"the restarted process to become the standby\n{tail()}")
        assert _roles(settings).get("active") == roles["standby-ready"]
        load.stop()
        wait_until(lambda: progress.done() >= progress.total(), timeout=120, interval=0.2,
                   message="every request consumed")
    finally:
        load.stop()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        progress.close()
        for f in logs:
            f.close()
    answers = read_topic(settings, predictions_topic(settings, MODEL), decode=False, expect=len(load.sent),
                         timeout=120)
    answers = [(r.key.decode(), r.raw) for r in answers]
    assert_each_answered_once([rid for rid, _ in answers], load.sent)
    decode = AvroDeserializer(open_registry(settings.registry_url, settings.registry_dir))
    versions = [decode(v).value["model_version"] for _, v in answers]
    assert versions[-1] == 2 and all(v in (1, 2) for v in versions)


def test_up_starts_a_standby_twin_per_server_and_scales_them_together() -> None:
    from streaming import config
    from streamlearn.scaling import base_name, expand, group_of
    from streamlearn.stack import default_services

    s = config.load({"home": "/tmp/x"}, environ={})
    assert s.up_standby and not s.serve_standby
    plain = default_services(s, 9100, gateway=False)
    assert all("--standby" not in x.args for x in plain)  # compose and the demo run no standby
    services = expand(default_services(s, 9100, gateway=False, standby=True), {"serve.digits_cnn": 2})
    pair = [x for x in services if base_name(x.name) == "serve-digits_cnn"]
    assert sorted(x.name for x in pair) == ["serve-digits_cnn", "serve-digits_cnn-2", "serve-digits_cnn-standby",
                                            "serve-digits_cnn-standby-2"]
    assert {tuple(x.args) for x in pair} == {("serve", "digits_cnn", "--standby")}  # one command: roles swap freely
    assert {group_of(x.name) for x in pair} == {"serve.digits_cnn"}
    ports = [x.metrics_port for x in services if x.metrics_port]
    assert len(ports) == len(set(ports))
