"""Join answered requests to labels that arrive later on the raw topics (for the canary judge).

A request carrying a raw event is remembered (bounded, oldest forgotten first) under the event's
idempotency key with a digest of the event (label excluded); when the *same* event shows up on its
raw topic *with* a label (e.g. a web-log line labelled ``bot`` by a later analysis), the answer's
live error is computed by the version that answered and fed to :meth:`VersionManager.record_error`.

Trust: only labels from the raw topics (what ingest produced) judge the canary. A request's own
label is ignored, and a remembered answer is judged only when the raw event equals the requested
one apart from the label, so a client cannot pair a real label with an input of its choosing.
Keys longer than MAX_ID_CHARS are not remembered. In score-the-stream mode the events come from the
raw topic itself and the error is computed at once by the worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from serving.model import LoadedVersion
from serving.versions import VersionManager
from streaming.config import Settings
from streaming.kafka_security import kafka_security
from streaming.limits import MAX_ID_CHARS
from streaming.topics import event_key, raw_topic

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)  # JSON 12 and Avro 12.0 are the same event
    if isinstance(value, bytes | bytearray | memoryview):
        return hashlib.sha256(bytes(value)).hexdigest()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def event_digest(event: dict[str, Any]) -> str:
    """sha256 of an event without its label (nor ``source``, nor nulls, which Avro defaults fill in)."""
    body = {k: v for k, v in event.items() if k not in ("label", "source") and v is not None}
    return hashlib.sha256(json.dumps(_plain(body), sort_keys=True).encode()).hexdigest()


class LabelJoiner:
    """Remembers unlabelled answers and completes them from labelled raw events, in a thread."""

    def __init__(self, settings: Settings, kind: str, manager: VersionManager, capacity: int = 20_000) -> None:
        self.settings = settings
        self.kind = kind
        self.manager = manager
        self.capacity = capacity
        self.joined = 0
        self.seen = 0  # raw events read (for tests and debugging)
        self._pending: OrderedDict[str, tuple[LoadedVersion, np.ndarray, str]] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def remember(self, event: dict[str, Any], lv: LoadedVersion, outputs: np.ndarray) -> None:
        key = event_key(self.kind, event)
        if key is None or len(str(key)) > MAX_ID_CHARS:
            return
        digest = event_digest(event)
        with self._lock:
            self._pending[str(key)] = (lv, outputs, digest)
            while len(self._pending) > self.capacity:
                self._pending.popitem(last=False)

    def start(self) -> LabelJoiner:
        self._thread = threading.Thread(target=self._run, name=f"labels-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def offer(self, event: dict[str, Any]) -> bool:
        """A raw event arrived: if it is labelled and completes a remembered answer, judge it."""
        key = event_key(self.kind, event)
        with self._lock:
            hit = self._pending.get(str(key)) if key is not None else None
        if hit is None:
            return False
        lv, outputs, digest = hit
        if lv.featurizer is None or event_digest(event) != digest:
            return False  # not the event that was answered: its label says nothing about that answer
        try:  # a fresh state: only the labels of this one record are wanted
            labels = lv.featurizer.featurize(event, lv.featurizer.new_state()).labels
        except Exception:  # an invalid raw event is the stream workers' business, not ours
            return False
        err = lv.error(outputs, labels)
        if err is None:
            return False
        with self._lock:
            self._pending.pop(str(key), None)
        self.manager.record_error(lv.version, err)
        self.joined += 1
        return True

    def _run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        from schemas.registry import open_registry
        from schemas.serde import AvroDeserializer
        from streaming.consumer import IdlePoller

        decode = AvroDeserializer(open_registry(self.settings.registry_url, self.settings.registry_dir))
        topic = raw_topic(self.settings, self.kind)
        consumer = KafkaConsumer(bootstrap_servers=self.settings.bootstrap, enable_auto_commit=False,
                                 isolation_level="read_committed", **kafka_security(self.settings))
        poller: IdlePoller | None = None  # its probe socket is closed with the consumer
        try:
            parts = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            consumer.seek_to_end(*tps)
            poller = IdlePoller(consumer, max_idle_s=0.25)  # labels arrive late anyway; no fetch spin meanwhile
            while not self._stop.is_set():
                for recs in poller.poll(timeout_ms=300).values():
                    for rec in recs:
                        try:
                            event = decode(rec.value).value
                        except Exception:  # undecodable raw records are dead-lettered by the stream workers
                            continue
                        self.seen += 1
                        if isinstance(event, dict):
                            self.offer(event)
        except Exception as exc:
            log.warning("label joiner for %s stopped: %s; the canary judge uses in-record labels only", topic, exc)
        finally:
            if poller is not None:
                poller.close()
            consumer.close()
