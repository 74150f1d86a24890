"""`streamlearn status`: per worker alive/dead, partitions owned, lag, last batch age, last model version.

Everything is read from durable state (``stack/state.json``, the feature store, the model registry)
and from Kafka metadata (group descriptions, committed and end offsets), the same sources an
operator would check by hand. A worker is "alive" only when its pid is alive now: a supervisor
killed with -9 leaves a state file whose uptimes froze, and those must not read as "up 199.9 s".
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

from streaming.config import Settings
from streaming.fsutil import pid_alive
from streaming.kafka_security import kafka_security
from streamlearn.scaling import base_name


@dataclass
class WorkerRow:
    name: str
    state: str
    pid: int | None
    uptime_s: float | None
    restarts: int
    partitions: str = "-"
    lag: str = "-"
    last_batch: str = "-"
    model_version: str = "-"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    return f"{seconds / 60:.0f}m ago" if seconds < 7200 else f"{seconds / 3600:.0f}h ago"


def worker_rows(settings: Settings, state: dict[str, Any], supervisor_alive: bool,
                kafka: bool = True) -> list[WorkerRow]:
    """One row per service of the state file, with live facts filled in where they can be read."""
    now = time.time()
    groups = _group_facts(settings) if kafka else {}
    roles = serving_roles(settings)
    owned_by_pid = _owned_by_pid(settings)
    rows = []
    for s in state.get("services", []):
        pid = s.get("pid")
        alive = bool(pid) and pid_alive(int(pid))
        if alive:
            label = "alive" if supervisor_alive else "alive (orphan: its supervisor is gone)"
            started = s.get("started_unix_s")
            if started:
                uptime: float | None = now - float(started)
            elif s.get("uptime_s") is not None and supervisor_alive:  # a state file of an older streamlearn
                uptime = float(s["uptime_s"]) + now - float(state.get("updated", now))
            else:
                uptime = None
        else:
            last = str(s.get("state", "?"))
            label = "dead" if last == "running" else f"dead ({last})"
            uptime = None  # a dead worker has no uptime, whatever the state file froze
        row = WorkerRow(str(s["name"]), label, int(pid) if pid else None, uptime, int(s.get("restarts", 0)))
        name = row.name
        if name.startswith("stream-"):
            # a replica of `up --workers` (stream-sensor-2) is a member of the kind's one group; it was
            # looked up as a group "sensor-2", and the first replica showed the whole group's partitions
            kind = base_name(name).removeprefix("stream-")
            _fill_group(row, groups.get(settings.group(f"stream.{kind}")))
            if alive and int(pid) in owned_by_pid:
                row.partitions = ",".join(map(str, owned_by_pid[int(pid)])) or "none"
            row.last_batch = _age(_last_batch_age(settings, kind, now))
        elif name.startswith("serve-"):
            model = base_name(name).removeprefix("serve-")
            role = roles.get(int(pid)) if alive else None
            if role is not None:  # a warm-standby pair: which one answers now
                row.state += f", {role}"
            if role is None or role == "active":  # a standby owns no partition and has no lag of its own
                _fill_group(row, groups.get(settings.group(f"serving.{model}")))
            row.model_version = _model_version(settings, model, now, promoted=True)
        elif name.startswith("train-"):
            row.model_version = _model_version(settings, name.removeprefix("train-"), now, promoted=False)
        rows.append(row)
    return rows


def _owned_by_pid(settings: Settings) -> dict[int, list[int]]:
    """pid -> the partitions this host's live group member says it owns (its member file)."""
    from streaming.members import local_entries

    return {int(e["pid"]): sorted(int(p) for p in e.get("partitions") or [])
            for e in local_entries(settings) if e.get("alive") and e.get("pid")}


def serving_roles(settings: Settings) -> dict[int, str]:
    """pid -> ``active`` / ``standby (warm vN)`` / ``standby (loading)`` of this host's serving processes
    that run in standby mode (member files, streaming.standby); other processes are not listed."""
    from streaming.members import local_entries

    out: dict[int, str] = {}
    for e in local_entries(settings):
        if not e.get("alive") or not str(e.get("role", "")).startswith("serve-") or not e.get("pid"):
            continue
        if e.get("state") == "standby":
            out[int(e["pid"])] = f"standby (warm v{e.get('version')})" if e.get("ready") else "standby (loading)"
        elif e.get("state") == "active":
            out[int(e["pid"])] = "active"
    return out


