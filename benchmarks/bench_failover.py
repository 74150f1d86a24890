"""Failover of the scale-out roles (issue 16 steps 3-4): trainer leader takeover, serving replica skew.

``trainer``: two ``streamlearn train`` processes for one model share a registry; one holds the
lease (streaming/lease.py). The leader is killed with SIGKILL while it trains a new version. Measured:
seconds from the kill to the standby holding the lease (``takeover_s``; bounds below and in
docs/LEADER.md) and to its first version (``kill_to_version_s``). Checked: versions 1..N
with no gap, exactly one CREATED and one decision per version, the publishing epochs rise, and the
lineage is contiguous (each version trains on exactly the batches after its parent's cursor). Both
trainers run on this host, so the standby sees that the holder's pid is gone and takes over at its
next poll (<= ``lease / 3``) instead of at the expiry; across hosts the expiry path applies (bound
``4/3 x lease``; tests/test_leader_lease.py covers it with a fake clock).

``serving``: two ``streamlearn serve`` processes in one consumer group answer a steady request load
while versions are promoted. Checked: every request answered exactly once across both
(read_committed), each answer by a version that was promoted. Measured per promoted version: the
skew, seconds between the first answer by it on one replica and on the other (``skew_s``; each
replica answers a fixed set of partitions), with the resolution of that figure (the largest gap
between two answers of one replica around the swap).

    python -m benchmarks.bench_failover [--only trainer,serving]   # JSON to stdout, reports/bench/failover.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.bench_restart import Worker, _read_all, wait_for
from benchmarks.common import bench_settings, fresh, machine, write_report
from streaming.config import Settings
from streaming.topics import raw_topic

DEADLINE_S = 240.0  # generous: two TensorFlow imports on a loaded 2-core box
TINY_SPECS = {"restart_tiny": "tests.restart_spec:SPEC"}


# -- trainer leader ----------------------------------------------------------------------------------
def lineage_problems(registry: Any, store: Any, model: str, kind: str) -> list[str]:
    """What breaks "no version lost or duplicated, lineage contiguous"; empty when all holds."""
    problems: list[str] = []
    versions = registry.versions(model)
    if versions != list(range(1, len(versions) + 1)):
        problems.append(f"versions are not 1..N: {versions}")
    history = registry.history(model)
    created = Counter(e["version"] for e in history if e["action"] == "CREATED")
    decided = Counter(e["version"] for e in history if e["action"] in ("PROMOTED", "REJECTED"))
    for v in versions:
        if created[v] != 1 or decided[v] != 1:
            problems.append(f"v{v}: {created[v]} CREATED and {decided[v]} decisions (want 1 and 1)")
    epochs = [e.get("epoch") for e in history if e["action"] == "CREATED"]
    if any(e is None for e in epochs) or epochs != sorted(epochs):
        problems.append(f"publishing epochs do not rise: {epochs}")
    order = [b.batch_id for b in sorted(store.batches(kind),
                                        key=lambda b: (int(b.manifest.get("created_at_ms", 0)), b.batch_id))]
    promoted: int | None = None
    seen_new: dict[tuple[int | None, tuple[str, ...]], int] = {}
    for entry in history:  # replay the history: each version's parent is what was promoted when it was made
        v = entry["version"]
        if entry["action"] in ("PROMOTED", "ROLLED_BACK"):
            promoted = v
        if entry["action"] != "CREATED":
            continue
        meta = registry.metadata(model, v)
        if meta.get("parent_version") != promoted:
            problems.append(f"v{v}: parent {meta.get('parent_version')} but v{promoted} was promoted")
        cursor = registry.metadata(model, promoted)["data_state"]["cursor"] if promoted else None
        start = order.index(cursor) + 1 if cursor else 0
        new = tuple(b["batch_id"] for b in meta["lineage"]["batches"] if b["role"] in ("train", "holdout"))
        if list(new) != order[start:start + len(new)]:
            problems.append(f"v{v}: trained/held out {list(new)}, not the batches after the parent's cursor "
                            f"{order[start:start + len(new)]}")
        if (promoted, new) in seen_new:
            problems.append(f"v{v} duplicates v{seen_new[(promoted, new)]} (same parent, same batches)")
        seen_new[(promoted, new)] = v
    return problems


def trainer(settings: Settings, work: Path, rows: int = 40, lease_s: float = 3.0, model: str = "restart_tiny",
            specs: dict[str, str] | None = None) -> dict[str, Any]:
    """Two trainers, kill -9 of the leader while it trains, takeover, next versions (see module doc)."""
    from streaming.lease import Lease, lease_store
    from streaming.model_registry import ModelRegistry
    from streaming.store import FeatureStore
    from streamlearn.commands.publish import generated
    from trainer.cycle import read_marker
    from trainer.synthetic import write_batches

    store = FeatureStore(settings.feature_store)
    events = list(generated("sensor", 6 * rows, seed=5))
    registry = ModelRegistry(settings.model_dir)
    lease_view = Lease(lease_store(registry, model), model, ttl_s=lease_s)

    def add(part: int) -> set[str]:
        before = {b.batch_id for b in store.batches("sensor")}
        write_batches(store, "sensor", events[part * 2 * rows:(part + 1) * 2 * rows], batch_size=rows,
                      topic=raw_topic(settings, "sensor"), first_offset=part * 2 * rows,
                      created_at_ms=1_700_000_000_000 + part * 100_000)
        return {b.batch_id for b in store.batches("sensor")} - before

    def holder() -> tuple[int, int] | None:
        rec = lease_view.current()
        return (rec.pid, rec.epoch) if rec is not None and not rec.expired(int(time.time() * 1000)) else None

    def covered() -> bool:  # the newest version was trained on the store's newest batch, and is decided
        latest = registry.latest(model)
        if latest is None:
            return False
        newest = max(store.batches("sensor"), key=lambda b: (int(b.manifest.get("created_at_ms", 0)), b.batch_id))
        decided = {e["version"] for e in registry.history(model) if e["action"] in ("PROMOTED", "REJECTED")}
        return registry.metadata(model, latest)["data_state"].get("newest_seen") == newest.batch_id \
            and latest in decided

    config = work / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[models]\n" + "".join(f'{k} = "{v}"\n' for k, v in (specs or TINY_SPECS).items()))
    env = {"STREAMLEARN_RETRAIN_EVERY_BATCHES": "1", "STREAMLEARN_LEADER_LEASE_S": str(lease_s),
           "STREAMLEARN_CONFIG": str(config)}
    workers = [Worker(settings, ["train", model, "--no-events"], work / f"train{i}.log", stderr_apart=False, **env)
               for i in (0, 1)]
    try:
        add(0)
        for w in workers:
            w.start()
        wait_for(holder, "a leader", workers[0], timeout=DEADLINE_S)
        wait_for(covered, "the first version", workers[0], timeout=DEADLINE_S)
        first: tuple[int, int] = wait_for(holder, "the leader", workers[0])  # type: ignore[assignment]
        leader = next(w for w in workers if w.proc is not None and w.proc.pid == first[0])
        standby = next(w for w in workers if w is not leader)
        assert leader.proc is not None and standby.proc is not None
        standby_pid = standby.proc.pid
        new = add(1)

        def training_new() -> bool:  # the leader's cycle marker: it started a cycle on the new batches
            marker = read_marker(settings, model) or {}
            planned = set(marker.get("train_batches") or []) | set(marker.get("holdout_batches") or [])
            return marker.get("pid") == first[0] and marker.get("phase") == "started" and bool(planned & new)

        # Kill inside the cycle; a tiny model may finish first (polled every 10 ms), then the kill hits an
        # idle leader and the scenario still checks the takeover and the lineage.
        wait_for(lambda: training_new() or covered(), "the leader's cycle on new batches", leader,
                 timeout=DEADLINE_S, interval=0.01)
        caught_in_cycle = not covered()
        os.kill(leader.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        leader.proc.wait(30)
        versions_at_kill = registry.versions(model)
        def standby_holds() -> tuple[int, int] | None:
            held = holder()
            return held if held is not None and held[0] == standby_pid else None

        took: tuple[int, int] = wait_for(standby_holds, "the standby to take the lease over", standby,  # type: ignore[assignment]
                                         timeout=DEADLINE_S, interval=0.01)
        takeover_s = time.monotonic() - killed
        add(2)  # more data after the takeover: the new leader must continue the lineage
        wait_for(lambda: len(registry.versions(model)) > len(versions_at_kill), "a version of the new leader",
                 standby, timeout=DEADLINE_S)
        kill_to_version_s = time.monotonic() - killed
        wait_for(covered, "a version covering every batch", standby, timeout=DEADLINE_S)
    finally:
        for w in workers:
            w.stop()
    for v in registry.versions(model):
        registry.verify(model, v)
    return {"kind": "trainer_failover", "lease_s": lease_s, "takeover_bound_same_host_s": round(lease_s / 3, 3),
            "takeover_bound_other_host_s": round(4 * lease_s / 3, 3),
            "takeover_s": round(takeover_s, 3), "kill_to_version_s": round(kill_to_version_s, 3),
            "killed_during_cycle": caught_in_cycle, "epochs": [first[1], took[1]],
            "versions_at_kill": versions_at_kill, "versions": registry.versions(model),
            "standby_said_so": "standing by" in (work / f"train{workers.index(standby)}.log").read_text(
                errors="replace"),
            "problems": lineage_problems(registry, store, model, "sensor")}


# -- serving replicas --------------------------------------------------------------------------------
class _Answers:
    """Reads the predictions topic (read_committed) in a thread: (request id, partition, version, ts ms, value)."""

    def __init__(self, settings: Settings, topic: str) -> None:
        import threading

        from kafka import KafkaConsumer, TopicPartition

        from schemas.registry import open_registry
        from schemas.serde import AvroDeserializer

        self.decode = AvroDeserializer(open_registry(settings.registry_url, settings.registry_dir))
        self.consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False,
                                      isolation_level="read_committed")
        tps = [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic) or [])]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.items: list[tuple[str, int, int, int, dict[str, Any]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for recs in self.consumer.poll(timeout_ms=200).values():
                for r in recs:
                    value = self.decode(r.value).value
                    self.items.append((r.key.decode(), int(value["input_partition"]), int(value["model_version"]),
                                       int(r.timestamp), value))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.consumer.close()


class _Progress:
    """Committed offsets of the serving group on the requests topic against the topic's end."""

    def __init__(self, settings: Settings, topic: str, group: str) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False, group_id=group)
        self.tps = [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic) or [])]

    def done(self) -> int:
        return sum(self.consumer.committed(tp) or 0 for tp in self.tps)

    def total(self) -> int:
        return int(sum(self.consumer.end_offsets(self.tps).values()))

    def close(self) -> None:
        self.consumer.close()


