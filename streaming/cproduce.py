"""A C producer (confluent-kafka / librdkafka) behind the Publisher's producer seam.

Why: kafka-python spends 50-70 µs of Python per sent record (batch building, its sender thread), more
than the Avro encode and the ack ledger together, so ``Publisher.publish`` ran at ~0.6x a raw
kafka-python send however lean its own path was. librdkafka does the same work in C at ~4 µs of client
CPU a record and sends 2x as fast (``python -m benchmarks.bench_client_lever``, docs/SDK_PERF.md).

What it keeps. The producer is configured with the Publisher's durability (acks=all, idempotence,
snappy, linger 5 ms, 120 s delivery timeout) and the Java client's key partitioner
(``murmur2_random``, also kafka-python's), so every key keeps its partition whichever client sent it.
:class:`CProducer` speaks the part of kafka-python's ``KafkaProducer`` that the platform uses:
``send(topic, value, key, headers, partition, timestamp_ms)`` returning a kafka-python future that
resolves with a ``RecordMetadata``; ``flush``, ``close``, ``partitions_for``. So the ack ledger
(:mod:`streaming.ackguard`) works on it unchanged. A delivery-report thread serves librdkafka's
callbacks, as kafka-python's IO thread does.

A broker crash. The embedded broker comes back from ``kill -9`` without the tail of its log and
without the producer's sequence numbers. librdkafka's idempotent producer treats that as a *fatal*
error and refuses every later send (measured, docs/SDK_PERF.md). kafka-python reports it as a
retriable ``OutOfOrderSequenceNumberError`` instead. Here a fatal error purges what is queued and in
flight, fails each of those sends with ``OutOfOrderSequenceNumberError`` and starts a new librdkafka
instance. The ledger then sends them again, as it does for kafka-python's failures. The duplicate risk
is the same: a purged in-flight send may have been written.

Errors map onto kafka-python's classes (broker codes through ``kafka.errors.for_code``), so
``RESEND_ERRORS`` and every caller's ``except`` keep their meaning.

Used when :func:`eligible` says so: ``Settings.fast_publisher`` on (default), no producer overrides
(transactions, tuning), a PLAINTEXT listener (the security settings are kafka-python's names), and
confluent-kafka importable. Otherwise the Publisher sends with kafka-python as before.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kafka import errors as kerr
from kafka.future import Future
from kafka.producer.future import RecordMetadata
from kafka.structs import TopicPartition

from streaming.config import Settings
from streaming.kafka_security import kafka_security

try:  # optional at import (~4 ms): eligible() says whether it is there
    import confluent_kafka as _ck
except Exception:  # noqa: BLE001 - an ImportError or a librdkafka load error: kafka-python sends
    _ck = None

log = logging.getLogger(__name__)

POLL_S = 0.1  # the delivery thread's wait for callbacks (C-side, the GIL released)
PARTITIONS_TIMEOUT_S = 10.0
DRAIN_S = 60.0  # how long a replaced (fatal) instance is polled for the reports of its purged sends


def eligible(settings: Settings, overrides: dict[str, Any]) -> bool:
    """True when the Publisher may send with librdkafka (see the module docstring)."""
    return settings.fast_publisher and not overrides and not kafka_security(settings) and _ck is not None


def librdkafka_config(config: dict[str, Any]) -> dict[str, Any]:
    """librdkafka settings from the kafka-python ``producer_config`` the Publisher would have used."""
    return {
        "bootstrap.servers": config["bootstrap_servers"],
        "acks": "all",
        "enable.idempotence": True,
        "compression.type": config.get("compression_type") or "none",
        "linger.ms": config.get("linger_ms", 5),
        "batch.size": config.get("batch_size", 256 * 1024),
        "message.max.bytes": config.get("max_request_size", 2_000_000),
        "message.timeout.ms": config.get("delivery_timeout_ms", 120_000),
        "request.timeout.ms": config.get("request_timeout_ms", 30_000),
        "partitioner": "murmur2_random",  # the Java client's, and kafka-python's, for keyed records
        "queue.buffering.max.kbytes": 128 * 1024,
    }


#: librdkafka's local (negative) error names -> kafka-python classes. What a broker restart causes is a
#: class in ackguard.RESEND_ERRORS, so the ledger sends again; what the record itself causes is not.
_LOCAL: dict[str, type[kerr.KafkaError]] = {
    "_MSG_TIMED_OUT": kerr.KafkaTimeoutError,
    "_TIMED_OUT": kerr.KafkaTimeoutError,
    "_TRANSPORT": kerr.KafkaConnectionError,
    "_ALL_BROKERS_DOWN": kerr.KafkaConnectionError,
    "_FATAL": kerr.OutOfOrderSequenceNumberError,
    "_PURGE_QUEUE": kerr.OutOfOrderSequenceNumberError,
    "_PURGE_INFLIGHT": kerr.OutOfOrderSequenceNumberError,
    "_INCONSISTENT": kerr.OutOfOrderSequenceNumberError,
    "_MSG_SIZE_TOO_LARGE": kerr.MessageSizeTooLargeError,
    "_UNKNOWN_TOPIC": kerr.UnknownTopicOrPartitionError,
    "_UNKNOWN_PARTITION": kerr.UnknownTopicOrPartitionError,
}


def kafka_python_error(err: Any) -> BaseException:
    """A kafka-python exception for a librdkafka ``KafkaError``."""
    code, name, text = err.code(), err.name(), err.str()
    if code >= 0:
        cls: type[BaseException] = kerr.for_code(code)
    else:
        cls = _LOCAL.get(name, kerr.KafkaTimeoutError if err.retriable() else kerr.KafkaError)
    return cls(f"{name}: {text} (librdkafka)")


class _ClientLog:
    """librdkafka's own log lines, at most WARNING: a broker restart makes it log each failed reconnect
    as an error, and a fatal error as critical, while the adapter recovers from both (its own WARNING
    says so). Facility and client name are kept in the line."""

    def log(self, level: int, msg: str, *args: Any) -> None:
        log.log(min(level, logging.WARNING), "librdkafka: " + msg, *args)


class SendFuture(Future):
    """kafka-python's record future as far as callers use it: callbacks, ``is_done``, ``value``,
    ``exception``, and ``get(timeout)``."""

    def get(self, timeout: float | None = None) -> Any:
        """Wait for the delivery report (KafkaTimeoutError after ``timeout``), then the metadata or the error."""
        if not self.is_done:
            done = threading.Event()
            self.add_both(lambda _result: done.set())
            if not done.wait(timeout):
                raise kerr.KafkaTimeoutError(f"Timeout after waiting for {timeout} secs.")
        if self.exception is not None:
            raise self.exception
        return self.value


def record_metadata(msg: Any, key_size: int, value_size: int) -> RecordMetadata:
    """kafka-python's ``RecordMetadata`` of a delivered librdkafka message."""
    topic, partition = msg.topic(), msg.partition()
    return RecordMetadata(topic, partition, TopicPartition(topic, partition), msg.offset(), msg.timestamp()[1],
                          None, key_size, value_size, -1)


