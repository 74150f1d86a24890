"""Compose's Kafka authorization (issue 12 item 6), statically: exactly prefixed rights per tenant.

No Docker engine runs here, so deploy/kafka/kafka-users.sh (the `kafka-users` one-shot) runs under
``sh`` against stand-ins of kafka-configs.sh / kafka-acls.sh that record their arguments; the test
holds the recorded calls to the rule: one SCRAM user per tenant, ACLs only with
``--resource-pattern-type prefixed`` on ``<prefix><tenant>.`` (topics, groups, transactional ids),
nothing on the cluster or on another name, the platform user a super user. The compose file is
checked for the authorizer, the super users, the loopback-only PLAINTEXT listeners and the platform
services' SASL settings (the clients build the right kafka-python config from them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from streaming import config
from streaming.kafka_security import kafka_security
from tests.test_compose import BROKERS, COMPOSE, ROOT, env_of, interpolate, is_streamlearn, load_yaml

SCRIPT = ROOT / "deploy" / "kafka" / "kafka-users.sh"
TOPIC_OPS = {"Read", "Write", "Describe", "DescribeConfigs", "Create"}
GROUP_OPS = {"Read", "Describe", "Delete"}
TXN_OPS = {"Write", "Describe"}
RECORDER = '#!/bin/sh\nfor a in "$@"; do printf "%s\\037" "$a"; done >> "$CALLS"\necho >> "$CALLS"\n'


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    loaded: dict[str, dict[str, Any]] = load_yaml(COMPOSE)["services"]
    return loaded


def run_script(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    if shutil.which("sh") is None:
        pytest.skip("no POSIX sh on PATH")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("kafka-configs.sh", "kafka-acls.sh"):
        (bin_dir / tool).write_text(RECORDER)
        (bin_dir / tool).chmod(0o755)
    calls = tmp_path / "calls"
    calls.write_text("")
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KAFKA_BIN": str(bin_dir), "CALLS": str(calls), **env}
    proc = subprocess.run(["sh", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=60)
    recorded = [line.split("\x1f")[:-1]
                for line in calls.read_text().splitlines() if line]
    return proc, recorded


def flag(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == name]


def acls_of(calls: list[list[str]]) -> dict[tuple[str, str, str], set[str]]:
    """{(principal, resource flag, name): operations} of the kafka-acls.sh calls; every call checked."""
    out: dict[tuple[str, str, str], set[str]] = {}
    for args in calls:
        if "--add" not in args or "--allow-principal" not in args:
            continue
        assert "--deny-principal" not in args and "--cluster" not in args, args
        assert flag(args, "--resource-pattern-type") == ["prefixed"], f"not a prefixed ACL: {args}"
        resources = [(f, v) for f in ("--topic", "--group", "--transactional-id") for v in flag(args, f)]
        assert len(resources) == 1, args
        (principal,) = flag(args, "--allow-principal")
        out.setdefault((principal, *resources[0]), set()).update(flag(args, "--operation"))
    return out


def test_each_tenant_gets_exactly_prefixed_rights_on_its_own_names(tmp_path: Path) -> None:
    proc, calls = run_script(tmp_path, KAFKA_CLIENT_PASSWORD="platformpw", STREAMLEARN_TOPIC_PREFIX="prod.",
                             KAFKA_TENANT_USERS="acme:acmepw, globex:globexpw,acme-eu:eupw")
    assert proc.returncode == 0, proc.stderr
    users = {flag(c, "--entity-name")[0]: flag(c, "--add-config")[0] for c in calls if "--entity-type" in c}
    assert users == {"streamlearn": "SCRAM-SHA-512=[iterations=8192,password=platformpw]",
                     "acme": "SCRAM-SHA-512=[iterations=8192,password=acmepw]",
                     "globex": "SCRAM-SHA-512=[iterations=8192,password=globexpw]",
                     "acme-eu": "SCRAM-SHA-512=[iterations=8192,password=eupw]"}
    expected: dict[tuple[str, str, str], set[str]] = {}
    for tenant in ("acme", "globex", "acme-eu"):
        prefix = f"prod.{tenant}."  # the dot: acme's prefix never covers acme-eu's names
        expected[(f"User:{tenant}", "--topic", prefix)] = TOPIC_OPS
        expected[(f"User:{tenant}", "--group", prefix)] = GROUP_OPS
        expected[(f"User:{tenant}", "--transactional-id", prefix)] = TXN_OPS
    assert acls_of(calls) == expected  # exactly: nothing for the platform user (a super user), nothing else
    for c in calls:
        assert flag(c, "--bootstrap-server") == ["localhost:9095"], c
    assert "pw" not in proc.stdout + proc.stderr  # passwords are never echoed


def test_single_tenant_default_creates_only_the_platform_user(tmp_path: Path) -> None:
    proc, calls = run_script(tmp_path, KAFKA_CLIENT_PASSWORD="platformpw", KAFKA_CLIENT_USER="ops")
    assert proc.returncode == 0, proc.stderr
    assert [flag(c, "--entity-name") for c in calls] == [["ops"]] and acls_of(calls) == {}


@pytest.mark.parametrize("tenants, why", [("Acme:pw", "not a tenant id"), ("acme", "without a password"),
                                          ("acme:pw,gl obex;x:pw", "not a tenant id"),
                                          ("acme:p,w", "without a password"), ("acme:pw]", "none of"),
                                          ("streamlearn:pw", "platform user")])
def test_a_bad_tenant_list_changes_nothing(tmp_path: Path, tenants: str, why: str) -> None:
    proc, calls = run_script(tmp_path, KAFKA_CLIENT_PASSWORD="platformpw", KAFKA_TENANT_USERS=tenants)
    assert proc.returncode != 0 and why in proc.stderr, (proc.returncode, proc.stderr)
    assert calls == []  # validated before the first call: no half-configured tenants


def test_the_script_needs_the_platform_password(tmp_path: Path) -> None:
    proc, calls = run_script(tmp_path)
    assert proc.returncode != 0 and "KAFKA_CLIENT_PASSWORD" in proc.stderr and calls == []


def test_compose_runs_the_authorizer_and_the_script_from_env(services: dict[str, dict[str, Any]]) -> None:
    for broker in BROKERS:
        kafka = env_of(services[broker])
        assert kafka["KAFKA_AUTHORIZER_CLASS_NAME"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
        assert kafka["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
        supers = set(interpolate(kafka["KAFKA_SUPER_USERS"]).split(";"))
        assert supers == {"User:ANONYMOUS", "User:broker", "User:streamlearn"}, supers
        protocols = dict(p.split(":") for p in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
        listeners = dict(entry.split("://") for entry in kafka["KAFKA_LISTENERS"].split(","))
        for name, addr in listeners.items():  # ANONYMOUS is a super user: only on the loopback
            if protocols[name] == "PLAINTEXT":
                assert addr.startswith("localhost:"), f"{broker}: {name} ({addr}) is PLAINTEXT but not loopback-only"
            else:
                assert protocols[name] == "SASL_PLAINTEXT", name
                mechanism = kafka.get(f"KAFKA_LISTENER_NAME_{name}_SASL_ENABLED_MECHANISMS",
                                      kafka["KAFKA_SASL_ENABLED_MECHANISMS"])
                module = {"SCRAM-SHA-512": "ScramLoginModule", "PLAIN": "PlainLoginModule"}[mechanism]
                jaas = f"KAFKA_LISTENER_NAME_{name}_{mechanism.replace('-', '___')}_SASL_JAAS_CONFIG"
                assert module in kafka.get(jaas, ""), f"{broker}: {jaas}"
        # brokers replicate and reach the quorum over SASL (the network), never over PLAINTEXT
        assert kafka["KAFKA_INTER_BROKER_LISTENER_NAME"] == "REPLICATION"
        assert protocols["REPLICATION"] == protocols["CONTROLLER"] == "SASL_PLAINTEXT"
        assert kafka["KAFKA_SASL_MECHANISM_INTER_BROKER_PROTOCOL"] == kafka["KAFKA_SASL_MECHANISM_CONTROLLER_PROTOCOL"]
        assert "localhost:9095" in " ".join(services[broker]["healthcheck"]["test"])
    users = services["kafka-users"]
    assert users["network_mode"] == "service:kafka-1"
    assert users["volumes"] == ["./deploy/kafka/kafka-users.sh:/opt/streamlearn/kafka-users.sh:ro"]
    assert users["command"] == ["sh", "/opt/streamlearn/kafka-users.sh"]
    env = env_of(users)
    assert env["KAFKA_ADMIN_BOOTSTRAP"] == "localhost:9095"
    assert env["KAFKA_TENANT_USERS"] == "${KAFKA_TENANT_USERS:-}"  # secrets only from the environment
    assert "${KAFKA_CLIENT_PASSWORD:?" in env["KAFKA_CLIENT_PASSWORD"]
    assert env["STREAMLEARN_TOPIC_PREFIX"] == env_of(services["stream-weblog"])["STREAMLEARN_TOPIC_PREFIX"]
    assert services["topics"]["depends_on"]["kafka-users"]["condition"] == "service_completed_successfully"


def test_platform_services_connect_as_the_platform_user(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        if not is_streamlearn(svc) or name == "registry":
            continue
        settings = config.load(environ={k: interpolate(v) for k, v in env_of(svc).items()})
        assert settings.tenant == "", f"{name}: platform services are not tenant-scoped"
        assert kafka_security(settings) == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                                            "sasl_plain_username": "streamlearn",
                                            "sasl_plain_password": "kafkapassword"}, name