def version_skew(items: list[tuple[str, int, int, int, dict[str, Any]]], version: int) -> dict[str, Any]:
    """Seconds between the first answer by ``version`` on the first and on the last input partition.

    Each replica owns a fixed set of partitions and swaps them all between two batches, so the
    spread of the per-partition switch times is the skew between the replicas. ``resolution_s``: the
    largest gap between the last answer before the switch and the first after it on one partition
    (the switch happened somewhere in that gap).
    """
    first: dict[int, int] = {}
    last_before: dict[int, int] = {}
    for _, part, v, ts, _ in sorted(items, key=lambda i: i[3]):
        if v >= version:
            first.setdefault(part, ts)
        elif part not in first:
            last_before[part] = ts
    if not first:
        return {"version": version, "skew_s": None}
    gaps = [first[p] - last_before[p] for p in first if p in last_before]
    return {"version": version, "skew_s": round((max(first.values()) - min(first.values())) / 1000, 3),
            "resolution_s": round(max(gaps, default=0) / 1000, 3), "partitions": len(first)}


def serving(settings: Settings, work: Path, versions: int = 3, poll_s: float = 0.5,
            interval_s: float = 0.01) -> dict[str, Any]:
    """Two ``streamlearn serve`` replicas in one group under load while ``versions`` more versions are promoted."""
    import threading

    from serving.client import ensure_model_topics, to_request
    from streaming.members import local_entries
    from streaming.model_registry import ModelRegistry
    from streaming.producer import Publisher
    from streaming.topics import predictions_topic, requests_topic
    from tests.serving_helpers import expected_outputs, publish

    model = "replicas"
    registry = ModelRegistry(settings.model_dir)
    publish(registry, model, tag=1.0)
    ensure_model_topics(settings, model)
    group = settings.group(f"serving.{model}")
    env = {"STREAMLEARN_SERVE_POLL_S": str(poll_s)}
    replicas = [Worker(settings, ["serve", model], work / f"serve{i}.log", stderr_apart=False, **env)
                for i in (0, 1)]
    answers = _Answers(settings, predictions_topic(settings, model))
    sent: list[str] = []
    stop_load = threading.Event()

    def load() -> None:  # a steady request stream for the whole run
        n = 0
        with Publisher(settings) as pub:
            while not stop_load.is_set():
                req = to_request(model, {"request_id": f"q{n}", "features": [float(n % 11), 1.0, 2.0, 3.0]})
                pub.publish_to(requests_topic(settings, model), "PredictionRequest", req, key=req["request_id"])
                sent.append(req["request_id"])
                n += 1
                stop_load.wait(interval_s)  # pacing of the load generator, not a wait for a condition

    def owners() -> list[list[int]]:
        return sorted(sorted(e.get("partitions") or []) for e in local_entries(settings, group) if e.get("alive"))

    def answered_on_every_partition(version: int, since: int) -> bool:
        parts = {p for _, p, v, _, _ in answers.items[since:] if v == version}
        return len(parts) >= settings.partitions

    progress = _Progress(settings, requests_topic(settings, model), group)
    loader = threading.Thread(target=load, daemon=True)
    promoted_at: dict[int, float] = {}
    try:
        # One replica first, the second once the first answers: scaling out a running group, the way an
        # operator adds a replica (two cold starts at once also make the group rebalance while both
        # still import TensorFlow).
        replicas[0].start()
        loader.start()
        wait_for(lambda: owners() == [list(range(settings.partitions))], "the first replica to own every partition",
                 replicas[0])
        second_started_ms = int(time.time() * 1000)
        replicas[1].start()
        wait_for(lambda: len(owners()) == 2 and all(owners()), "both replicas to own partitions", replicas[1])
        both = len(answers.items)
        wait_for(lambda: answered_on_every_partition(1, both), "both replicas answering with v1", replicas[1])
        at_swaps = owners()
        for k in range(2, versions + 2):
            mark = len(answers.items)
            promoted_at[k] = time.time()
            if publish(registry, model, tag=float(k)) != k:
                raise RuntimeError(f"expected version {k}; the registry allocated another")
            wait_for(functools.partial(answered_on_every_partition, k, mark), f"answers by v{k} on every partition",
                     replicas[0])
        stop_load.set()
        loader.join(30)
        wait_for(lambda: len({i[0] for i in answers.items}) >= len(sent), "every request answered", replicas[0])
        partitions = owners()
        wait_for(lambda: progress.done() >= progress.total(), "the group to commit every request", replicas[0])
    finally:
        stop_load.set()
        for r in replicas:
            r.stop()
        answers.close()
        progress.close()
    # The verdict comes from a fresh read_committed read of the whole topic after both replicas stopped, so
    # a late duplicate cannot slip past; the live reader above only timed the swaps.
    records = _read_all(settings, predictions_topic(settings, model))
    final = [(r.key.decode(), int(r.value["input_partition"]), int(r.value["model_version"]), r.timestamp, r.value)
             for r in records]
    counts = Counter(i[0] for i in final)
    dup_keys = {k for k, c in counts.items() if c > 1}
    by_key: dict[str, list[tuple[int, int, int, float]]] = {}
    for r in records:
        if r.key.decode() in dup_keys:  # (input partition, input offset, version, s after the 2nd replica started)
            by_key.setdefault(r.key.decode(), []).append((int(r.value["input_partition"]), int(r.value["input_offset"]),
                                                          int(r.value["model_version"]),
                                                          round((r.timestamp - second_started_ms) / 1000, 3)))
    examples = sorted(by_key.items(), key=lambda kv: kv[1][0][1])[:5] + sorted(by_key.items(),
                                                                                key=lambda kv: -kv[1][0][1])[:3]
    live_counts = Counter(i[0] for i in answers.items)
    wrong = [i[0] for i in final if _wrong(i[0], i[2], i[4], expected_outputs)]
    skews = [version_skew(answers.items, k) for k in sorted(promoted_at)]
    loads = _load_seconds(replicas)
    return {"kind": "serving_replicas", "replicas": 2, "partitions_at_swaps": at_swaps, "partitions_end": partitions,
            "poll_s": poll_s,
            "requests": len(sent), "answered": len(counts), "missing": len(set(sent) - set(counts)),
            "duplicates": sum(c - 1 for c in counts.values() if c > 1), "wrong_outputs": len(wrong),
            "duplicate_examples": examples, "live_duplicates": sum(c - 1 for c in live_counts.values() if c > 1),
            "skews": skews, "max_skew_s": max((s["skew_s"] or 0.0) for s in skews),
            "load_seconds": loads, "skew_bound_s": round(poll_s + max(loads, default=0.0), 3)}


