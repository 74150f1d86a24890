"""Many workers per group on one machine (issue 16 item 2): `up --workers`, and partitions >= workers."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from streaming import config
from streaming.members import local_entries
from streaming.polling import poll_until
from streaming.topics import declared_topics, ensure_topics, raw_topic
from streamlearn.scaling import base_name, check_partitions, expand, group_of, parse_workers
from streamlearn.stack import default_services
from tests.helpers import streamlearn_cmd, subprocess_env


def test_parse_workers_reads_groups_and_refuses_bad_entries_by_name() -> None:
    assert parse_workers("stream.sensor=3, serve.digits_cnn=2") == {"stream.sensor": 3, "serve.digits_cnn": 2}
    assert parse_workers("") == {}
    for bad, why in [("stream.sensor", "is not GROUP=N"), ("stream.video=2", "unknown group"),
                     ("stream.sensor=0", "1 to 64"), ("stream.sensor=65", "1 to 64"),
                     ("stream.sensor=2,stream.sensor=3", "given twice"), ("train.digits_cnn=2", "is not GROUP=N")]:
        with pytest.raises(config.ConfigError, match=why):
            parse_workers(bad)
    assert parse_workers("serve.churn=2", models=["churn"]) == {"serve.churn": 2}
    s = config.load({"home": "/tmp/x"}, environ={"STREAMLEARN_WORKERS": "stream.weblog=2"})
    assert parse_workers(s.workers) == {"stream.weblog": 2}  # the env/config-file form


def test_expand_makes_n_copies_with_their_own_metrics_ports() -> None:
    s = config.load({"home": "/tmp/x"}, environ={})
    services = expand(default_services(s, 9100, gateway=True, registry_http=True),
                      {"stream.sensor": 3, "serve.digits_cnn": 2})
    names = [x.name for x in services]
    assert names.count("stream-sensor") == 1 and {"stream-sensor-2", "stream-sensor-3", "serve-digits_cnn-2"} <= set(
        names)
    assert len(names) == len(default_services(s, 9100, gateway=True, registry_http=True)) + 3
    copies = [x for x in services if base_name(x.name) == "stream-sensor"]
    assert [x.args for x in copies] == [["stream", "sensor"]] * 3  # same command: same group, own slot
    ports = [x.metrics_port for x in services if x.metrics_port and x.name != "gateway"]
    assert len(ports) == len(set(ports)), "every process serves /metrics on its own port"
    assert group_of("serve-digits_cnn-2") == group_of("serve-digits_cnn") == "serve.digits_cnn"
    assert group_of("train-digits_cnn") is None and base_name("train-x-2") == "train-x-2"


def test_more_workers_than_partitions_is_refused_with_both_numbers() -> None:
    s = config.load({"home": "/tmp/x", "partitions": 3}, environ={})
    check_partitions({"stream.sensor": 3}, lambda g: None, s)  # equal is fine
    with pytest.raises(config.ConfigError) as err:
        check_partitions({"stream.sensor": 4, "serve.digits_cnn": 2}, lambda g: {"serve.digits_cnn": 1}.get(g), s)
    text = str(err.value)
    assert "group stream.sensor gets 4 workers but its topic sensor.raw has 3 partitions" in text
    assert "group serve.digits_cnn gets 2 workers but its topic digits_cnn.requests has 1 partitions" in text
    assert "STREAMLEARN_PARTITIONS=4" in text and "run at most 3 workers" in text


def test_up_refuses_before_starting_anything(tmp_path: Path) -> None:
    env = {"STREAMLEARN_HOME": str(tmp_path / "home"), "STREAMLEARN_PARTITIONS": "2",
           "STREAMLEARN_KAFKA_BOOTSTRAP": "127.0.0.1:1"}  # nothing may connect: refused before the broker
    proc = subprocess.run(streamlearn_cmd("up", "--workers", "stream.sensor=5"), env=subprocess_env(
        config.load({"home": tmp_path / "home"}, environ={}), **env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "stream.sensor gets 5 workers but its topic sensor.raw has 2 partitions" in proc.stderr
    assert not (tmp_path / "home" / "stack").exists()  # no child was started


def test_up_holds_the_plan_to_an_existing_topics_partitions(bare_settings: config.Settings) -> None:
    ensure_topics(bare_settings.with_(partitions=2))  # made earlier with 2 partitions
    more = bare_settings.with_(partitions=4)  # the setting says 4 now; the topic still has 2
    proc = subprocess.run(streamlearn_cmd("up", "--only", "stream-sensor", "--workers", "stream.sensor=3"),
                          env=subprocess_env(more), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"its topic {raw_topic(more, 'sensor')} has 2 partitions" in proc.stderr
    assert "kafka-topics.sh --alter --partitions 3" in proc.stderr


def test_up_workers_runs_two_processes_in_one_group(settings: config.Settings) -> None:
    """One `up --workers stream.sensor=2`: two stream processes, one group, the partitions split between them.

    About 10-20 s (two worker start-ups); stopped with SIGTERM so both members leave the group (noida-db
    never expires a member killed with -9).
    """
    assert len([s for s in declared_topics(settings) if s.name == raw_topic(settings, "sensor")]) == 1
    up = subprocess.Popen(streamlearn_cmd("up", "--only", "stream-sensor", "--workers", "stream.sensor=2"),
                          env=subprocess_env(settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    group = settings.group("stream.sensor")
    members: list[dict[str, Any]] | None = None

    def split() -> list[dict[str, Any]] | None:
        """Two live members whose partitions (as each last recorded them) split the topic."""
        alive = [e for e in local_entries(settings, group) if e.get("alive") and e.get("partitions")]
        if len(alive) != 2:
            return None
        a, b = (set(e["partitions"]) for e in alive)  # a rebalance shows up in each file in turn
        return alive if not a & b and a | b == set(range(settings.partitions)) else None

    try:
        members = poll_until(split, 90, interval_s=0.2)
    finally:
        seen = local_entries(settings, group)  # what the members recorded, for the failure message
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=90)
    text = out.decode(errors="replace")
    assert members, f"no two live members split the partitions within 90 s; members: {seen}; up said: {text[-3000:]}"
    assert len({m["pid"] for m in members}) == 2 and len({m["instance_id"] for m in members}) == 2
    assert up.returncode == 0, text[-2000:]
    assert "stream-sensor-2" in text and "stopped: stream-sensor=0, stream-sensor-2=0" in text, text[-2000:]
    assert not [e for e in local_entries(settings, group) if e.get("alive")]