class CProducer:
    """kafka-python's producer interface, as far as the platform uses it, on librdkafka."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)  # kafka-python names (what callers read back, e.g. max_request_size)
        self._settings = librdkafka_config(config)
        self._lock = threading.Lock()  # guards swapping the instance after a fatal error
        self._producer = self._new()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="librdkafka-deliveries", daemon=True)
        self._thread.start()

    def _new(self) -> Any:
        return _ck.Producer({**self._settings, "logger": _ClientLog(), "error_cb": self._on_error})

    # ---- sending ---------------------------------------------------------------------------
    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
             headers: list[tuple[str, bytes]] | None = None, partition: int | None = None,
             timestamp_ms: int | None = None) -> SendFuture:
        """Queue one record; the future resolves with its ``RecordMetadata`` or fails with a kafka-python error."""
        fut = SendFuture()
        size_k, size_v = len(key) if key else 0, len(value) if value else 0

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                fut.failure(kafka_python_error(err))
            else:
                fut.success(record_metadata(msg, size_k, size_v))

        kwargs: dict[str, Any] = {}
        if partition is not None:
            kwargs["partition"] = partition
        if timestamp_ms is not None:
            kwargs["timestamp"] = timestamp_ms
        self.produce(topic, value, key, headers, delivered, **kwargs)
        return fut

    def produce(self, topic: str, value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]] | None,
                on_delivery: Any, **kwargs: Any) -> None:
        """Queue one record; ``on_delivery(err, msg)`` runs on the delivery thread (librdkafka's arguments:
        :func:`kafka_python_error` and :func:`record_metadata` turn them into kafka-python's). The ack
        ledger calls this directly, one bound method per record and no future in between
        (``streaming.ackguard``); ``send`` wraps it for everyone else."""
        if self._closed.is_set():  # as kafka-python's closed producer: the ledger gives the send up, the caller sees it
            raise kerr.KafkaError("the producer is closed")
        if headers:
            kwargs["headers"] = headers
        deadline = 0.0
        while True:
            producer = self._producer
            try:
                producer.produce(topic, value, key, on_delivery=on_delivery, **kwargs)
                return
            except BufferError:  # the local queue is full: the delivery thread drains it
                now = time.monotonic()
                deadline = deadline or now + self.config.get("max_block_ms", 60_000) / 1000
                if now > deadline:
                    raise kerr.KafkaTimeoutError("librdkafka's send queue stayed full") from None
                time.sleep(0.005)  # backpressure on a full client queue, not a wait for an event
            except _ck.KafkaException as exc:
                err = exc.args[0]
                if err.fatal() or err.name() == "_FATAL":
                    self._recover(producer, err)
                    continue
                raise kafka_python_error(err) from exc

    # ---- librdkafka's callbacks and errors -------------------------------------------------------
    def _serve(self) -> None:
        while not self._closed.is_set():
            producer = self._producer
            try:
                producer.poll(POLL_S)
            except _ck.KafkaException as exc:  # a fatal error surfaces here too
                if exc.args and exc.args[0].fatal():
                    self._recover_logged(producer, exc.args[0])
                else:
                    log.warning("librdkafka delivery thread: %s", exc)
            except Exception as exc:  # a callback's error must not end the thread that serves them all
                log.warning("librdkafka delivery thread: %s: %s", type(exc).__name__, exc)

    def _recover_logged(self, broken: Any, err: Any) -> None:
        """:meth:`_recover` where nothing may escape: on the delivery thread (which must live on: every
        later report comes through it) and on the error callback's thread."""
        try:
            self._recover(broken, err)
        except Exception:  # noqa: BLE001 - logged with its traceback; the next fatal error tries again
            log.exception("replacing the librdkafka producer after a fatal error failed")

    def _on_error(self, err: Any) -> None:
        """librdkafka's global errors: a fatal one replaces the instance; the rest are logged (and
        retried by librdkafka itself)."""
        if err.fatal():
            threading.Thread(target=self._recover_logged, args=(self._producer, err), daemon=True).start()
        elif err.name() not in ("_TRANSPORT", "_ALL_BROKERS_DOWN"):
            log.warning("librdkafka: %s", err.str())
        else:
            log.debug("librdkafka: %s", err.str())

    def _recover(self, broken: Any, err: Any) -> None:
        """Replace ``broken`` after a fatal error: its queued and in-flight sends fail (retriable, so the
        ack ledger sends them again) and a new instance takes the next sends."""
        with self._lock:
            if self._producer is not broken:
                return  # another thread already replaced it
            log.warning("librdkafka producer hit a fatal error (%s), e.g. after a broker restart lost its "
                        "sequence state; failing its pending sends for a re-send and starting a new one", err.str())
            self._producer = self._new()
        try:
            broken.purge(in_queue=True, in_flight=True, blocking=False)
        except Exception as exc:  # noqa: BLE001 - the purge is best effort; the drain below still fails them
            log.debug("purge after a fatal error: %s", exc)
        # Every send of the broken instance must get its report, or the ledger waits for it forever: poll
        # it until it holds none. A fatal instance's poll may raise its error again; that is not the end.
        deadline = time.monotonic() + DRAIN_S
        while len(broken) and time.monotonic() < deadline:
            try:
                broken.poll(0.05)
            except Exception as exc:  # noqa: BLE001 - the fatal error again, or a callback's
                log.debug("draining the replaced producer: %s", exc)
        if len(broken):
            log.error("%d sends of the replaced librdkafka producer got no delivery report in %.0f s; a source "
                      "restarted with the same command sends them from its checkpoint", len(broken), DRAIN_S)

    # ---- the rest of the interface ------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued record is delivered or failed (its future resolved)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            producer = self._producer
            left = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                remaining = producer.flush(left)
            except _ck.KafkaException as exc:  # fatal: its sends fail for a re-send; flush the new instance
                self._recover(producer, exc.args[0])
                continue
            if producer is not self._producer:
                continue  # replaced meanwhile: what is pending is on the new instance
            if remaining:
                raise kerr.KafkaTimeoutError(f"{remaining} records not delivered after {timeout} s")
            return

    def partitions_for(self, topic: str, timeout_s: float = PARTITIONS_TIMEOUT_S) -> set[int]:
        """The topic's partitions, from a metadata request made now (so it also says whether a broker
        answers within ``timeout_s``: the gateway's health check)."""
        if self._closed.is_set():
            raise kerr.KafkaConnectionError("the producer is closed: it reaches no broker")
        try:
            md = self._producer.list_topics(topic, timeout=timeout_s)
        except _ck.KafkaException as exc:
            raise kafka_python_error(exc.args[0]) from exc
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None:
            return set()
        return set(meta.partitions)

    def close(self, timeout: float | None = None) -> None:
        if self._closed.is_set():
            return
        try:
            self.flush(timeout if timeout is not None else 30.0)
        except kerr.KafkaTimeoutError as exc:
            log.warning("closing the producer: %s", exc)
        finally:
            self._closed.set()
            self._thread.join(timeout=2 * POLL_S + 1)
