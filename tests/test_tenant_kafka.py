"""Tenant isolation on the Kafka side (issue 12 item 6): tenant A cannot read or write B's topics or models.

On the embedded broker (noida-db has no authorizer: it answers CreateAcls/DescribeAcls with
SECURITY_DISABLED, checked below) the boundary is the tenant-scoped client: a process started with
``STREAMLEARN_TENANT`` names everything under ``<topic_prefix><tenant>.`` and refuses any other
topic, group or transactional id before a network call. On compose's Apache Kafka the broker holds
the same line with SCRAM users and prefixed ACLs (tests/test_compose_tenants.py).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from kafka import KafkaConsumer, TopicPartition

from ingest.gateway.limits import GatewayLimits
from ingest.gateway.routes import create_app
from schemas.access import load_keys
from schemas.registry import FileRegistry
from schemas.server import create_app as registry_app
from serving.replies import ReplyTopics
from streaming import config, tenancy
from streaming.config import Settings
from streaming.consumer import Record, Subscriber, consumer_config
from streaming.exceptions import TenantScopeError
from streaming.producer import Publisher, producer_config
from streaming.store import FeatureStore, read_batch
from streaming.topics import declared_topics, ensure_topics, predictions_topic, raw_topic, requests_topic
from streaming.worker import StreamWorker, default_group
from tests.helpers import read_topic, streamlearn_cmd, subprocess_env

KEYS = "acme:acmetoken:ingest+schema-read:acme, globex:globextoken:ingest+schema-read:globex"
ACME = {"Authorization": "Bearer acmetoken"}
GLOBEX = {"Authorization": "Bearer globextoken"}
NOW = int(time.time() * 1000)


def weblog(i: int) -> dict[str, Any]:
    return {"event_id": f"w-{i}", "client_ip": f"10.0.0.{i % 200}", "timestamp": NOW + i, "method": "GET",
            "path": f"/p/{i}", "protocol": "HTTP/1.1", "status": 200, "bytes_sent": 100, "user_agent": "x",
            "latency_ms": 3.5}


def as_tenant(settings: Settings, name: str, tmp_path: Path) -> Settings:
    """A tenant's process: the platform's topic prefix plus STREAMLEARN_TENANT, its own directories."""
    return settings.with_(tenant=name, feature_store=tmp_path / name / "features", model_dir=tmp_path / name / "models")


def committed(settings: Settings, topic: str, group: str) -> dict[int, int | None]:
    c = KafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: c.committed(TopicPartition(topic, p)) for p in range(settings.partitions)}
    finally:
        c.close()


# -- the settings and the client-side refusal ------------------------------------------------------
def test_tenant_setting_names_everything_under_the_tenant_prefix() -> None:
    s = config.load({"topic_prefix": "p.", "tenant": "acme"}, environ={})
    assert s.namespace == "p.acme."
    assert raw_topic(s, "weblog") == "p.acme.weblog.raw" and default_group(s, "weblog") == "p.acme.stream.weblog"
    assert {t.name for t in declared_topics(s)} == {t.name for t in declared_topics(s) if t.name.startswith("p.acme.")}
    assert config.load(environ=config.to_env(s)).tenant == "acme"  # subprocesses inherit the scope
    assert config.load({"topic_prefix": "p."}, environ={}).namespace == "p."  # single tenant: unchanged
    with pytest.raises(config.ConfigError, match="STREAMLEARN_TENANT"):
        config.load(environ={"STREAMLEARN_TENANT": "Acme Corp"})
    assert "STREAMLEARN_TENANT" in config.env_help("tenant")


def test_a_tenant_client_refuses_foreign_names_before_any_network_call(tmp_path: Path) -> None:
    # Nothing listens on port 9: a refusal that reached the network would be a connection error instead.
    s = config.load({"home": tmp_path, "kafka_bootstrap": "127.0.0.1:9", "topic_prefix": "p.", "tenant": "acme"},
                    environ={})
    globex = s.with_(tenant="globex")
    for foreign in (raw_topic(globex, "weblog"), requests_topic(globex, "churn"), "p.weblog.raw", "p.acme",
                    "p.acme-eu.weblog.raw", "p.acme.", "globex.weblog.raw"):
        assert not tenancy.allowed(s, foreign), foreign
        t0 = time.monotonic()
        with pytest.raises(TenantScopeError, match=r"STREAMLEARN_TENANT.*outside|outside"):
            Subscriber(s, foreign, start="beginning")
        assert time.monotonic() - t0 < 5, "refused only after trying the broker"
    with pytest.raises(TenantScopeError, match="consumer group"):
        Subscriber(s, raw_topic(s, "weblog"), group=default_group(globex, "weblog"))
    with pytest.raises(TenantScopeError, match="consumer group"):
        consumer_config(s, group_id="p.globex.serving.churn")
    with pytest.raises(TenantScopeError, match="transactional id"):
        producer_config(s, transactional_id="p.globex.serving.churn.tx.slot0")
    with pytest.raises(TenantScopeError, match="create"):
        ensure_topics(s, declared_topics(globex)[:1])
    # `streamlearn stream --group` always names a group under the tenant's namespace; a caller of the
    # library that names a full foreign group is refused here, before any network call.
    with pytest.raises(TenantScopeError, match="consumer group"):
        StreamWorker(s, "weblog", group=default_group(globex, "weblog"))
    # the tenant's own names pass; an unscoped (platform) process is never checked
    assert consumer_config(s, group_id=default_group(s, "weblog"))["group_id"] == "p.acme.stream.weblog"
    assert producer_config(s, transactional_id="p.acme.serving.churn.tx.slot0")["transactional_id"]
    platform = s.with_(tenant="")
    assert tenancy.allowed(platform, raw_topic(globex, "weblog")) and tenancy.scope(platform) is None
    # serving: a reply topic outside the tenant is an error answer even when the allow-list is '*'
    existing = {predictions_topic(globex, "churn"), predictions_topic(s, "churn") + ".x"}
    replies = ReplyTopics(s.with_(reply_topics="*"), "churn", predictions_topic(s, "churn"),
                          list_topics=lambda: existing)
    problem = replies.problem(predictions_topic(globex, "churn"))
    assert problem is not None and "outside tenant 'acme'" in problem
    assert replies.problem(predictions_topic(s, "churn") + ".x") is None


def test_the_embedded_broker_has_no_authorizer(broker_settings: Settings) -> None:
    """Why the client-side scope exists: noida-db refuses ACL requests (docs/SECURITY.md says so)."""
    if not broker_settings.embedded:
        pytest.skip("runs against an external broker; its ACLs are tested by tests/test_compose_tenants.py")
    from kafka import KafkaAdminClient
    from kafka.admin import ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern, ResourceType

    admin = KafkaAdminClient(bootstrap_servers=broker_settings.bootstrap, request_timeout_ms=5000)
    try:
        acl = ACL("User:acme", "*", ACLOperation.READ, ACLPermissionType.ALLOW,
                  ResourcePattern(ResourceType.TOPIC, "acme.", ACLResourcePatternType.PREFIXED))
        result = admin.create_acls([acl])
    finally:
        admin.close()
    assert not result["succeeded"] and "SecurityDisabled" in str(result["failed"])


# -- end to end on the embedded broker --------------------------------------------------------------
@pytest.mark.timeout(240)
def test_tenant_isolation_end_to_end(settings: Settings, tmp_path: Path) -> None:
    """Events of both tenants come in through the gateway (each under its key); then tenant acme's SDK,
    its stream worker (a subprocess, started as a tenant starts it) and its registry key reach only
    acme's data, and every attempt on globex's topics, groups and models is refused."""
    platform = settings.with_(keys=KEYS)
    acme, globex = as_tenant(settings, "acme", tmp_path), as_tenant(settings, "globex", tmp_path)
    for tenant in (acme, globex):
        ensure_topics(tenant, declared_topics(tenant, ["churn"]))
    with TestClient(create_app(platform, limits=GatewayLimits(rate_records_per_s=1000, burst_records=100))) as tc:
        for who, headers, ids in (("acme", ACME, range(0, 5)), ("globex", GLOBEX, range(100, 108))):
            r = tc.post("/ingest/weblog", json=[weblog(i) for i in ids], headers=headers)
            assert r.status_code == 200 and {x["status"] for x in r.json()["results"]} == {"accepted"}, (who, r.text)
    globex_raw = raw_topic(globex, "weblog")
    globex_ends = {(it.partition, it.offset) for it in read_topic(settings, globex_raw, decode=False, expect=8)}
    assert len(globex_ends) == 8

    # acme's SDK: its own topic reads acme's events only; globex's topics and models are refused
    acme_events = [it.value["event_id"] for it in read_topic(acme, raw_topic(acme, "weblog"), expect=5)
                   if isinstance(it, Record)]
    assert sorted(acme_events) == [f"w-{i}" for i in range(5)]
    with pytest.raises(TenantScopeError):
        Subscriber(acme, globex_raw, start="beginning")
    with pytest.raises(TenantScopeError):
        Subscriber(acme, predictions_topic(globex, "churn"), start="beginning")  # globex's model answers
    with Publisher(acme) as pub:
        for topic, record_name, record in ((globex_raw, "WebLogEvent", weblog(999)),
                                           (requests_topic(globex, "churn"), "PredictionRequest",
                                            {"request_id": "r1", "model": "churn", "event_json": "{}",
                                             "reply_topic": None, "version": None, "sent_at": NOW})):
            with pytest.raises(TenantScopeError, match="publish to"):
                pub.publish_to(topic, record_name, record)
            with pytest.raises(TenantScopeError):
                pub.send_bytes(topic, b"raw bytes")
        pub.publish("weblog", weblog(5))  # its own raw topic still takes writes
    assert {(it.partition, it.offset) for it in read_topic(settings, globex_raw, decode=False)} == globex_ends
    assert read_topic(settings, requests_topic(globex, "churn"), decode=False, idle_timeout=1) == []

    # acme's stream worker, started as a tenant starts it: refuses globex's group, processes only acme's topic
    env = subprocess_env(acme, STREAMLEARN_LOG_LEVEL="INFO")
    ran = subprocess.run(streamlearn_cmd("stream", "weblog", "--idle-exit", "3"), env=env, capture_output=True,
                         timeout=180)
    assert ran.returncode == 0, ran.stderr[-3000:]
    batches = FeatureStore(acme.feature_store).batches("weblog")
    assert {r["topic"] for b in batches for r in b.manifest["ranges"]} == {raw_topic(acme, "weblog")}
    assert sum(len(read_batch(b.path)["offset"]) for b in batches) == 6  # acme's 5 + 1, none of globex's 8
    assert not FeatureStore(globex.feature_store).batches("weblog")
    assert set(committed(settings, globex_raw, default_group(globex, "weblog")).values()) == {None}
    assert sum(o or 0 for o in committed(settings, raw_topic(acme, "weblog"), default_group(acme, "weblog"))
               .values()) == 6

    # the registry that holds both tenants' subjects (the gateway registered them) shows acme only its own
    reg = TestClient(registry_app(FileRegistry(settings.registry_dir), keys=load_keys(KEYS, None), read_open=False,
                                  topic_prefix=settings.topic_prefix))
    acme_subject, globex_subject = f"{raw_topic(acme, 'weblog')}-value", f"{globex_raw}-value"
    assert reg.get(f"/subjects/{acme_subject}/versions/latest", headers=ACME).status_code == 200
    assert reg.get(f"/subjects/{globex_subject}/versions/latest", headers=ACME).status_code in (403, 404)
    assert globex_subject not in reg.get("/subjects", headers=ACME).json()
    assert reg.get(f"/subjects/{globex_subject}/versions/latest", headers=GLOBEX).status_code == 200


def test_cli_names_the_tenant_and_the_kafka_credentials_in_help() -> None:
    from streamlearn.cli import build_parser, settings_from_args

    parser = build_parser()
    text = parser.format_help()
    for env in ("STREAMLEARN_TENANT", "STREAMLEARN_KAFKA_SECURITY_PROTOCOL", "STREAMLEARN_KAFKA_SASL_MECHANISM",
                "STREAMLEARN_KAFKA_SASL_USERNAME", "STREAMLEARN_KAFKA_SASL_PASSWORD"):
        assert env in text.replace("\n", " "), env
    args = parser.parse_args(["--tenant", "acme", "--topic-prefix", "p.", "--bootstrap", "127.0.0.1:9",
                              "topics", "list"])
    assert settings_from_args(args).namespace == "p.acme."


def test_every_platform_kafka_client_carries_the_security_settings() -> None:
    """A tenant's SASL credentials reach every client, or its process fails on a SCRAM-only broker: each
    KafkaConsumer/KafkaProducer/KafkaAdminClient built in the packages passes the kafka_security kwargs
    (directly, or through consumer_config/producer_config or an attribute that holds them)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    carriers = ("kafka_security", "consumer_config", "producer_config", "self.security", "self._consumer_config",
                "**cfg")
    exempt = {("streaming/broker.py", "probe")}  # readiness of the embedded broker (no SASL there)
    missing = []
    for package in ("schemas", "streaming", "ingest", "trainer", "serving", "streamlearn"):
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
                for call in [n for n in ast.walk(fn) if isinstance(n, ast.Call)]:
                    name = getattr(call.func, "id", None) or getattr(call.func, "attr", None)
                    if name not in ("KafkaConsumer", "KafkaProducer", "KafkaAdminClient"):
                        continue
                    spread = " ".join(f"**{ast.unparse(k.value)}" for k in call.keywords if k.arg is None)
                    if (rel, fn.name) not in exempt and not any(c in spread for c in carriers):
                        missing.append(f"{rel}:{call.lineno} ({fn.name})")
    assert not missing, f"Kafka clients built without the SASL/TLS settings: {sorted(set(missing))}"