def tcp_reachable(bootstrap: str, timeout_s: float = 1.0) -> bool:
    """Whether anything listens at the first bootstrap address (kafka-python retries a refused
    connection for 30 s and logs each try; a plain connect answers at once)."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _fill_group(row: WorkerRow, facts: dict[str, Any] | None) -> None:
    if not facts:
        return
    parts = facts.get("partitions")
    row.partitions = ",".join(map(str, parts)) if parts else ("none" if parts is not None else "?")
    lag = facts.get("lag")
    row.lag = str(lag) if lag is not None else "?"


def _group_facts(settings: Settings) -> dict[str, dict[str, Any]]:
    """Per consumer group of the platform: partitions assigned to live members, and total lag."""
    from streaming.topics import KINDS, MODELS, raw_topic, requests_topic

    wanted = {settings.group(f"stream.{k}"): raw_topic(settings, k) for k in KINDS}
    wanted |= {settings.group(f"serving.{m}"): requests_topic(settings, m) for m in MODELS}
    out: dict[str, dict[str, Any]] = {}
    try:
        from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

        admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap, request_timeout_ms=5000,
                                 **kafka_security(settings))
        consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False,
                                 request_timeout_ms=5000, isolation_level="read_committed",
                                 **kafka_security(settings))  # as the workers read
    except Exception:  # noqa: BLE001 - no broker: status still shows processes and files
        return out
    try:
        for group, topic in wanted.items():
            facts: dict[str, Any] = {}
            try:
                described = admin.describe_groups([group])
                info = described[group] if isinstance(described, dict) else described[0]
                members = info.get("members") if isinstance(info, dict) else getattr(info, "members", None)
                parts: list[int] = []
                for m in members or []:
                    assignment = m.get("member_assignment") if isinstance(m, dict) else \
                        getattr(m, "member_assignment", None)
                    for t, ps in _assigned(assignment):
                        if t == topic:
                            parts.extend(ps)
                facts["partitions"] = sorted(parts)
            except Exception:  # noqa: BLE001 - brokers differ in what DescribeGroups returns
                facts["partitions"] = None
            try:
                tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
                ends = consumer.end_offsets(tps)
                if hasattr(admin, "list_group_offsets"):  # kafka-python 3
                    committed = admin.list_group_offsets({group: tps}).get(group, {})
                else:
                    committed = admin.list_consumer_group_offsets(group)
                done = {tp: max(0, committed[tp].offset) if tp in committed else 0 for tp in tps}  # -1: none yet
                facts["lag"] = sum(max(0, ends[tp] - done[tp]) for tp in tps)
            except Exception:  # noqa: BLE001
                facts["lag"] = None
            out[group] = facts
    finally:
        admin.close()
        consumer.close()
    return out


def _assigned(assignment: Any) -> list[tuple[str, list[int]]]:
    """(topic, partitions) pairs of a decoded ConsumerProtocolAssignment, whatever its shape."""
    if assignment is None:
        return []
    pairs = getattr(assignment, "assignment", None) or getattr(assignment, "assigned_partitions", None)
    if pairs is None and isinstance(assignment, dict):
        pairs = assignment.get("assignment") or assignment.get("assigned_partitions")
    out = []
    for item in pairs or []:
        if isinstance(item, dict):
            topic, parts = item.get("topic"), item.get("partitions") or []
        elif isinstance(item, (tuple, list)):
            topic, parts = item[0], item[1]
        else:
            topic, parts = getattr(item, "topic", None), getattr(item, "partitions", None) or []
        if topic is not None:
            out.append((str(topic), [int(p) for p in parts]))
    return out


def _last_batch_age(settings: Settings, kind: str, now: float) -> float | None:
    from streaming.store import FeatureStore

    store = FeatureStore(settings.feature_store)
    try:
        ids = store.batch_ids(kind)
        if not ids:
            return None
        if store.remote is not None:  # object storage: no mtimes to stat; the manifests carry the time
            newest = max(int(b.manifest.get("created_at_ms", 0) or 0) for b in store.batches(kind)) / 1000.0
        else:
            newest = max((store.directory(kind) / f"{bid}.avro").stat().st_mtime for bid in ids[-50:])
    except OSError:
        return None
    return max(0.0, now - newest)


def _model_version(settings: Settings, model: str, now: float, *, promoted: bool) -> str:
    from streaming.model_registry import ModelRegistry

    reg = ModelRegistry(settings.model_dir)
    try:
        version = reg.promoted(model) if promoted else reg.latest(model)
        if version is None:
            return "none yet"
        created = reg.metadata(model, version).get("created_at")
    except Exception:  # noqa: BLE001 - a registry being written or pruned: show what is known
        return "?"
    age = _age(now - created / 1000.0) if isinstance(created, (int, float)) else "-"
    return f"v{version} ({'promoted' if promoted else 'newest'}, {age})"


def render(rows: list[WorkerRow]) -> list[str]:
    width = max([10] + [len(r.state) for r in rows])
    nw = max([26] + [len(r.name) for r in rows])
    header = (f"  {'WORKER':{nw}} {'STATE':{width}} {'PID':>7} {'UP':>8} {'RESTARTS':>8} {'PARTITIONS':>10} "
              f"{'LAG':>7} {'LAST BATCH':>11}  MODEL VERSION")
    lines = [header]
    for r in rows:
        up = f"{r.uptime_s:.0f}s" if r.uptime_s is not None else "-"
        lines.append(f"  {r.name:{nw}} {r.state:{width}} {r.pid or '-':>7} {up:>8} {r.restarts:>8} {r.partitions:>10} "
                     f"{r.lag:>7} {r.last_batch:>11}  {r.model_version}")
    return lines
