"""Jobs of the control API: start, status, 409, cancel, the API restarted under a running job, CLI parity.

The children run through ``tests/api_hold.py`` (waits for a release file, then runs the real
``streamlearn`` command), so a job is reliably "running" while the test looks at it; everything else
(runner, process groups, signals, state files, the command's own output) is the product's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from schemas.exceptions import ConfigError
from streaming import config
from streaming.config import Settings
from streaming.fsutil import pid_alive
from streamlearn.api.app import create_app
from streamlearn.api.jobs import JobRunner, parse_outcome
from tests.helpers import ROOT, streamlearn_cmd, subprocess_env, wait_until

HOLD = str(ROOT / "tests" / "api_hold.py")
MODEL = "sensor_forecaster"


def hold_runner(settings: Settings, release: Path) -> JobRunner:
    return JobRunner(settings, cli=[sys.executable, HOLD, str(release)])


@pytest.fixture()
def local(tmp_path: Path) -> Settings:
    """Settings without a broker: held jobs never reach their command."""
    return config.load({"home": tmp_path / "home", "metrics_port": -1, "api_cancel_grace_s": 5.0,
                        "api_compact_interval_s": 0})


@pytest.fixture()
def api(local: Settings, tmp_path: Path) -> Iterator[tuple[TestClient, JobRunner, Path]]:
    release = tmp_path / "release"
    runner = hold_runner(local, release)
    with TestClient(create_app(local, runner=runner, compact=False)) as tc:
        yield tc, runner, release


def job_state(tc: TestClient, job_id: str) -> dict:
    resp = tc.get(f"/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_parse_outcome_reads_the_closing_json_and_the_error_line() -> None:
    one = 'log line\n{"model": "m", "version": 3, "promote": true}\n'
    assert parse_outcome(one) == ({"model": "m", "version": 3, "promote": True}, None)
    indented = 'x\n{\n  "recorded": 0.5,\n  "ok": true\n}\n'
    assert parse_outcome(indented)[0] == {"recorded": 0.5, "ok": True}
    assert parse_outcome("starting\nerror: not enough data; publish more\n") == (None, "not enough data; publish more")
    # the log's repeat summaries are flushed at exit, after the JSON: the job's result, version and gate were lost
    trailing = ('{"version": 3, "action": "PROMOTED"}\n2026-12-03 20:12:49 ERROR kafka.net.manager: Connection failed '
                '(3 more like this in the last 9 s; repeats are counted, not printed)\n')
    assert parse_outcome(trailing)[0] == {"version": 3, "action": "PROMOTED"}


@pytest.mark.parametrize("text", ["[1, 2]", '{"id": "x"}', "null"], ids=["list", "fields-missing", "null"])
def test_a_malformed_job_file_is_skipped_and_named_not_a_500(api: tuple[TestClient, JobRunner, Path],
                                                             local: Settings, text: str) -> None:
    """A job file that is JSON of another shape was an AttributeError in `jobs list` and a 500 of GET /jobs for
    everybody; an `"args": null` broke the CLI's list the same way. It is skipped, and its id is a 404 naming it."""
    tc, _, _ = api
    bad = "20261203T235959-00000001"
    (local.home / "jobs").mkdir(parents=True, exist_ok=True)
    (local.home / "jobs" / f"{bad}.json").write_text(text)
    assert tc.get("/jobs").status_code == 200
    shown = tc.get(f"/jobs/{bad}")
    assert shown.status_code == 404 and "unreadable" in shown.json()["error"], shown.text
    listed = subprocess.run(streamlearn_cmd("jobs", "list"), env=subprocess_env(local), capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr[-2000:]


def test_a_job_file_whose_args_is_null_is_unreadable(local: Settings) -> None:
    from streamlearn.api.jobs import Job, JobStore

    store = JobStore(local.home / "jobs")
    store.root.mkdir(parents=True)
    good = Job(id="20261203T235959-00000002", kind="train", tenant="", resource="model:m", args={}, argv=[])
    (store.root / f"{good.id}.json").write_text(json.dumps({**good.to_dict(), "args": None}))
    assert store.jobs() == []
    (store.root / f"{good.id}.json").write_text(json.dumps(good.to_dict()))
    assert [j.id for j in store.jobs()] == [good.id]


def test_train_job_status_409_cancel_and_free_again(api: tuple[TestClient, JobRunner, Path]) -> None:
    tc, runner, _ = api
    first = tc.post("/trainModel", json={"model": MODEL})
    assert first.status_code == 202, first.text
    job = first.json()["job"]
    assert job["status"] == "running" and job["argv"] == ["train", MODEL, "--once", "--namespace", "live"]
    assert first.headers["location"] == f"/jobs/{job['id']}"
    wait_until(lambda: "holding" in job_state(tc, job["id"])["log_tail"], message="the child printed")
    state = job_state(tc, job["id"])
    assert state["job"]["pid"] > 0 and state["progress"]["last_line"] == "holding"

    second = tc.post("/trainModel", json={"model": MODEL})
    assert second.status_code == 409 and second.json()["job"] == job["id"]
    assert job["id"] in second.json()["error"]

    cancelled = tc.delete(f"/jobs/{job['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["job"]["status"] == "cancelled"
    assert not pid_alive(job["pid"])
    assert runner.wait(job["id"], 10)
    final = job_state(tc, job["id"])["job"]
    assert final["status"] == "cancelled" and final["exit_code"] == -15  # SIGTERM, recorded by the monitor
    assert tc.delete(f"/jobs/{job['id']}").status_code == 409  # over already

    again = tc.post("/trainModel", json={"model": MODEL})  # the model is free again
    assert again.status_code == 202, again.text
    assert tc.delete(f"/jobs/{again.json()['job']['id']}").status_code == 200


def test_train_beside_a_leading_periodic_trainer_is_409_up_front(api: tuple[TestClient, JobRunner, Path],
                                                                 local: Settings) -> None:
    """With `up`'s trainer leading the model, a /trainModel job could only fail with "another trainer
    leads this model" after its 202; the lease is now read first. An expired lease or a dead holder's
    does not block (the run takes it over)."""
    import os

    from streaming.lease import Lease, lease_store
    from streaming.model_registry import ModelRegistry

    tc, _, _ = api
    lease = Lease(lease_store(ModelRegistry(local.model_dir), MODEL), MODEL, ttl_s=30)
    assert lease.try_acquire() == 1
    refused = tc.post("/trainModel", json={"model": MODEL})
    assert refused.status_code == 409, refused.text
    assert f"pid {os.getpid()}" in refused.json()["error"] and "periodic trainer" in refused.json()["error"]
    lease.release()
    freed = tc.post("/trainModel", json={"model": MODEL})
    assert freed.status_code == 202, freed.text
    assert tc.delete(f"/jobs/{freed.json()['job']['id']}").status_code == 200


def test_released_job_records_the_real_commands_failure(settings: Settings, tmp_path: Path) -> None:
    """The real `train --once` on an empty store exits 3; its `error:` line becomes the reason."""
    release = tmp_path / "release"
    release.touch()
    runner = hold_runner(settings.with_(api_compact_interval_s=0), release)
    with TestClient(create_app(settings, runner=runner, compact=False)) as tc:
        job = tc.post("/trainModel", json={"model": MODEL}).json()["job"]
        assert runner.wait(job["id"], 120)
        final = job_state(tc, job["id"])["job"]
    assert final["status"] == "failed" and final["exit_code"] == 3, final
    assert final["reason"] and "batch" in final["reason"].lower(), final["reason"]


def test_api_restart_marks_a_running_job_failed_and_ends_its_process(local: Settings, tmp_path: Path) -> None:
    release = tmp_path / "release"
    first = hold_runner(local, release)
    tc = TestClient(create_app(local, runner=first, compact=False))
    tc.__enter__()
    job = tc.post("/process", json={"action": "replay", "kind": "sensor", "namespace": "rebuild-1",
                                    "from_beginning": True}).json()["job"]
    assert job["status"] == "running" and pid_alive(job["pid"])
    # A second API on the same home is refused while the first one runs ...
    second = hold_runner(local, release)
    with pytest.raises(ConfigError, match="another control API runs on home"):
        second.recover()
    # ... and takes over once it "crashed" (it never shuts down its jobs; the kernel drops its lock).
    first.release_home()
    with TestClient(create_app(local, runner=second, compact=False)) as tc2:
        state = job_state(tc2, job["id"])["job"]
        assert state["status"] == "failed"
        assert state["reason"] == f"the API restarted while it ran (pid {job['pid']})"
        wait_until(lambda: not pid_alive(job["pid"]), timeout=15, message="the orphaned job's process ended")
        assert first.wait(job["id"], 10)
        assert job_state(tc2, job["id"])["job"]["status"] == "failed"  # the old monitor did not overwrite it
        # the namespace is free for the new API
        again = tc2.post("/process", json={"action": "replay", "kind": "sensor", "namespace": "rebuild-1",
                                           "from_beginning": True})
        assert again.status_code == 202, again.text
    first._procs.clear()  # its job belongs to the second API now; do not let its shutdown touch it
    tc.__exit__(None, None, None)


def test_too_many_jobs_is_429(local: Settings, tmp_path: Path) -> None:
    s = local.with_(api_max_jobs=1)
    with TestClient(create_app(s, runner=hold_runner(s, tmp_path / "release"), compact=False)) as tc:
        assert tc.post("/trainModel", json={"model": MODEL}).status_code == 202
        busy = tc.post("/process", json={"action": "replay", "kind": "weblog", "namespace": "n1",
                                         "start": "-1h", "end": "now"})
        assert busy.status_code == 429 and busy.headers["retry-after"] and "api_max_jobs" in busy.json()["error"]


def test_one_tenant_cannot_take_every_job_slot(local: Settings, tmp_path: Path) -> None:
    """Four replays of one tenant answered every other tenant's /process and /trainModel 429."""
    from schemas.access import load_keys

    s = local.with_(api_max_jobs=3)
    keys = load_keys("acme:tok-acme-0123456789:*:acme,globex:tok-globex-0123456789:*:globex", None)
    acme, globex = ({"Authorization": f"Bearer tok-{t}-0123456789"} for t in ("acme", "globex"))
    with TestClient(create_app(s, keys=keys, runner=hold_runner(s, tmp_path / "release"), compact=False)) as tc:
        replay = {"action": "replay", "kind": "weblog", "start": "-1h", "end": "now"}
        for n in (1, 2):
            assert tc.post("/process", json={**replay, "namespace": f"a{n}"}, headers=acme).status_code == 202
        third = tc.post("/process", json={**replay, "namespace": "a3"}, headers=acme)
        assert third.status_code == 429 and "kept for other tenants" in third.json()["error"], third.text
        assert tc.post("/process", json={**replay, "namespace": "g1"}, headers=globex).status_code == 202
        for job in tc.get("/jobs", headers=acme).json()["jobs"] + tc.get("/jobs", headers=globex).json()["jobs"]:
            tc.delete(f"/jobs/{job['id']}", headers=acme if job["tenant"] == "acme" else globex)


def test_fair_query_slots_keep_one_for_other_tenants() -> None:
    from streamlearn.api.query import FairSlots

    slots = FairSlots(4, shared=True)
    assert [slots.acquire("globex") for _ in range(3)] == [None, None, None]
    assert "kept for other tenants" in (slots.acquire("globex") or "")
    assert slots.acquire("def") is None and "4 queries are running" in (slots.acquire("def") or "")
    slots.release("globex")
    assert slots.acquire("def") is None
    alone = FairSlots(4)  # no tenant keys: one tenant may use every slot
    assert [alone.acquire("") for _ in range(4)] == [None] * 4


def test_cli_jobs_list_show_cancel_use_the_same_files(api: tuple[TestClient, JobRunner, Path],
                                                      local: Settings) -> None:
    tc, runner, _ = api
    job = tc.post("/trainModel", json={"model": MODEL, "namespace": "rebuild-2"}).json()["job"]
    env = subprocess_env(local)

    def cli(*words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(streamlearn_cmd(*words), env=env, capture_output=True, text=True, timeout=60)

    listed = cli("jobs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [j["id"] for j in json.loads(listed.stdout)] == [job["id"]]
    shown = cli("jobs", "show", job["id"])
    assert shown.returncode == 0 and "running" in shown.stdout and "--namespace rebuild-2" in shown.stdout
    cancelled = cli("jobs", "cancel", job["id"], "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    assert runner.wait(job["id"], 10)
    assert job_state(tc, job["id"])["job"]["status"] == "cancelled"
    again = cli("jobs", "cancel", job["id"])
    assert again.returncode == 1 and "cancelled already" in again.stderr
    assert cli("jobs", "show", "../etc").returncode == 1


def test_a_body_value_of_the_wrong_json_type_is_a_400_not_a_coerced_job(
        api: tuple[TestClient, JobRunner, Path]) -> None:
    """`"reproduce_version": true` started `retrain --reproduce M/1`, and `"from_beginning": "yes"` a replay."""
    tc, _, _ = api
    bad = tc.post("/trainModel", json={"model": MODEL, "reproduce_version": True})
    assert bad.status_code == 400 and bad.json()["error"].startswith("reproduce_version:"), bad.text
    bad = tc.post("/process", json={"action": "replay", "kind": "sensor", "namespace": "n", "from_beginning": "yes"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("from_beginning:"), bad.text
