"""Topic replication: RF 3 / min.insync.replicas 2 on a cluster, RF 1 on the embedded broker (issue 16 item 1).

No three-broker cluster runs here, so the rule (``streaming.topics.replication``) is held against the
settings compose gives every service, and ``ensure_topics`` runs for real against the session broker
(one noida-db node): auto keeps RF 1 there, an explicit RF 3 is refused before any topic is created.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest

from streaming import config
from streaming.exceptions import ReplicationError
from streaming.topics import (
    admin_client,
    broker_count,
    check_replication,
    declared_topics,
    ensure_topics,
    new_topics,
    replication,
)
from tests.test_compose import COMPOSE, env_of, interpolate, is_streamlearn, load_yaml


@functools.cache
def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = load_yaml(COMPOSE)["services"]
    return services


def compose_settings(name: str = "topics") -> config.Settings:
    return config.load(environ={k: interpolate(v) for k, v in env_of(compose_services()[name]).items()})


def test_every_declared_topic_gets_the_clusters_replication_in_compose() -> None:
    settings = compose_settings()
    assert not settings.embedded and settings.kafka_bootstrap
    specs = declared_topics(settings, ["custom_model"])
    assert len(specs) >= 14
    for brokers in (3, 5, None):  # None: metadata did not say; the explicit setting still holds
        requests = new_topics(settings, specs, brokers)  # what ensure_topics sends, one per spec
        assert [r.name for r in requests] == [s.name for s in specs]
        for request, spec in zip(requests, specs, strict=True):
            assert request.replication_factor == 3, spec.name
            assert request.topic_configs["min.insync.replicas"] == "2", spec.name
            assert request.topic_configs["retention.ms"] == str(spec.retention_ms)
            assert request.num_partitions == spec.partitions
    with pytest.raises(ReplicationError, match="cluster lists 2"):  # a broker down: refused, not downgraded
        new_topics(settings, specs, 2)


def test_the_embedded_broker_keeps_rf_1() -> None:
    embedded = config.load({"home": "/tmp/x"}, environ={})
    for request in new_topics(embedded, declared_topics(embedded), 1):
        assert request.replication_factor == 1 and "min.insync.replicas" not in request.topic_configs


def test_every_compose_service_has_the_same_replication() -> None:
    expected = replication(compose_settings(), 3)
    for name, svc in compose_services().items():
        if is_streamlearn(svc):
            assert replication(compose_settings(name), 3) == expected, name


def test_auto_replication_follows_the_cluster_and_the_embedded_broker_keeps_rf_1() -> None:
    embedded = config.load({"home": "/tmp/x"}, environ={})
    assert embedded.embedded
    assert replication(embedded, 3).replication_factor == 1  # never asks noida for replicas
    assert replication(embedded, None).configs == {}  # nothing added at RF 1
    external = config.load({"home": "/tmp/x", "kafka_bootstrap": "k1:9092,k2:9092"}, environ={})
    assert (replication(external, 1).replication_factor, replication(external, None).replication_factor) == (1, 1)
    assert (replication(external, 2).replication_factor, replication(external, 2).min_insync_replicas) == (2, 1)
    assert replication(external, 3).configs == {"min.insync.replicas": "2"}
    assert replication(external, 7).replication_factor == 3


def test_impossible_replication_is_refused_with_both_numbers() -> None:
    s = config.load({"home": "/tmp/x", "kafka_bootstrap": "k:9092", "replication_factor": 3}, environ={})
    with pytest.raises(ReplicationError, match=r"needs at least 3 brokers, but the cluster lists 2"):
        check_replication(replication(s, 2), 2)
    bad = s.with_(min_insync_replicas=4)
    with pytest.raises(ReplicationError, match=r"is 4, more than the replication factor 3"):
        replication(bad, 3)
    with pytest.raises(config.ConfigError, match="STREAMLEARN_REPLICATION_FACTOR"):
        config.load({"home": "/tmp/x"}, environ={"STREAMLEARN_REPLICATION_FACTOR": "-1"})


def test_ensure_topics_on_one_broker_auto_is_rf_1_and_rf_3_is_refused(bare_settings: config.Settings) -> None:
    admin = admin_client(bare_settings)
    try:
        assert broker_count(admin) == 1  # noida-db lists itself in Metadata
    finally:
        admin.close()
    refused = bare_settings.with_(replication_factor=3)
    with pytest.raises(ReplicationError, match="cluster lists 1"):
        ensure_topics(refused)
    admin = admin_client(bare_settings)
    try:  # refused before the first create: nothing half made
        assert not [t for t in admin.list_topics() if t.startswith(bare_settings.topic_prefix)]
    finally:
        admin.close()
    created = ensure_topics(bare_settings)
    assert len(created) == len(declared_topics(bare_settings))


def test_compose_producers_wait_for_the_in_sync_replicas() -> None:
    """min.insync.replicas only guards writes acked by all in-sync replicas: every producer uses acks=all."""
    from streaming.producer import producer_config

    cfg = producer_config(compose_settings("gateway"))
    assert cfg["acks"] == "all" and cfg["enable_idempotence"] is True
    assert cfg["bootstrap_servers"] == "kafka-1:9092,kafka-2:9092,kafka-3:9092"