def test_a_tenant_scoped_serving_api_answers_only_its_tenants_keys() -> None:
    """`STREAMLEARN_TENANT=acme streamlearn serve churn --http-port ...` serves acme's churn (its topics are
    <prefix>acme.churn.*): acme's key may predict, globex's and the default tenant's may not. The model has
    no version yet, so an authorized request gets 404, a refused one 403 (the version manager is a stand-in:
    the key check comes first)."""
    from types import SimpleNamespace

    from serving.http_api import create_app as serving_app
    from serving.inputs import Featurization

    keys = load_keys("ops:opstoken, acme:acmetoken:predict:acme, globex:globextoken:predict:globex", None)
    manager: Any = SimpleNamespace(current=lambda: SimpleNamespace(stable=None, canary=None))
    codes = {}
    for owner in (None, "acme.churn"):
        tc = TestClient(serving_app(manager, Featurization(), "churn", keys=keys, owner=owner),
                        raise_server_exceptions=False)
        for who in ("acme", "globex", "ops"):
            r = tc.post("/v1/models/churn:predict", json={"instances": [[0.5]]},
                        headers={"Authorization": f"Bearer {who}token"})
            codes[(owner, who)] = r.status_code
    assert codes == {(None, "acme"): 403, (None, "globex"): 403, (None, "ops"): 404,  # "churn": default tenant's
                     ("acme.churn", "acme"): 404, ("acme.churn", "globex"): 403, ("acme.churn", "ops"): 403}, codes
