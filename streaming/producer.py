"""Publisher SDK: validate, Avro-encode, frame, key and send records to Kafka.

Every record is validated against its schema before it is encoded (the error names the field
and the value), framed in the Confluent wire format with its registry id, keyed stably so that
one sensor / client / image always lands on the same partition (kafka-python's default
partitioner is murmur2 over the key bytes, the same as the Java client; never Python's
``hash()``), compressed with snappy and sent with ``acks=all`` and idempotence, so a retry
after a lost ack does not duplicate. The client is librdkafka where :func:`streaming.cproduce.eligible`
allows (default settings, PLAINTEXT), else kafka-python; both partition keys the same way.

Sends are asynchronous: each returns a future; ``flush()`` waits for all of them. Records
larger than ``max_record_bytes``, and keys over ``streaming.limits.MAX_KEY_BYTES``, are refused
before sending with a message that states the limit (docs/SECURITY.md, "Hostile input").

Acked is not yet kept on the embedded broker (it persists about once a second): every send goes
through a :class:`streaming.ackguard.AckLedger`, which keeps acked records for
``broker_loss_window_s`` and re-sends those a broker restart lost. ``settle()`` waits until all
are confirmed; sources call it before they exit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaTimeoutError

from schemas.catalog import load_schema, value_subject
from schemas.registry import SchemaRegistry, open_registry
from schemas.serde import AvroSerializer
from streaming import cproduce, limits, tenancy
from streaming.ackguard import AckLedger, GuardedSend
from streaming.config import Settings
from streaming.exceptions import RecordTooLargeError
from streaming.kafka_security import kafka_security
from streaming.limits import MAX_KEY_BYTES, BrokerLimits, InputLimitError, fit_record
from streaming.topics import KINDS, dead_letter_topic, raw_topic

log = logging.getLogger(__name__)

#: The field of each record type whose value is the Kafka key.
KEY_FIELDS: dict[str, str] = {
    "WebLogEvent": "client_ip",
    "SensorReading": "sensor_id",
    "ImageEvent": "image_id",
    "PredictionRequest": "request_id",
    "Prediction": "request_id",
    "ModelUpdate": "model",
}

DEFAULT_MAX_RECORD_BYTES = 1_000_000  # Kafka's default message.max.bytes is ~1 MB
#: How long a stopping process waits for its records in flight to be acked before it gives them up (they
#: are not checkpointed or answered, so they are sent again). Below the 20 s ``streamlearn up`` allows a
#: worker between SIGTERM and SIGKILL, so a supervised process ends on its own and says what it gave up.
STOP_GRACE_S = 15.0
#: A waiting ``flush`` checks its ``give_up`` event this often, and says what it waits for every WAIT_NOTE_S.
WAIT_STEP_S = 0.25
WAIT_NOTE_S = 10.0

Headers = list[tuple[str, bytes]]


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Throughput-tuned, durable producer settings shared by every streamlearn producer."""
    cfg: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap,
        "acks": "all",
        "enable_idempotence": True,
        "compression_type": "snappy",
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "max_request_size": 2 * DEFAULT_MAX_RECORD_BYTES,
        "retries": 2**31 - 1,
        "delivery_timeout_ms": 120_000,
        "request_timeout_ms": 30_000,
        "max_in_flight_requests_per_connection": 5,
    }
    cfg.update(kafka_security(settings))
    cfg.update(overrides)
    tenancy.check_transactional_id(settings, cfg.get("transactional_id"))
    return cfg


def dead_letter_headers(stage: str, error: BaseException | str, source: Mapping[str, object]) -> Headers:
    """The reason headers every dead letter carries (see docs/ARCHITECTURE.md)."""
    if isinstance(error, BaseException):
        error_class, message = type(error).__name__, str(error)
    else:
        error_class, message = "Rejected", str(error)
    headers: Headers = [("dl.stage", stage.encode()), ("dl.error_class", error_class[:200].encode()),
                        ("dl.message", message[:2000].encode("utf-8", "replace"))]
    for name, value in source.items():  # source values come from records: cut like the message
        headers.append((f"dl.source_{name}", str(value)[:2000].encode("utf-8", "replace")))
    return headers


def _key_too_long(topic: str, key: bytes) -> InputLimitError:
    """The error of a key over MAX_KEY_BYTES: names ``key``, the limit and what to do (off the hot path)."""
    return InputLimitError(
        f"key: {len(key)} bytes for topic {topic!r}, over the limit of {MAX_KEY_BYTES} bytes "
        f"(streaming.limits.MAX_KEY_BYTES; it starts {key[:40]!r}); "
        "key the record by a short id (ids are capped at 256 characters), or put a long value in the record")