def _wrong(request_id: str, version: int, value: dict[str, Any], expected: Any) -> bool:
    """An error answer, or outputs that the version it names did not compute (version k has tag k)."""
    if value["error"] is not None:
        return True
    n = int(request_id[1:])
    want = expected([float(n % 11), 1.0, 2.0, 3.0], float(version))
    return len(value["outputs"]) != len(want) or any(abs(a - b) > 1e-4 for a, b in zip(value["outputs"], want,
                                                                                         strict=True))


def _load_seconds(replicas: list[Worker]) -> list[float]:
    """Per-replica version load times from their logs (serving.versions logs each load)."""
    import re

    out: list[float] = []
    for r in replicas:
        out += [float(m) for m in re.findall(r"warmed up in ([0-9.]+) s", r.tail(1_000_000))]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="trainer,serving", help="comma-separated scenarios")
    args = parser.parse_args(argv)
    import tempfile

    results: dict[str, Any] = {"machine": machine(), "load_avg": os.getloadavg()}
    with bench_settings() as base:
        for name in args.only.split(","):
            fn = SCENARIOS[name.strip()]
            results[name.strip()] = fn(fresh(base), Path(tempfile.mkdtemp(prefix=f"failover-{name}-")))
    path = write_report("failover", results)
    print(json.dumps(results, indent=2))
    print(f"report: {path}")
    return 0


SCENARIOS: dict[str, Callable[[Settings, Path], dict[str, Any]]] = {"trainer": trainer, "serving": serving}

if __name__ == "__main__":
    raise SystemExit(main())
