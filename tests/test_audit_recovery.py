"""Recovery and operations paths found broken by running the README's commands (audit, docs/RECOVERY.md).

Each test reproduces one problem over the real broker and fails without its fix:

* ``kill PID`` (SIGTERM) of ``subscribe --group`` used to end the process like ``kill -9``: its static
  member stayed in the group, which the embedded broker never expires, although a clean stop is documented
  to remove it;
* a damaged manifest in the feature store (a disk fault, a hand edit) stopped ``stream`` and ``store gc``
  with a bare ``JSONDecodeError`` traceback instead of an error naming the file and the way out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_restart import _publish
from streaming import members, offsets
from streaming.config import Settings
from streaming.store import BatchSpec, FeatureStore, StoredRow
from tests.helpers import ROOT, printed_records, streamlearn_cmd, subprocess_env, wait_until


def test_sigterm_of_group_subscriber_leaves_the_group_and_commits_what_it_printed(
        settings: Settings, tmp_path: Path) -> None:
    _publish(settings, "sensor", 60, seed=3)
    out, err = tmp_path / "sub.out", tmp_path / "sub.err"
    group = settings.group("dash")
    with out.open("wb") as fh, err.open("wb") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "streamlearn.cli", "subscribe", "sensor.raw", "--group",
                                 "dash", "--json"], env=subprocess_env(settings), cwd=ROOT, stdout=fh, stderr=fe)
    try:
        wait_until(lambda: len(printed_records(out)) >= 60 or proc.poll() is not None, 60, 0.05, "60 records printed")
        assert proc.poll() is None, err.read_text()
        wait_until(lambda: describe(settings, group)[1], 30, 0.1, "the subscriber's member in the group")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert rc == 128 + signal.SIGTERM, err.read_text()
    state, left = describe(settings, group)
    assert left == [], (state, left)  # before the fix: the member stayed, DEAD, never expired by the broker
    # the commit after each print still covers every printed record: a restart prints nothing twice
    printed = printed_records(out)
    assert len(printed) == 60
    ends: dict[int, int] = {}
    for rec in printed:
        ends[int(rec["partition"])] = max(ends.get(int(rec["partition"]), -1), int(rec["offset"]) + 1)
    committed = {p.partition: p.committed for p in offsets.show(settings, group, settings.topic("sensor.raw"))
                 if p.committed is not None}
    assert committed == ends


def describe(settings: Settings, group: str) -> tuple[str, list[members.Member]]:
    return members.describe_group(settings, group)


def _write_one_batch(store: FeatureStore, topic: str) -> str:
    rows = [StoredRow(x=np.zeros(2, dtype=np.float32), labels={"y": 1.0}, event_time_ms=1_700_000_000_000 + i,
                      key="k", topic=topic, partition=0, offset=i) for i in range(3)]
    spec = BatchSpec(kind="sensor", topic=topic, partition=0, first_offset=0, last_offset=2,
                     featurizer_version="1", n_features=2, label_names=["y"], featurizer_state='{"w": 1}')
    info, _ = store.write_batch(spec, rows)
    return info.batch_id


def test_damaged_manifest_is_named_with_the_way_out_not_a_traceback(settings: Settings) -> None:
    store = FeatureStore(settings.feature_store)
    bid = _write_one_batch(store, settings.topic("sensor.raw"))
    d = store.directory("sensor")
    manifest = d / f"{bid}.json"
    manifest.write_bytes(manifest.read_bytes()[:100])  # cut, as a disk fault leaves it
    (d / "_index.json").unlink()  # the index cached the good copy; a new process re-reads the file
    proc = subprocess.run([sys.executable, "-m", "streamlearn.cli", "store", "gc", "--dry-run",
                           "--retention-days", "0.000001", "--kind", "sensor"], env=subprocess_env(settings),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "JSONDecodeError" not in proc.stderr, proc.stderr
    assert f"manifest {manifest} is unreadable" in proc.stderr, proc.stderr
    assert "streamlearn replay" in proc.stderr, proc.stderr
    # the worker's path (resume from the partition's newest batch) says the same
    try:
        FeatureStore(settings.feature_store).last_batch("sensor", settings.topic("sensor.raw"), 0)
    except Exception as exc:  # noqa: BLE001 - the type is the point
        assert type(exc).__name__ == "StoreError" and str(manifest) in str(exc), repr(exc)
    else:
        raise AssertionError("a damaged manifest was read as if it were fine")


def test_store_promote_run_again_after_it_finished_says_done_and_moves_nothing(settings: Settings) -> None:
    """A crash (or a lost terminal) after the last step leaves no sign whether it finished; the documented
    answer is "run the same command again". That used to fail with "namespace has no batches; rebuild it with
    replay", sending the user into a needless rebuild; now it exits 0 and commits nothing again."""
    from streaming.promote import promote
    from streaming.replay import replay

    _publish(settings, "sensor", 40, seed=5)
    replay(settings, "sensor", from_beginning=True, namespace="rb", idle_timeout_s=20)
    first = promote(settings, "sensor", "rb")
    topic = settings.topic("sensor.raw")
    group = settings.group("stream.sensor")
    assert any(first.offsets.values())
    # the group moved on after the promotion (here: back to the start): a re-run must not commit over it
    moved = offsets.reset(settings, group, topic, to_earliest=True)
    proc = subprocess.run([sys.executable, "-m", "streamlearn.cli", "store", "promote", "sensor", "--from", "rb",
                           "--json"], env=subprocess_env(settings), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["already_live"] is True and info["offsets"] == {str(p): o for p, o in first.offsets.items()}
    after = {p.partition: p.committed for p in offsets.show(settings, group, topic)}
    assert after == moved, after


def test_unreachable_broker_is_one_error_line_naming_the_address(settings: Settings) -> None:
    """Every Kafka command with no broker at the address (`topics create` before `broker start`, a crashed
    broker) ended in kafka-python's bootstrap traceback; the CLI boundary now prints one line for it.
    The exception is kafka-python's own, from a real client against a port nobody listens on."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaTimeoutError

    from streaming import config
    from streaming.broker import free_port
    from streamlearn.broker_errors import unreachable_message

    port = free_port()
    try:
        KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", bootstrap_timeout_ms=300)
    except KafkaTimeoutError as exc:
        real = exc
    else:
        raise AssertionError(f"a Kafka client bootstrapped from 127.0.0.1:{port}, where nothing listens")
    embedded = config.load({"home": settings.home, "broker_port": port})
    message = unreachable_message(real, embedded)
    assert message is not None and f"127.0.0.1:{port}" in message and "streamlearn broker start" in message
    remote = settings.with_(kafka_bootstrap=f"127.0.0.1:{port}")
    assert "STREAMLEARN_KAFKA_BOOTSTRAP" in (unreachable_message(real, remote) or "")
    # other timeouts (a send, a commit) are not "unreachable": they keep their own handling
    assert unreachable_message(KafkaTimeoutError("Timeout after waiting for 30 secs."), embedded) is None
    assert unreachable_message(ValueError("bootstrap"), embedded) is None


_SUPERVISOR = """
import threading
from streaming import config
from streamlearn.stack import STREAM, Service, Supervisor
Supervisor(config.load(), [Service("follower", {args!r}, STREAM)]).start()
threading.Event().wait()
"""


def test_up_restarted_after_its_supervisor_was_killed_stops_the_orphaned_workers(settings: Settings) -> None:
    """`kill -9` of `streamlearn up` leaves its workers running; the same command again used to start a
    second set beside them (every group got an unsupervised extra member nothing ever stopped). Now the new
    supervisor drains the old one's workers first, so one supervised stack remains."""
    from streaming.fsutil import pid_alive
    from streamlearn.stack import STREAM, Service, Supervisor, read_state

    args = ["subscribe", "weblog.raw", "--idle-timeout", "600"]
    first = subprocess.Popen([sys.executable, "-c", _SUPERVISOR.format(args=args)], env=subprocess_env(settings),
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def first_worker_pid() -> int:
            state = read_state(settings) or {}
            return int(([*state.get("services", []), {}][0]).get("pid") or 0)

        orphan = wait_until(first_worker_pid, 60, 0.1, "the first supervisor's worker")
    finally:
        first.kill()  # the supervisor dies; its worker lives on as an orphan
        first.wait(30)
    assert pid_alive(orphan)
    sup = Supervisor(settings, [Service("follower", args, STREAM)])
    try:
        sup.start()
        assert not pid_alive(orphan), "the orphan of the dead supervisor still runs beside the new stack"
        assert sup.status()[0]["pid"] not in (None, orphan)
    finally:
        sup.stop(timeout_per_group=30)
        if pid_alive(orphan):
            os.kill(orphan, signal.SIGKILL)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_second_stack_in_one_home_is_refused_and_a_restart_gets_the_orphans_ports_back(
        settings: Settings) -> None:
    """Two findings of an exploratory run of `up`:
    * a second `up` in one home started a second set of workers beside the first (both wrote
      stack/state.json, both appended to the same logs): it is now refused, naming the first's pid;
    * after `kill -9` of `up`, the same command left the registry and gateway out ("port in use"): their
      orphans held the ports until they were stopped, which happened after the port checks. The orphans
      are now stopped first."""
    from streaming.fsutil import pid_alive
    from streamlearn.stack import CORE, Service, StackBusyError, Supervisor, read_state

    port = _free_port()
    env = subprocess_env(settings, STREAMLEARN_REGISTRY_PORT=str(port))
    script = _SUPERVISOR.replace("STREAM, Service", "CORE, Service").replace(
        'Service("follower", {args!r}, STREAM)', 'Service("registry", ["registry", "serve"], CORE)')
    first = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def orphan_pid() -> int:
            state = read_state(settings) or {}
            pid = int(([*state.get("services", []), {}][0]).get("pid") or 0)
            return pid if pid and _port_open(port) else 0

        orphan = wait_until(orphan_pid, 60, 0.1, "the first stack's registry on its port")
        with pytest.raises(StackBusyError, match=rf"another stack \(pid {first.pid}\) runs in"):
            Supervisor(settings, [Service("registry", ["registry", "serve"], CORE)]).start()
    finally:
        first.kill()  # the supervisor dies; its registry lives on and keeps the port
        first.wait(30)
    assert pid_alive(orphan)
    up = subprocess.Popen(streamlearn_cmd("up", "--only", "registry", "--no-standby"), env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def restarted() -> bool:
            state = read_state(settings) or {}
            pids = [e.get("pid") for e in state.get("services", [])]
            return bool(pids) and pids[0] not in (None, orphan) and not pid_alive(orphan) and _port_open(port)

        wait_until(restarted, 90, 0.2, "the registry restarted by the same `up` command on its own port")
    finally:
        up.terminate()
        out, _ = up.communicate(timeout=60)
        if pid_alive(orphan):
            os.kill(orphan, signal.SIGKILL)
    assert "left out registry" not in out, out


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class _Interrupt:
    """A replay progress sink that stops the run at its first poll, the way Ctrl-C or a kill would."""

    def __init__(self, _total: int) -> None:
        pass

    def __enter__(self) -> _Interrupt:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self, n: int = 1) -> None:
        raise KeyboardInterrupt


def test_interrupted_time_replay_rerun_later_completes_from_its_own_start(settings: Settings) -> None:
    """`replay --from-timestamp -2h --into NS` interrupted, then the same command run again later: the relative
    time now resolves to later offsets. The re-run used to replay from there (or be refused where its
    batch boundaries overlapped the ones already written); it completes the interrupted replay instead,
    and removes the temp file a killed writer left (only a stream worker's start did)."""
    import pytest

    from streaming.producer import Publisher
    from streaming.replay import read_range, replay
    from streamlearn.commands.publish import generated

    with Publisher(settings) as pub:
        metas = [pub.publish("sensor", e).get(30) for e in generated("sensor", 30, seed=1)]
        later_ms = max(m.timestamp for m in metas) + 1  # "-2h" an hour later: after these records
        for e in generated("sensor", 30, seed=2):
            pub.publish("sensor", e).get(30)
    small = settings.with_(batch_max_records=7)
    with pytest.raises(KeyboardInterrupt):
        replay(small, "sensor", from_beginning=True, namespace="ns", progress=_Interrupt)
    store = FeatureStore(small.feature_store)
    assert read_range(store.directory("sensor", "ns")) is None  # interrupted: not promotable
    # what a kill -9 in the middle of write_batch leaves: the temp file of a writer that no longer runs
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    stale = store.directory("sensor", "ns") / f".{small.topic('sensor.raw')}-p0-x.avro.{gone}-1.tmp"
    stale.write_bytes(b"half a batch")
    again = replay(small, "sensor", from_ms=later_ms, namespace="ns")
    reference = replay(small, "sensor", from_beginning=True, namespace="ref")
    assert again.start == reference.start and again.stop == reference.stop
    drifted = offsets.offsets_for_timestamp(small, small.topic("sensor.raw"), later_ms)
    assert drifted != reference.start  # the re-run's own start lies later: without the fix it replayed from there
    assert store.batch_ids("sensor", "ns") == store.batch_ids("sensor", "ref")
    assert read_range(store.directory("sensor", "ns")) is not None
    assert not stale.exists()  # the re-run cleaned up after the killed writer, as a stream worker's start does


def test_store_gc_of_a_namespace_that_does_not_exist_says_so(settings: Settings) -> None:
    """`store gc --namespace NS` with a typo answered "deleted 0 batches" as if NS were clean."""
    import pytest

    from streaming.exceptions import StoreError
    from streaming.retention import collect

    store = FeatureStore(settings.feature_store)
    _write_one_batch(store, settings.topic("sensor.raw"))
    with pytest.raises(StoreError, match=r"--namespace 'rebuld' does not exist in .*namespaces there: live"):
        collect(settings, dry_run=True, namespace="rebuld", retention_days=1)
    assert collect(settings, dry_run=True, namespace="live", retention_days=1).deleted == []


def test_publish_with_no_broker_at_the_address_ends_with_the_one_error_line(settings: Settings) -> None:
    """`publish --generate` (and `--stdin`) built only the librdkafka producer, which retries a refused
    bootstrap for ever: with no broker at the address the command said "waiting N s for 3 records to be
    acked" until it was interrupted. It now makes sure of the kind's topics first, as `--file` did, and
    ends with the same line as every other Kafka command."""
    import subprocess

    from streaming.broker import free_port
    from tests.helpers import streamlearn_cmd, subprocess_env

    port = free_port()
    done = subprocess.run(streamlearn_cmd("--bootstrap", f"127.0.0.1:{port}", "publish", "sensor", "--generate", "3"),
                          env=subprocess_env(settings), capture_output=True, text=True, timeout=150, check=False)
    assert done.returncode != 0, done.stderr[-2000:]
    assert f"cannot reach the Kafka broker at 127.0.0.1:{port}" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
