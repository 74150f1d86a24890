"""The one declaration of every topic streamlearn uses, and idempotent create/list/describe.

Names are built here and nowhere else, so a typo cannot create a stray topic. Every name is
prefixed with ``Settings.topic_prefix`` (tenants, test isolation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streaming.config import Settings
from streaming.polling import poll_until

DAY_MS = 24 * 3600 * 1000

#: Event kinds and the Avro record each kind's raw topic carries.
KINDS: dict[str, str] = {"weblog": "WebLogEvent", "sensor": "SensorReading", "image": "ImageEvent"}



def event_key(kind: str, event: dict[str, Any]) -> str | None:
    """The idempotency key of a raw event: the field its schema documents as such (``event_id``;
    ``image_id`` for images; ``sensor_id:timestamp`` for a reading without an id), or None when the
    event has none. One definition, so the gateway's idempotency and serving's label join agree.
    """
    if kind == "image":
        value = event.get("image_id")
    elif kind == "sensor":
        value = event.get("event_id")
        if not value and event.get("sensor_id") is not None and event.get("timestamp") is not None:
            value = f"{event['sensor_id']}:{event['timestamp']}"
    else:
        value = event.get("event_id")
    return None if value is None or value == "" else str(value)


#: Built-in models and the event kind each one learns from.
MODELS: dict[str, str] = {"weblog_classifier": "weblog", "sensor_forecaster": "sensor", "digits_cnn": "image"}


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int
    cleanup_policy: str  # "delete" or "compact"
    record: str | None  # Avro record name of the values; None for dead letters (original bytes)
    purpose: str

    @property
    def configs(self) -> dict[str, str]:
        return {"retention.ms": str(self.retention_ms), "cleanup.policy": self.cleanup_policy}


def raw_topic(settings: Settings, kind: str) -> str:
    _check_kind(kind)
    return settings.topic(f"{kind}.raw")


def dead_letter_topic(settings: Settings, kind: str) -> str:
    """Dead letters of one event kind (ingest and stream stages), or of 'serving'."""
    if kind != "serving":
        _check_kind(kind)
    return settings.topic(f"{kind}.deadletter")


def requests_topic(settings: Settings, model: str) -> str:
    return settings.topic(f"{model}.requests")


def predictions_topic(settings: Settings, model: str) -> str:
    return settings.topic(f"{model}.predictions")


def model_updates_topic(settings: Settings) -> str:
    return settings.topic("models.updates")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        from streaming.exceptions import UnknownKindError

        raise UnknownKindError(f"unknown event kind {kind!r}; use one of {sorted(KINDS)}")


def declared_topics(settings: Settings, models: list[str] | None = None) -> list[TopicSpec]:
    """Every topic of the platform. ``models`` adds request/prediction topics of custom models."""
    p = settings.partitions
    out: list[TopicSpec] = []
    for kind, record in KINDS.items():
        out.append(TopicSpec(raw_topic(settings, kind), p, 7 * DAY_MS, "delete", record, f"raw {kind} events"))
        out.append(TopicSpec(dead_letter_topic(settings, kind), 1, 14 * DAY_MS, "delete", None,
                             f"{kind} records rejected at ingest or stream time, original bytes + reason headers"))
    for model in sorted(set(MODELS) | set(models or [])):
        out.append(TopicSpec(requests_topic(settings, model), p, DAY_MS, "delete", "PredictionRequest",
                             f"prediction requests for {model}"))
        out.append(TopicSpec(predictions_topic(settings, model), p, DAY_MS, "delete", "Prediction",
                             f"answers of {model}, keyed by request id"))
    out.append(TopicSpec(dead_letter_topic(settings, "serving"), 1, 14 * DAY_MS, "delete", None,
                         "prediction requests that could not be decoded"))
    out.append(TopicSpec(model_updates_topic(settings), 1, 30 * DAY_MS, "compact", "ModelUpdate",
                         "model versions created, promoted, rejected, rolled back (keyed by model)"))
    return out


#: Replication of auto mode on a cluster of at least this many brokers (Kafka's production default).
CLUSTER_REPLICATION = 3


@dataclass(frozen=True)
class Replication:
    """Replication of the topics this process creates: ``replication_factor`` replicas, and
    ``min_insync_replicas`` of them must have a write before an ``acks=all`` producer gets its ack."""

    replication_factor: int
    min_insync_replicas: int

    @property
    def configs(self) -> dict[str, str]:
        """Topic configs to add; none at RF 1 (the broker's default of 1 is the only valid value)."""
        return {} if self.replication_factor == 1 else {"min.insync.replicas": str(self.min_insync_replicas)}


def replication(settings: Settings, brokers: int | None) -> Replication:
    """The replication every declared topic is created with.

    Why a rule rather than a constant: the embedded noida-db broker is one node (RF 1 is all it can
    hold), while a cluster loses acked writes with RF 1 the moment one disk dies. ``brokers`` is the
    number of brokers the cluster's metadata lists (None when unknown). Auto (setting 0): RF 1 on the
    embedded broker or a one-broker cluster, else 3 capped at the brokers listed; min.insync.replicas
    RF - 1 (so with RF 3 one broker may be down and producers with ``acks=all`` still get acks). An
    explicit setting is used as is: a cluster with fewer brokers than asked is an error (see
    :func:`check_replication`), never a silent downgrade.
    """
    from streaming.exceptions import ReplicationError

    rf = settings.replication_factor
    if rf == 0:
        if settings.embedded or brokers is None or brokers <= 1:
            rf = 1
        else:
            rf = min(CLUSTER_REPLICATION, brokers)
    isr = settings.min_insync_replicas or max(1, rf - 1)
    if isr > rf:
        raise ReplicationError(
            f"setting 'min_insync_replicas' (env STREAMLEARN_MIN_INSYNC_REPLICAS) is {isr}, more than the "
            f"replication factor {rf}: every acks=all write would fail; set it to at most {rf} (0 = auto)")
    return Replication(rf, isr)


def check_replication(rep: Replication, brokers: int | None) -> None:
    """Refuse a replication factor the cluster cannot place, before any topic is created."""
    from streaming.exceptions import ReplicationError

    if brokers is not None and rep.replication_factor > brokers:
        raise ReplicationError(
            f"replication factor {rep.replication_factor} (setting 'replication_factor', env "
            f"STREAMLEARN_REPLICATION_FACTOR) needs at least {rep.replication_factor} brokers, but the cluster "
            f"lists {brokers}; start the missing brokers or lower the setting (0 = auto)")


def broker_count(admin: Any) -> int | None:
    """Brokers the cluster lists: DescribeCluster (Apache Kafka), else a Metadata request (noida-db fails
    DescribeCluster); None when neither answers (auto replication then says so and uses RF 1)."""
    for call in (admin.describe_cluster, lambda: admin._manager.run(admin._get_cluster_metadata, [])):
        try:
            metadata = call()
        except Exception:  # noqa: BLE001,S112 - unknown is a valid answer; the create call reports real faults
            continue
        brokers = metadata.get("brokers") if isinstance(metadata, dict) else None
        if brokers:
            return len(brokers)
    return None


def new_topics(settings: Settings, specs: list[TopicSpec], brokers: int | None) -> list[Any]:
    """The ``NewTopic`` requests :func:`ensure_topics` sends for ``specs`` on a cluster listing ``brokers``:
    each spec's partitions and configs plus the cluster's replication (refused first if impossible)."""
    from kafka.admin import NewTopic

    rep = replication(settings, brokers)
    check_replication(rep, brokers)
    return [NewTopic(spec.name, spec.partitions, rep.replication_factor, topic_configs={**spec.configs, **rep.configs})
            for spec in specs]


def admin_client(settings: Settings) -> Any:
    from kafka import KafkaAdminClient

    from streaming.kafka_security import kafka_security

    return KafkaAdminClient(bootstrap_servers=settings.bootstrap, request_timeout_ms=15_000,
                            **kafka_security(settings))


def ensure_topics(settings: Settings, specs: list[TopicSpec] | None = None, timeout_s: float = 15.0) -> list[str]:
    """Create the declared topics that do not exist yet (idempotent). Returns the names created.

    Waits until the broker's metadata lists every topic, so a producer created right after
    this call does not race topic creation.
    """
    from kafka.errors import TopicAlreadyExistsError

    specs = declared_topics(settings) if specs is None else specs
    from streaming.tenancy import check_topics

    check_topics(settings, [s.name for s in specs], "create")
    admin = admin_client(settings)
    try:
        existing = set(admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        created: list[str] = []
        brokers = 1 if settings.embedded else broker_count(admin) if missing else None
        if missing and brokers is None and settings.replication_factor == 0:
            import logging

            logging.getLogger(__name__).warning(
                "could not count the brokers at %s: creating %d topics with replication factor 1; set "
                "STREAMLEARN_REPLICATION_FACTOR (e.g. 3) for a cluster", settings.bootstrap, len(missing))
        for request in new_topics(settings, missing, brokers):  # one at a time: a failure must not hide others
            try:
                admin.create_topics([request])
                created.append(request.name)
            except TopicAlreadyExistsError:
                pass
        wanted = {s.name for s in specs}
        if not poll_until(lambda: wanted <= set(admin.list_topics()), timeout_s):
            raise TimeoutError(f"topics {sorted(wanted - set(admin.list_topics()))} not visible after "
                               f"{timeout_s} s")
        return created
    finally:
        admin.close()


def describe(settings: Settings, names: list[str]) -> list[dict[str, Any]]:
    """Partitions and end offsets of topics (metadata calls only: describe_cluster fails on noida)."""
    from kafka import KafkaConsumer, TopicPartition

    from streaming.kafka_security import kafka_security

    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, **kafka_security(settings))
    try:
        out = []
        for name in names:
            parts = sorted(consumer.partitions_for_topic(name) or [])
            tps = [TopicPartition(name, p) for p in parts]
            ends = consumer.end_offsets(tps) if tps else {}
            begins = consumer.beginning_offsets(tps) if tps else {}
            out.append({"name": name, "partitions": len(parts),
                        "offsets": {tp.partition: [begins[tp], ends[tp]] for tp in tps}})
        return out
    finally:
        consumer.close()
