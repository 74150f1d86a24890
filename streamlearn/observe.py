"""What the demo dashboard and report show, sampled from the platform's durable state.

Everything comes from where production would look: topic end offsets and committed group offsets
(Kafka metadata calls), the feature store's manifests, the model registry's metadata and state,
and the prediction topics themselves (read_committed). No worker is asked for internal numbers, so
the figures are the same whether the workers run here or in docker-compose.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from streaming.config import Settings
from streaming.consumer import Subscriber
from streaming.kafka_security import kafka_security
from streaming.model_registry import ModelRegistry
from streaming.store import FeatureStore
from streaming.topics import KINDS, MODELS, dead_letter_topic, predictions_topic, raw_topic, requests_topic


@dataclass
class Sample:
    t: float
    end_offsets: dict[str, int]
    lag: dict[str, int]
    batches: dict[str, int]
    models: dict[str, dict[str, Any]]


def version_scores(meta: dict[str, Any]) -> dict[str, Any]:
    """The scores of one version's metadata, read defensively: the one place that knows key names.

    ``candidate``: the version's own held-out score; ``current``: the score of the model it would
    replace on the same rows; ``baseline``: a trivial model's score (majority class, last value),
    when the trainer records one. Unknown or missing keys read as None, and plots show what exists.
    """
    gate: dict[str, Any] = meta["gate"] if isinstance(meta.get("gate"), dict) else {}
    scores: dict[str, Any] = meta["scores"] if isinstance(meta.get("scores"), dict) else {}
    baseline_entry = meta.get("baseline")

    def first(*values: Any) -> Any:
        for v in values:
            if isinstance(v, dict):
                v = v.get("score", v.get("value"))
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
        return None

    decision = gate.get("action") or ("PROMOTED" if gate.get("promote") else "REJECTED" if "promote" in gate
                                      else None)
    return {
        "decision": decision,
        "metric": scores.get("metric") or gate.get("primary_metric") or meta.get("primary_metric"),
        "direction": meta.get("direction") or gate.get("direction"),
        "candidate": first(scores.get("candidate"), gate.get("candidate_score")),
        "current": first(scores.get("current"), gate.get("current_score")),
        "baseline": first(scores.get("baseline"), scores.get("baseline_score"), gate.get("baseline_score"),
                          baseline_entry, meta.get("baseline_score")),
        "created_at_ms": meta.get("created_at"),
    }


@dataclass
class PredictionLog:
    """Every prediction seen on the prediction topics.

    Rows are (produced at, wall s; model; version; latency ms; error). "Produced at" is the Kafka
    timestamp of the prediction record, so the request's own time is ``produced - latency``.
    """

    rows: list[tuple[float, str, int, float, bool]] = field(default_factory=list)
    ids: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    duplicates: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, model: str, request_id: str, version: int, latency_ms: float, error: bool,
            produced_at: float | None = None) -> None:
        with self.lock:
            if request_id in self.ids[model]:
                self.duplicates += 1
                return
            self.ids[model].add(request_id)
            self.rows.append((produced_at or time.time(), model, version, latency_ms, error))

    def first_answers(self) -> dict[str, float]:
        """Wall time of each model's first prediction: before it, requests can only queue."""
        out: dict[str, float] = {}
        with self.lock:
            for t, model, _, _, _ in self.rows:
                out[model] = min(t, out.get(model, t))
        return out

    def window(self, seconds: float, *, steady: bool = False) -> list[tuple[float, str, int, float, bool]]:
        """Rows of the last ``seconds``; ``steady``: only requests sent after their model first answered
        (before that, requests wait for a model to exist, not for the serving path)."""
        cutoff = time.time() - seconds
        first = self.first_answers() if steady else {}
        with self.lock:
            return [r for r in self.rows if r[0] >= cutoff
                    and (not steady or r[0] - r[3] / 1000.0 >= first.get(r[1], float("inf")))]

    def swaps(self) -> list[tuple[float, str, int]]:
        """(time, model, new version) of every change of the version answering a model."""
        out: list[tuple[float, str, int]] = []
        last: dict[str, int] = {}
        with self.lock:
            for t, model, version, _, _ in self.rows:
                if model in last and version != last[model]:
                    out.append((t, model, version))
                last[model] = version
        return out


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


