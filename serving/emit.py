"""Emitting a serving batch: answers, dead letters and offsets, atomically, and what to do when the
broker refuses them (issue 12, items 0 and 1).

Split from :mod:`serving.worker` (which decodes, routes and predicts) so each stays readable. The
rules: every answer fits the broker (cut with a digest otherwise); a reply topic that is missing or
incompatible is that request's error, answered on the default topic; a batch the broker refuses is
resent once in *safe* mode (every answer on the default topic, every record cut to
SAFE_RECORD_BYTES), so no single request can make the worker redo one batch forever; when the safe
batch fails too the broker itself is the problem, and the batch is redone after a backoff that a
SIGTERM ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas.exceptions import RegistryUnavailableError
from schemas.serde import AvroSerializer
from serving.exceptions import RequestDecodeError
from serving.model import LoadedVersion
from serving.replies import LEGAL_TOPIC, ReplyTopics, SerializerCache, cut_answer, error_text
from streaming.clock import now_ms
from streaming.config import Settings
from streaming.limits import BrokerLimits, effective_limit, fit_record, record_size, short
from streaming.watchdog import Watchdog, untimed

log = logging.getLogger(__name__)

#: How many answered request ids the at-least-once mode remembers for de-duplication (ids are
#: capped at MAX_ID_CHARS, so the map holds at most ~DEDUPE_IDS * 300 bytes of ids).
DEDUPE_IDS = 100_000
#: In a redo after a failed transaction, answers and dead letters are cut to this many bytes.
SAFE_RECORD_BYTES = 64 * 1024
#: Longest wait between redos of a batch the broker keeps refusing (a SIGTERM ends the wait).
MAX_REDO_BACKOFF_S = 10.0


@dataclass
class Item:
    """One input of a batch and, once computed, its answer."""

    rec: Any  # kafka ConsumerRecord
    request_id: str
    timestamp_ms: int
    reply_topic: str
    value: Any = None  # the decoded PredictionRequest (or raw event in score-the-stream mode)
    event: dict[str, Any] | None = None  # the raw event of an event_json request (for the label join)
    x: np.ndarray | None = None
    labels: dict[str, float | None] | None = None
    version: LoadedVersion | None = None
    error: BaseException | None = None
    outputs: np.ndarray | None = None
    output_list: list[float] | None = None  # outputs as Python floats, converted once per batch
    label: str | None = None


class Emitter:
    """Mixin of :class:`serving.worker.ServingWorker`: the attributes below are set by the worker."""

    settings: Settings
    model: str
    predictions: str
    dead_letters: str
    producer: Any
    consumer: Any
    replies: ReplyTopics
    broker_limits: BrokerLimits
    stop_event: threading.Event
    answered: int
    batches: int
    last_batch_at: float | None
    _serializers: SerializerCache
    _answered: OrderedDict[str, None]
    _redo_backoff_s: float
    #: the command line's liveness watchdog (streaming/watchdog.py); waits on the broker are not timed
    watchdog: Watchdog | None = None
    _m_latency: Any
    _m_ok: Any
    _m_err: Any

    def _prediction(self, item: Item, default_version: int) -> dict[str, Any]:
        lv = item.version
        ok = item.error is None and item.outputs is not None
        return {
            "request_id": item.request_id,
            "model": self.model,
            "model_version": lv.version if lv is not None else default_version,
            "outputs": item.output_list if ok and item.output_list is not None else [],
            "predicted_label": item.label if ok else None,
            "latency_ms": float(max(0, now_ms() - item.timestamp_ms)),
            "input_topic": item.rec.topic,
            "input_partition": int(item.rec.partition),
            "input_offset": int(item.rec.offset),
            "error": None if ok else error_text(item.error or RequestDecodeError("no output")),
        }

    def _serializer(self, topic: str) -> AvroSerializer:
        return self._serializers(topic)

    def _answer(self, item: Item, default_version: int, safe: bool) -> tuple[str, bytes, bytes]:
        """(topic, key, value) of one item's answer: on its reply topic when that topic takes it, else
        an error answer on the default topic; cut to fit the broker (``safe``: to SAFE_RECORD_BYTES)."""
        pred = self._prediction(item, default_version)
        topic = item.reply_topic
        if safe and topic != self.predictions:
            item.error = RequestDecodeError(f"reply_topic: {topic!r} refused the answer; answered here instead")
            topic = item.reply_topic = self.predictions
            pred = self._prediction(item, default_version)
        try:
            value = self._serializer(topic)(pred)
        except RegistryUnavailableError:
            if topic == self.predictions:
                raise  # not the request's fault: the batch is retried
            value = b""
            failure: Exception | None = RequestDecodeError(f"reply_topic: {topic!r}: schema registry unavailable")
        except Exception as exc:  # e.g. an incompatible subject on the reply topic
            if topic == self.predictions:
                raise
            value, failure = b"", exc
        else:
            failure = None
        if failure is not None:
            item.error = RequestDecodeError(f"reply_topic: {topic!r} cannot take Prediction records: "
                                            f"{short(str(failure), 300)}")
            self._serializers.drop(topic)
            topic = item.reply_topic = self.predictions
            pred = self._prediction(item, default_version)
            value = self._serializer(topic)(pred)
        key = item.request_id.encode("utf-8", "replace")
        budget = SAFE_RECORD_BYTES if safe else effective_limit(self.broker_limits.limit(topic))
        if len(value) + len(key) + 256 > budget:
            pred = cut_answer(pred, len(value), budget)
            value = self._serializer(topic)(pred)
        return topic, key, value

    def _sends(self, items: list[Item], default_version: int, safe: bool) -> tuple[list[Any], int]:
        from streaming.producer import dead_letter_headers

        sends: list[tuple[str, bytes, bytes, list[tuple[str, bytes]] | None]] = []
        n_err = 0
        for item in items:
            topic, key, value = self._answer(item, default_version, safe)
            sends.append((topic, key, value, None))
            if item.error is not None:
                headers = dead_letter_headers("serving", item.error, {
                    "topic": item.rec.topic, "partition": item.rec.partition, "offset": item.rec.offset})
                limit = SAFE_RECORD_BYTES * 2 if safe else self.broker_limits.limit(self.dead_letters)
                dl_value, dl_key, dl_headers = fit_record(item.rec.value or b"", item.rec.key or key, headers,
                                                          broker_limit=limit)
                sends.append((self.dead_letters, dl_key or key, dl_value, dl_headers))
            n_err += item.error is not None
        return sends, n_err

    def _emit(self, records: list[Any], items: list[Item], default_version: int) -> bool:
        """Produce answers and dead letters and move the offsets past ``records``, atomically.

        When the broker refuses the batch (a reply topic gone, a record it finds too large), the
        batch is sent again at once in *safe* mode: every answer on the default topic, every record
        cut to SAFE_RECORD_BYTES, so one request cannot make the batch fail forever. When that fails
        too, the broker itself is the problem: the batch is redone after a backoff that a SIGTERM
        ends. Returns False when the batch is to be redone.
        """
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        first: dict[Any, int] = {}
        offsets: dict[Any, Any] = {}
        for rec in records:
            tp = TopicPartition(rec.topic, rec.partition)
            first.setdefault(tp, rec.offset)
            offsets[tp] = OffsetAndMetadata(rec.offset + 1, "", -1)
        failure: Exception | None = None
        for safe in (False, True):
            sends, n_err = self._sends(items, default_version, safe)
            try:
                if self.settings.transactions:
                    self._emit_transaction(sends, offsets)
                else:
                    self._emit_flush(sends, offsets)
            except _SendFailed as exc:
                failure = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
                for topic, *_ in sends:
                    self.replies.forget(topic)
                log.warning("%s of %d answers failed (%s: %s); %s", "transaction" if self.settings.transactions
                            else "send", len(sends), type(failure).__name__, short(str(failure), 300),
                            "redoing the batch after a backoff" if safe else "resending it in safe mode")
                continue
            if safe:
                log.info("batch of %d answers sent in safe mode (%d errors)", len(items), n_err)
            self._redo_backoff_s = 0.0
            self._count(items, n_err)
            return True
        self._redo(first, failure)
        return False

    def _redo(self, first: dict[Any, int], failure: Exception | None) -> None:
        """Seek back to the batch's first offsets and wait (SIGTERM-aware) before it is re-read."""
        assigned = self.consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned:
                self.consumer.seek(tp, offset)
        self._redo_backoff_s = min(MAX_REDO_BACKOFF_S, max(0.2, self._redo_backoff_s * 2))
        with untimed(self.watchdog, "redo backoff"):
            self.stop_event.wait(self._redo_backoff_s)

    def _count(self, items: list[Item], n_err: int) -> None:
        for item in items:
            self._m_latency.observe(max(0, now_ms() - item.timestamp_ms) / 1000.0)
        if not self.settings.transactions:
            for item in items:
                self._answered[item.request_id] = None
            while len(self._answered) > DEDUPE_IDS:
                self._answered.popitem(last=False)
        self._m_ok.inc(len(items) - n_err)
        self._m_err.inc(n_err)
        self.answered += len(items)
        self.batches += 1
        self.last_batch_at = time.monotonic()

    def _emit_flush(self, sends: list[tuple[str, bytes, bytes, Any]], offsets: dict[Any, Any]) -> None:
        self._precheck(sends)
        with untimed(self.watchdog, "flush and commit"):
            try:
                futures = [self.producer.send(t, key=k, value=v, headers=h) for t, k, v, h in sends]
                self.producer.flush(timeout=60)
                for f in futures:
                    f.get(timeout=30)  # raises if a send failed: offsets are then not committed
            except Exception as exc:
                raise _SendFailed(str(exc)) from exc
            self.consumer.commit(offsets)

    def _precheck(self, sends: list[tuple[str, bytes, bytes, Any]]) -> None:
        """Refuse a batch the client would refuse record by record, *before* any transaction starts.

        Why: a send() that raises in the middle of a transaction (record over the producer's
        max_request_size, illegal topic name) leaves earlier records of the transaction in flight
        while it is aborted; failing before ``begin_transaction`` avoids that race entirely.
        """
        max_request = int(self.producer.config.get("max_request_size", 1_048_576))
        for topic, key, value, headers in sends:
            size = record_size(value, key, headers)
            if size > max_request:
                raise _SendFailed(f"a record for {topic!r} is {size} bytes, over the producer's max_request_size "
                                  f"{max_request}")
            if not LEGAL_TOPIC.match(topic):
                raise _SendFailed(f"topic {short(topic, 80)!r} is not a legal topic name")

    def _emit_transaction(self, sends: list[tuple[str, bytes, bytes, Any]], offsets: dict[Any, Any]) -> None:
        self._precheck(sends)
        # kafka-python waits for the transaction's round trips without a timeout: during a broker outage
        # this is where the loop waits, and the watchdog must not take that for a hang.
        with untimed(self.watchdog, "kafka transaction"):
            try:
                self.producer.begin_transaction()
                futures = [self.producer.send(topic, key=key, value=value, headers=headers)
                           for topic, key, value, headers in sends]
                self.producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
                # Every record must be acked before the commit. kafka-python 3.0.12 "commits" a transaction
                # none of whose partitions could be added (a reply topic deleted after the worker checked
                # it) without sending EndTxn and without an error: the batch's requests were consumed and
                # never answered, and the next transaction committed offsets past them.
                self.producer.flush()
                failed = next((f for f in futures if not f.succeeded()), None)
                if failed is not None:
                    raise failed.exception or RuntimeError("a record of the transaction was not acknowledged")
                self.producer.commit_transaction()
            except Exception as exc:  # KafkaError, or ValueError/timeout raised by send() itself
                if _transaction_state(self.producer) != "READY":  # READY: the client ended it already
                    self.producer.abort_transaction()  # a fatal error (fenced) raises here and stops the worker
                raise _SendFailed(str(exc)) from exc


def _transaction_state(producer: Any) -> str | None:
    """The producer's transaction state name (kafka-python 3.0.12's private TransactionManager), or None.

    Why: when none of a transaction's partitions could be added (a reply topic deleted after the worker
    checked it), kafka-python ends the transaction itself, back in READY, without EndTxn; its next
    send raised "Cannot call send in state READY" and abort_transaction() "Invalid transition from
    READY", which stopped the worker. Nothing is left to abort then, and the batch is resent."""
    manager = getattr(producer, "_transaction_manager", None)
    state = getattr(manager, "_current_state", None)
    return getattr(state, "name", None)


class _SendFailed(Exception):
    """The broker refused (part of) a batch; the cause is the client's error."""