def header_dict(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    return {k: v.decode("utf-8", "replace") for k, v in (headers or [])}


class Publisher:
    """Publishes records of the platform's schemas (and dead letters) to Kafka.

    One instance per process is enough; kafka-python's producer is thread-safe.

    Example (``settings = streaming.config.load_settings()``; the test suite runs this against the
    embedded broker). ``publish`` validates against the kind's Avro schema, registers it, frames and
    sends; ``settle`` waits until every send is acked and past the broker's loss window::

        >>> from streaming.topics import ensure_topics
        >>> _ = ensure_topics(settings)
        >>> reading = {"sensor_id": "s-1", "timestamp": 1_700_000_000_000, "value": 21.5, "unit": "C"}
        >>> with Publisher(settings) as pub:
        ...     _ = pub.publish("sensor", reading)
        ...     pub.settle()
        True
        >>> with Publisher(settings) as pub:
        ...     pub.publish("sensor", {**reading, "value": "warm"})
        Traceback (most recent call last):
        ...
        schemas.exceptions.RecordValidationError: ...value...
    """

    def __init__(self, settings: Settings, registry: SchemaRegistry | None = None, *,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, give_up: threading.Event | None = None,
                 **producer_overrides: Any) -> None:
        self.settings = settings
        #: Set (by a second Ctrl-C, or a stop's grace running out) to end every wait for acks at once:
        #: see :meth:`flush`. None: the waits last until the broker acks.
        self.give_up = give_up
        #: Records that were still not acked when a wait was given up (0 while none was).
        self.abandoned = 0
        self.registry = registry or open_registry(settings.registry_url, settings.registry_dir)
        self.max_record_bytes = max_record_bytes
        cfg = producer_config(settings, **producer_overrides)
        # librdkafka where it may (streaming/cproduce.py): ~15x less client CPU a record than kafka-python
        self._producer: KafkaProducer | cproduce.CProducer = (
            cproduce.CProducer(cfg) if cproduce.eligible(settings, producer_overrides) else KafkaProducer(**cfg))
        self.ledger = AckLedger(self._producer, settings.bootstrap, window_s=settings.broker_loss_window_s,
                                consumer_config=kafka_security(settings))
        self._serializers: dict[tuple[str, str], AvroSerializer] = {}
        self._raw_topics: dict[str, str] = {}  # kind -> raw topic (settings do not change under a publisher)
        #: kind -> (raw topic, serializer, key field): everything ``publish`` derives per kind, looked up once
        self._kinds: dict[str, tuple[str, AvroSerializer, str]] = {}
        self._allowed: set[str] = set()  # topics that passed the tenant check (same reason)
        self._limits: BrokerLimits | None = None

    # -- encoding -------------------------------------------------------------------------
    def serializer(self, topic: str, record_name: str) -> AvroSerializer:
        """The serializer of ``record_name`` for ``topic`` (subject ``<topic>-value``), cached."""
        ser = self._serializers.get((topic, record_name))
        if ser is None:
            ser = AvroSerializer(self.registry, value_subject(topic), load_schema(record_name))
            self._serializers[(topic, record_name)] = ser
        return ser

    def encode(self, topic: str, record_name: str, record: Mapping[str, Any]) -> bytes:
        """Validate + encode + frame one record (raises RecordValidationError naming the field)."""
        return self.serializer(topic, record_name)(record, {"topic": topic})

    # -- sending --------------------------------------------------------------------------
    def publish(self, kind: str, record: Mapping[str, Any], key: str | bytes | None = None,
                headers: Headers | None = None) -> GuardedSend:
        """Publish one event of ``kind`` (weblog, sensor, image) to its raw topic.

        The same steps as :meth:`publish_to` (tenant check, validate + encode, key from the record,
        then :meth:`_send`: size and key checks, ledgered send), with what depends only on ``kind`` looked up
        once: this is the per-record hot path (``benchmarks/bench_sdk.py``), and the calls and lookups
        it took per record cost about as much as the ack ledger (docs/SDK_PERF.md)."""
        hot = self._kinds.get(kind)
        if hot is None:
            hot = self._kind_path(kind)
        topic, ser, key_field = hot
        value = ser(record)  # validates first: RecordValidationError names the field
        return self._send(topic, value, record.get(key_field) if key is None else key, headers)

    def _kind_path(self, kind: str) -> tuple[str, AvroSerializer, str]:
        """(raw topic, serializer, key field) of ``kind``, cached; the tenant check runs here, once,
        before the serializer (and so the registry) is ever asked, as in :meth:`publish_to`."""
        record_name, topic = self._raw(kind)
        self._check_topic(topic)
        hot = (topic, self.serializer(topic, record_name), KEY_FIELDS[record_name])
        self._kinds[kind] = hot
        return hot

    def _raw(self, kind: str) -> tuple[str, str]:
        """The record name and raw topic of ``kind`` (the topic cached: it is asked per record)."""
        record_name = KINDS.get(kind)
        if record_name is None:
            from streaming.exceptions import UnknownKindError

            raise UnknownKindError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        topic = self._raw_topics.get(kind)
        if topic is None:
            topic = self._raw_topics[kind] = raw_topic(self.settings, kind)
        return record_name, topic

    def publish_many(self, kind: str, records: Iterable[Mapping[str, Any]]) -> list[GuardedSend]:
        """Publish a batch of ``kind`` events: all are validated and encoded first, then all are sent.

        Why: the producer batches what arrives within ``linger_ms``; encoding between sends spreads
        the same records over about twice as many producer batches and sender wake-ups, which cost
        the process more CPU than the encoding itself (``benchmarks/bench_sdk.py``, publish vs
        publish_many). Validation is the same as :meth:`publish` and all or nothing: an invalid record
        raises ``RecordValidationError`` (naming the field) before any record of the batch is sent.
        Keys come from each record's key field, as in :meth:`publish`.
        """
        record_name, topic = self._raw(kind)
        self._check_topic(topic)
        ser = self.serializer(topic, record_name)
        key_field = KEY_FIELDS[record_name]
        encoded = [(ser(r), r.get(key_field)) for r in records]
        return [self._send(topic, value, key, None) for value, key in encoded]

    def publish_to(self, topic: str, record_name: str, record: Mapping[str, Any],
                   key: str | bytes | None = None, headers: Headers | None = None) -> GuardedSend:
        """Publish one record of schema ``record_name`` to any topic (a tenant-scoped publisher: any of
        its tenant's topics; others raise TenantScopeError before the registry or the broker is asked)."""
        self._check_topic(topic)
        ser = self._serializers.get((topic, record_name)) or self.serializer(topic, record_name)
        value = ser(record)  # validates first: RecordValidationError names the field
        if key is None and record_name in KEY_FIELDS:
            key = record.get(KEY_FIELDS[record_name])
        return self._send(topic, value, key, headers)  # the topic was checked above, before encode

    def send_bytes(self, topic: str, value: bytes, key: str | bytes | None = None,
                   headers: Headers | None = None) -> GuardedSend:
        """Send already-encoded bytes (used by dead letters and benchmarks); returns a future
        (:class:`streaming.ackguard.GuardedSend`) with kafka-python's record-future interface."""
        self._check_topic(topic)
        return self._send(topic, value, key, headers)

    def _check_topic(self, topic: str) -> None:
        """The tenant check, once per topic: it is per record on the hot path (bench_sdk publish)."""
        if topic not in self._allowed:
            tenancy.check_topics(self.settings, [topic], "publish to")
            self._allowed.add(topic)

    def _send(self, topic: str, value: bytes, key: str | bytes | None, headers: Headers | None) -> GuardedSend:
        """The one send of ``publish``/``publish_many``/``publish_to``/``send_bytes``: size and key checks,
        then the ledgered send. A key over MAX_KEY_BYTES is refused (InputLimitError naming ``key``):
        every id field is already capped by the schemas' validator, so this only meets a key given
        explicitly or raw bytes, and a 300 KB key must not reach the broker, the partitioner or a
        consumer's dead letter whole. Dead letters do not come here: they cut their key instead."""
        if len(value) > self.max_record_bytes:
            raise RecordTooLargeError(
                f"record for topic {topic!r} is {len(value)} bytes encoded, over the limit of "
                f"{self.max_record_bytes} bytes (max_record_bytes); shrink it (e.g. downscale images) "
                "or raise the limit on the producer and the broker's message.max.bytes")
        key_bytes = key.encode() if isinstance(key, str) else key
        if key_bytes and len(key_bytes) > MAX_KEY_BYTES:
            raise _key_too_long(topic, key_bytes)
        return self.ledger.send(topic, value, key_bytes, headers or None)

    def dead_letter(self, kind: str, original: bytes, *, stage: str, error: BaseException | str,
                    source: Mapping[str, object], key: str | bytes | None = None) -> GuardedSend:
        """Keep a rejected record: the original bytes, with the reason in ``dl.*`` headers.

        Dead letters are never refused for their key: one over MAX_DL_KEY_BYTES is always cut, its
        sha256 and size kept in ``dl.key_sha256``/``dl.key_bytes`` (the source key is whatever a
        foreign producer wrote; refusing it would lose the record). They do not pass :meth:`_send`'s
        MAX_KEY_BYTES check, which is the same number, so a cut key would pass it anyway.

        Dead letters are never refused for size: value, key *and* headers together are cut to the
        broker's real limit (``max.message.bytes`` of the dead-letter topic, else the configured
        ``max_record_bytes``) less a margin, keeping the sha256 and size of what was cut and the
        reason (see :func:`streaming.limits.fit_record`), so a record the broker took can always be
        dead-lettered and never wedges a worker in retries.
        """
        topic = dead_letter_topic(self.settings, kind)
        headers = dead_letter_headers(stage, error, source)
        key_bytes = key.encode("utf-8", "replace") if isinstance(key, str) else key
        value, key_bytes, headers = fit_record(original, key_bytes, headers,
                                               broker_limit=self.record_limit(topic),
                                               reason="dead letter over the broker's record limit")
        log.warning("dead letter (%s, %s): %s", kind, stage, limits.short(str(error), 300))
        return self.ledger.send(topic, value, key_bytes, headers or None)

    def record_limit(self, topic: str) -> int:
        """The broker's record limit for ``topic`` (asked once; the configured value as fallback)."""
        if self._limits is None:
            self._limits = BrokerLimits(self.settings.bootstrap, security=kafka_security(self.settings),
                                        fallback=min(self.max_record_bytes, self.settings.max_record_bytes))
        return self._limits.limit(topic)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every send is acked or has finally failed (re-sends after a broker restart too), and
        is in the ack journal where one is attached. True when it is.

        Raises ``KafkaTimeoutError`` when ``timeout`` passes first. Returns False, with an error logged
        and :attr:`abandoned` set, as soon as :attr:`give_up` is set: why, a broker that is down for good
        would otherwise hold a stopping process here forever (``kill -9`` was the only way out). What is
        given up was never acked, so a source's checkpoint is still before it and the same command sends
        it again. Every ``WAIT_NOTE_S`` of waiting it logs how many records it waits for.
        """
        began = time.monotonic()
        deadline = None if timeout is None else began + timeout
        note_at = began + WAIT_NOTE_S
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            step = WAIT_STEP_S if left is None else max(0.0, min(WAIT_STEP_S, left))
            try:
                self._producer.flush(timeout=step)
                done = self.ledger.wait_acked(step)
            except KafkaTimeoutError:
                done = False
            if done:
                break
            if left is not None and left <= step:
                raise KafkaTimeoutError(f"{self.ledger.unacked()} records not acked after {timeout} s")
            if self.give_up is not None and self.give_up.is_set():
                said, self.abandoned = self.abandoned, self.ledger.unacked()
                if said:  # said once: a source's settle, its command's settle and the exit all end here
                    return False
                log.error("gave up waiting for %d records the broker has not acked (%s); they were not "
                          "checkpointed: the same command sends them again", self.abandoned, self._broker_state())
                return False
            if time.monotonic() >= note_at:
                note_at += WAIT_NOTE_S
                log.warning("waiting %.0f s for %d records to be acked (%s)", time.monotonic() - began,
                            self.ledger.unacked(), self._broker_state())
        if self.ledger.journal is not None:  # acked, and in the journal on disk (streaming/ackjournal.py)
            self.ledger.journal.sync()
        return True

    def _broker_state(self) -> str:
        down = self.ledger.broker_down_for()
        return f"the broker unreachable for {down:.0f} s" if down > 0 else "the broker is reachable"

    def settle(self, timeout: float | None = 60.0) -> bool:
        """Flush, then wait until every acked record is confirmed kept by the broker (at most the
        loss window, longer across a broker restart). False when ``timeout`` passed first, or when
        :attr:`give_up` was set."""
        if not self.flush(timeout):
            return False
        ok = self.ledger.settle(timeout, give_up=self.give_up)
        if not ok:
            given_up = self.give_up is not None and self.give_up.is_set()
            when = "(the wait was given up)" if given_up else f"after {timeout} s"
            log.warning("%d acked records are not yet confirmed kept by the broker %s; a broker crash now could "
                        "lose them", self.ledger.pending(), when)
        return ok

    def close(self, timeout: float | None = 10.0) -> None:
        self.ledger.close()
        self._producer.close(timeout=timeout)

    @property
    def producer(self) -> Any:
        """The underlying producer: kafka-python's, or :class:`streaming.cproduce.CProducer` (its interface as
        far as the platform uses it: ``send`` with a future, ``flush``, ``partitions_for``, ``close``)."""
        return self._producer

    @property
    def client(self) -> str:
        """Which client sends: "librdkafka" or "kafka-python"."""
        return "librdkafka" if isinstance(self._producer, cproduce.CProducer) else "kafka-python"

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.flush():
            self.close()
        else:
            self.close(timeout=1.0)  # given up: what is left unacked is not waited for again