class Observer:
    """Samples offsets, lag, batches and model versions; follows the prediction topics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False,
                                      **kafka_security(settings))
        self.store = FeatureStore(settings.feature_store)
        self.models = ModelRegistry(settings.model_dir)
        self.samples: list[Sample] = []
        self.predictions = PredictionLog()
        # every version ever seen, kept after retention deletes its directory: the report shows them all
        self.version_detail: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in MODELS}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.topics = ([raw_topic(settings, k) for k in KINDS] + [dead_letter_topic(settings, k) for k in KINDS]
                       + [dead_letter_topic(settings, "serving")]
                       + [requests_topic(settings, m) for m in MODELS]
                       + [predictions_topic(settings, m) for m in MODELS])
        self._tps: dict[str, list[TopicPartition]] = {}

    def _partitions(self, topic: str) -> list[TopicPartition]:
        if topic not in self._tps or not self._tps[topic]:
            parts = self.consumer.partitions_for_topic(topic) or set()
            self._tps[topic] = [TopicPartition(topic, p) for p in sorted(parts)]
        return self._tps[topic]

    def sample(self) -> Sample:
        tps = [tp for t in self.topics for tp in self._partitions(t)]
        ends = self.consumer.end_offsets(tps) if tps else {}
        end_by_topic: dict[str, int] = defaultdict(int)
        for tp, off in ends.items():
            end_by_topic[tp.topic] += off
        lag: dict[str, int] = {}
        for kind in KINDS:
            group = self.settings.group(f"stream.{kind}")
            total = 0
            try:
                committed = self._committed(group, self._partitions(raw_topic(self.settings, kind)))
                for tp in self._partitions(raw_topic(self.settings, kind)):
                    total += max(0, ends.get(tp, 0) - committed.get(tp, 0))  # two reads, two instants
            except Exception:  # noqa: BLE001 - a group that does not exist yet has no lag to show
                total = -1
            lag[kind] = total
        batches = {kind: len(self.store.batch_ids(kind)) for kind in KINDS}
        models: dict[str, dict[str, Any]] = {}
        for model in MODELS:
            versions = self.models.versions(model)
            info: dict[str, Any] = {"versions": versions, "promoted": self.models.promoted(model), "detail": []}
            known = self.version_detail.setdefault(model, {})
            for v in versions:
                if v in known and known[v].get("decision") is not None:
                    continue  # metadata is written once; re-read only what was incomplete
                try:
                    meta = self.models.metadata(model, v)
                except Exception:  # noqa: BLE001 - a version removed by retention between two calls
                    continue
                known[v] = {"version": v, **version_scores(meta)}
            info["detail"] = [known[v] for v in sorted(known)][-5:]
            models[model] = info
        sample = Sample(time.time(), dict(end_by_topic), lag, batches, models)
        self.samples.append(sample)
        return sample

    def _committed(self, group: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Committed offsets of ``group`` (an OffsetFetch; this consumer never joins the group)."""
        readers = self.__dict__.setdefault("_group_readers", {})
        reader = readers.get(group)
        if reader is None:
            reader = readers[group] = KafkaConsumer(bootstrap_servers=self.settings.bootstrap, group_id=group,
                                                    enable_auto_commit=False, **kafka_security(self.settings))
        out = {}
        for tp in tps:
            off = reader.committed(tp)
            out[tp] = int(off) if off is not None else 0
        return out

    # -- predictions ----------------------------------------------------------------------
    def follow_predictions(self) -> None:
        self._thread = threading.Thread(target=self._follow, name="predictions", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        topics = [predictions_topic(self.settings, m) for m in MODELS]
        with Subscriber(self.settings, topics, start="end", isolation_level="read_committed",
                        idle_backoff=True) as sub:
            while not self._stop.is_set():
                for item in sub.poll_batch(timeout_ms=300):
                    if not item.ok:
                        continue
                    v = item.value  # type: ignore[union-attr]
                    self.predictions.add(v["model"], v["request_id"], int(v["model_version"]),
                                         float(v["latency_ms"]), bool(v.get("error")),
                                         produced_at=item.timestamp / 1000.0 if item.timestamp > 0 else None)

    def rates(self, seconds: float = 5.0) -> dict[str, float]:
        """Records/s per topic over the last ``seconds``."""
        if len(self.samples) < 2:
            return {}
        last = self.samples[-1]
        first = next((s for s in self.samples if s.t >= last.t - seconds), self.samples[0])
        if first is last:
            first = self.samples[-2]
        dt = max(1e-6, last.t - first.t)
        return {t: (last.end_offsets.get(t, 0) - first.end_offsets.get(t, 0)) / dt for t in last.end_offsets}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.consumer.close()
        for reader in self.__dict__.get("_group_readers", {}).values():
            reader.close()
