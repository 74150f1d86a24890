"""docker-compose.yml has no unauthenticated write on a published port (issue 12 item 5), statically.

Reads the compose file with the helpers of tests/test_compose.py (the required secrets interpolate to
stand-ins) and holds it against the code: the key table each published server would load, the
registry key the services send, Kafka's listener protocols, Grafana's and Prometheus' exposure.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest

from schemas.access import load_keys
from schemas.http_client import HttpRegistryClient
from streaming import config
from tests.test_compose import BROKERS, COMPOSE, REQUIRED, env_of, interpolate, is_streamlearn, load_yaml


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    loaded: dict[str, dict[str, Any]] = load_yaml(COMPOSE)["services"]
    return loaded


def settings_of(svc: dict[str, Any]) -> config.Settings:
    return config.load(environ={k: interpolate(v) for k, v in env_of(svc).items()})


def published(svc: dict[str, Any]) -> list[str]:
    return [str(p) for p in svc.get("ports", [])]


def test_every_published_streamlearn_server_requires_keys(services: dict[str, dict[str, Any]]) -> None:
    servers = {n: s for n, s in services.items() if is_streamlearn(s) and published(s)}
    assert set(servers) == {"registry", "gateway", "serve-weblog_classifier", "serve-sensor_forecaster",
                            "serve-digits_cnn"}, sorted(servers)
    for name, svc in servers.items():
        raw = env_of(svc).get("STREAMLEARN_KEYS", "")
        assert "${STREAMLEARN_KEYS:?" in raw, f"{name}: STREAMLEARN_KEYS must be required from the environment"
        keys = load_keys(settings_of(svc).keys, None)
        assert keys, f"{name}: would run without keys"
        needed = {"registry": "schema-admin", "gateway": "ingest.weblog"}.get(name, "predict")
        user = keys.authenticate(f"Bearer {REQUIRED['STREAMLEARN_KEYS'].split(':')[1]}")
        assert user.allows(needed), f"{name}: the documented key lacks {needed}"
        for part in svc.get("command", []):  # keys never on argv
            assert not any(secret in str(part) for secret in REQUIRED.values()), f"{name}: a secret on argv"


def test_services_write_the_registry_with_the_platform_key(services: dict[str, dict[str, Any]]) -> None:
    registry_keys = load_keys(settings_of(services["registry"]).keys, None)
    url = settings_of(services["stream-weblog"]).registry_url
    assert url is not None
    client = HttpRegistryClient(url)
    assert client.url == "http://registry:8081"  # the key is not in the URL messages show
    assert client._authorization is not None
    name_token = base64.b64decode(client._authorization.split()[1]).decode()
    platform = registry_keys.authenticate("Basic " + base64.b64encode(name_token.encode()).decode(),
                                          allow_basic=True)
    assert platform.allows("schema-admin") and not platform.allows("predict")
    assert registry_keys.owns(platform, "acme.weblog.raw-value")  # the gateway registers tenants' subjects


def test_kafka_publishes_only_a_sasl_scram_listener(services: dict[str, dict[str, Any]]) -> None:
    all_host_ports = set()
    for name in BROKERS:
        kafka = services[name]
        env = env_of(kafka)
        protocols = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
        ports = {listener: int(addr.rsplit(":", 1)[1]) for listener, addr in
                 (entry.split("://") for entry in env["KAFKA_LISTENERS"].split(","))}
        container_ports = {int(p.rsplit(":", 1)[1]) for p in published(kafka)}
        for listener, port in ports.items():
            if port in container_ports:
                assert protocols[listener].startswith("SASL_"), f"{name}: {listener} on published {port}"
        assert container_ports == {ports["EXTERNAL"]} and protocols["EXTERNAL"].startswith("SASL_"), name
        all_host_ports |= {int(p.split(":")[0]) for p in published(kafka)}
        assert env["KAFKA_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"  # the clients' listeners: SCRAM only
        jaas = [v for k, v in env.items() if k.startswith("KAFKA_LISTENER_NAME_EXTERNAL_SCRAM___SHA___512_SASL_JAAS")]
        assert jaas and "ScramLoginModule" in jaas[0]
        # the brokers' own PLAIN identity: only on the quorum and replication listeners, password from env
        for listener in ("CONTROLLER", "REPLICATION"):
            assert env[f"KAFKA_LISTENER_NAME_{listener}_SASL_ENABLED_MECHANISMS"] == "PLAIN"
            plain = env[f"KAFKA_LISTENER_NAME_{listener}_PLAIN_SASL_JAAS_CONFIG"]
            assert plain.count("${KAFKA_BROKER_PASSWORD:?") == 2 and 'username="broker"' in plain
            assert REQUIRED["KAFKA_BROKER_PASSWORD"] in interpolate(plain)
    assert all_host_ports == {9094, 9194, 9294}
    # users (and tenant ACLs) come from deploy/kafka/kafka-users.sh, from env: tests/test_compose_tenants.py
    users = services["kafka-users"]
    assert "${KAFKA_CLIENT_PASSWORD:?" in env_of(users)["KAFKA_CLIENT_PASSWORD"]
    assert users["network_mode"] == "service:kafka-1"  # over the broker's loopback listener, never published


def test_observability_is_not_an_open_door(services: dict[str, dict[str, Any]]) -> None:
    grafana = env_of(services["grafana"])
    assert "${GRAFANA_ADMIN_PASSWORD:?" in grafana["GF_SECURITY_ADMIN_PASSWORD"]
    assert interpolate(grafana["GF_AUTH_ANONYMOUS_ENABLED"]) == "false"
    assert all(p.startswith("127.0.0.1:") for p in published(services["prometheus"]))
    for name, svc in services.items():  # worker metrics bind 0.0.0.0 inside the network, never published
        if env_of(svc).get("STREAMLEARN_METRICS_HOST") == "0.0.0.0":
            assert not any(re.search(r"(^|:)9100$", p) for p in published(svc)), name
