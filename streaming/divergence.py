"""Detect offset reuse: is the record at each stored offset still the one the store featurized?

Why: the embedded broker loses its last ~1 s of acked writes on ``kill -9`` and then hands the
lost offsets to *new* records. A worker that trusted its store's high-water mark would resume
after offsets whose records changed, silently skipping the new records and keeping rows for
records that no longer exist (the way Kafka's leader epochs detect log truncation, but from the
consumer's side).

How: every batch manifest carries ``fingerprints`` (see :func:`record_fingerprint`): the digest
of the record at its last offset and a chain digest over ``(offset, digest)`` of every record of
its range. :func:`find_divergence` reads the newest batch's range back from the topic and compares
the chain; on a mismatch it walks back batch by batch to the newest one that still matches. The
batches after it are *quarantined* (moved to ``<kind>/quarantine/`` beside the live batches, so
readers no longer see them, but kept for inspection) and the worker resumes at the first offset
after the last good batch, so every record on the topic ends up featurized exactly once.
Manifests written before fingerprints existed are trusted (nothing to compare).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming.ackguard import record_digest
from streaming.fsutil import fsync_dir
from streaming.store import BatchInfo, FeatureStore, batch_id_for
from streaming.store_index import append as index_append

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"
FINGERPRINT_ALGO = "sha1(key,value,headers); chain sha1 over offset:digest"


def record_fingerprint(msg: Any) -> str:
    """Digest of one raw Kafka record as the broker holds it (key, value and headers)."""
    return record_digest(msg.key, msg.value, msg.headers)


class FingerprintChain:
    """The running chain digest of one batch's records, in offset order."""

    def __init__(self) -> None:
        self._h = hashlib.sha1()
        self.last = ""

    def add(self, offset: int, digest: str) -> None:
        self._h.update(f"{offset}:{digest};".encode())
        self.last = digest

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@dataclass(frozen=True)
class Divergence:
    """The store of one partition disagrees with the topic from ``resume_at`` on."""

    topic: str
    partition: int
    resume_at: int
    bad: list[BatchInfo]
    reason: str


def _batches_newest_first(store: FeatureStore, kind: str, topic: str, partition: int,
                          namespace: str) -> list[BatchInfo]:
    out = []
    for first, last in reversed(store.ranges(kind, topic, partition, namespace)):
        bid = batch_id_for(topic, partition, first, last)
        out.append(BatchInfo(bid, store.batch_path(kind, bid, namespace), store.manifest(kind, bid, namespace)))
    return out


def _read_chain(consumer: Any, tp: Any, first: int, last: int, timeout_s: float = 30.0) -> tuple[str, str]:
    """(chain, last digest) of the topic's records in ``[first, last]``; "" when the log ends before."""
    end = consumer.end_offsets([tp])[tp]
    if end <= last:
        return "", ""
    chain = FingerprintChain()
    consumer.assign([tp])
    consumer.seek(tp, first)
    deadline = time.monotonic() + timeout_s
    while consumer.position(tp) <= last:
        if time.monotonic() > deadline:
            raise TimeoutError(f"could not read {tp.topic}[{tp.partition}] {first}..{last} within {timeout_s} s")
        for msgs in consumer.poll(timeout_ms=500).values():
            for m in msgs:
                if first <= m.offset <= last:
                    chain.add(m.offset, record_fingerprint(m))
    return chain.hexdigest(), chain.last


def find_divergence(store: FeatureStore, kind: str, topic: str, partition: int, namespace: str,
                    consumer: Any) -> Divergence | None:
    """Compare the partition's stored batches with the topic (newest first); None when they agree.

    ``consumer`` is a group-less KafkaConsumer used only for these reads (it is re-assigned).
    """
    from kafka import TopicPartition

    tp = TopicPartition(topic, partition)
    bad: list[BatchInfo] = []
    reason = ""
    for info in _batches_newest_first(store, kind, topic, partition, namespace):
        fp = info.manifest.get("fingerprints")
        r = info.manifest["ranges"][0]
        if not fp or "chain" not in fp:
            break  # written before fingerprints: trusted
        chain, _ = _read_chain(consumer, tp, int(r["first_offset"]), int(r["last_offset"]))
        if chain == fp["chain"]:
            break
        if not reason:
            reason = (f"the topic ends before offset {r['last_offset']}" if not chain else
                      f"other records now sit at offsets {r['first_offset']}..{r['last_offset']}")
        bad.append(info)
    if not bad:
        return None
    resume_at = int(bad[-1].manifest["ranges"][0]["first_offset"])
    return Divergence(topic, partition, resume_at, bad, reason)


def quarantine(store: FeatureStore, kind: str, namespace: str, div: Divergence) -> Path:
    """Move the divergent batches aside (``.avro`` first: the batch stops existing at once) with a
    note saying why; returns the quarantine directory."""
    d = store.directory(kind, namespace)
    qdir = d / QUARANTINE_DIR
    qdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for info in div.bad:
        # journaled first (as FeatureStore.remove_batch does): a reader's index stops listing it at once
        with contextlib.suppress(OSError):
            index_append(d, "del", info.batch_id)
        for suffix in (".avro", ".json"):
            src = d / f"{info.batch_id}{suffix}"
            if src.exists():
                os.replace(src, qdir / f"{info.batch_id}{suffix}")
        note = {"batch_id": info.batch_id, "quarantined_at": stamp, "reason": div.reason,
                "resumed_at_offset": div.resume_at, "topic": div.topic, "partition": div.partition}
        (qdir / f"{info.batch_id}.why.json").write_text(json.dumps(note, indent=1) + "\n")
    fsync_dir(qdir)
    fsync_dir(d)
    return qdir


def quarantined(feature_store: Path | str) -> list[dict[str, Any]]:
    """Every quarantine note under a feature store (for ``streamlearn status``), oldest first
    (none on object storage, where quarantine is not available)."""
    out: list[dict[str, Any]] = []
    if isinstance(feature_store, str) and "://" in feature_store:
        return out
    root = Path(feature_store)
    for note in sorted(root.glob(f"*/*/{QUARANTINE_DIR}/*.why.json")):
        try:
            data = json.loads(note.read_text())
        except (OSError, ValueError):
            continue
        data["namespace"], data["kind"] = note.parents[2].name, note.parents[1].name
        data["path"] = str(note.parent)
        out.append(data)
    return sorted(out, key=lambda n: (n.get("quarantined_at", ""), n.get("batch_id", "")))
