"""docker-compose.yml, the Dockerfile and the Prometheus/Grafana provisioning, checked without an engine.

No Docker engine runs where the tests run, so the deployment is checked by what can be known
statically: `docker-compose config` (when a compose binary is installed) parses and validates the
file; everything else reads the files with PyYAML/json and holds them against the code — the CLI's
own parser for every command, ``streamlearn.stack`` for the set of services ``streamlearn up``
runs, ``streaming.config`` for the environment variable names, the metric declarations in the
packages for the metrics contract of docs/DEPLOY.md.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import io
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from streaming import config
from streaming.topics import KINDS, MODELS

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "streamlearn.json"
DEPLOY_DOC = ROOT / "docs" / "DEPLOY.md"
PACKAGES = ("schemas", "streaming", "ingest", "trainer", "serving", "streamlearn")

#: Conditions Debian's docker-compose 1.29 (v1) accepts; others would break `config` there.
V1_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
#: Services of the platform that are not `streamlearn up` workers.
BROKERS = ("kafka-1", "kafka-2", "kafka-3")
INFRA = {*BROKERS, "kafka-users", "topics", "prometheus", "grafana"}
#: Services compose runs as N replicas (`--scale`): no container name, no fixed host port, no pinned id.
SCALABLE_PREFIXES = ("registry", "stream-", "serve-")
#: Variables compose requires (``${X:?...}``: docs/SECURITY.md "Compose") and the stand-ins the tests use.
REQUIRED = {"STREAMLEARN_PLATFORM_TOKEN": "platformtoken", "STREAMLEARN_KEYS": "me:mytoken",
            "KAFKA_CLIENT_PASSWORD": "kafkapassword", "GRAFANA_ADMIN_PASSWORD": "grafanapassword",
            "KAFKA_BROKER_PASSWORD": "brokerpassword"}


def load_yaml(path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        pytest.fail("PyYAML is not installed in this environment: add PyYAML to requirements.lock "
                    "(tests/test_compose.py parses docker-compose.yml and the Prometheus/Grafana provisioning)")
    return yaml.safe_load(path.read_text(encoding="utf-8"))  # safe_load resolves anchors and `<<` merges


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "docker-compose.yml has no services"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def is_streamlearn(svc: dict[str, Any]) -> bool:
    """Runs the project image (built from ./Dockerfile, ENTRYPOINT streamlearn)."""
    return "build" in svc or str(svc.get("image", "")).startswith("streamlearn:")


def one_shot(svc: dict[str, Any]) -> bool:
    return str(svc.get("restart", "")) == "no"


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def interpolate(value: str) -> str:
    """Compose interpolation with an empty shell environment: ${X:-default} -> default, ${X} -> ''."""
    def sub(m: re.Match[str]) -> str:
        body = m.group(1)
        for sep in (":-", "-"):
            if sep in body:
                return body.split(sep, 1)[1]
        if ":?" in body or "?" in body:
            name = body.split("?", 1)[0].rstrip(":")
            if name not in REQUIRED:
                pytest.fail(f"{value!r} requires {name}, which is not one of the documented secrets {sorted(REQUIRED)}")
            return REQUIRED[name]
        return ""
    return re.sub(r"\$\{([^}]*)\}", sub, value)


def flag_value(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def metrics_port(svc: dict[str, Any]) -> int | None:
    """The port Prometheus must scrape, or None for services without metrics.

    The gateway serves /metrics on its HTTP port; every other worker on STREAMLEARN_METRICS_PORT.
    """
    if not is_streamlearn(svc):
        return None
    command = [str(c) for c in svc.get("command", [])]
    env = {k: interpolate(v) for k, v in env_of(svc).items()}
    if command[:2] == ["ingest", "serve"]:
        return int(flag_value(command, "--port") or env.get("STREAMLEARN_INGEST_PORT") or
                   config.load(environ={}).ingest_port)
    raw = env.get("STREAMLEARN_METRICS_PORT")
    return int(raw) if raw else None


def named_volume_mounts(svc: dict[str, Any]) -> dict[str, str]:
    """{volume name: container path} of a service's named-volume mounts (bind mounts left out)."""
    out: dict[str, str] = {}
    for vol in svc.get("volumes") or []:
        if isinstance(vol, dict):
            if vol.get("type", "volume") == "volume":
                out[vol["source"]] = vol["target"]
            continue
        source, target = str(vol).split(":")[:2]
        if not source.startswith((".", "/", "~")):
            out[source] = target
    return out


def bind_mounts(svc: dict[str, Any]) -> list[str]:
    return [str(v).split(":")[0] for v in svc.get("volumes") or []
            if isinstance(v, str) and v.startswith((".", "/"))]


# --- 1. the compose tool itself ------------------------------------------------------------------
def compose_binary() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def _compose_config(binary: list[str], secrets: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``compose config -q`` with exactly ``secrets`` as the documented secrets in the environment.

    The secrets are stripped from the inherited environment first, so that a developer's shell that
    happens to export one cannot make the "refused without secrets" check pass or fail by accident.
    """
    env = {k: v for k, v in os.environ.items() if k not in REQUIRED}
    env.update(secrets)
    return subprocess.run([*binary, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env=env)


def test_docker_compose_config_accepts_the_file() -> None:
    binary = compose_binary()
    if binary is None:
        pytest.skip("no docker-compose or `docker compose` on PATH (Debian: apt-get install -y docker-compose)")
    result = _compose_config(binary, REQUIRED)
    assert result.returncode == 0, f"{' '.join(binary)} config rejected docker-compose.yml:\n{result.stderr}"


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_docker_compose_config_refuses_a_missing_secret_by_name(missing: str) -> None:
    """Compose must not start with a secret unset: `${X:?set X}` makes `config` fail naming X."""
    binary = compose_binary()
    if binary is None:
        pytest.skip("no docker-compose or `docker compose` on PATH (Debian: apt-get install -y docker-compose)")
    result = _compose_config(binary, {k: v for k, v in REQUIRED.items() if k != missing})
    assert result.returncode != 0, f"compose config accepted the file without {missing}"
    assert f"set {missing}" in result.stderr, result.stderr


# --- 2. static checks (always run) ---------------------------------------------------------------
def test_every_streamlearn_command_parses_with_the_cli(services: dict[str, dict[str, Any]]) -> None:
    from streamlearn.cli import build_parser

    parser = build_parser()
    problems = []
    checked = 0
    for name, svc in services.items():
        if not is_streamlearn(svc):
            continue
        command = svc.get("command")
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            problems.append(f"{name}: command must be a list of strings (exec form), got {command!r}")
            continue
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args = parser.parse_args(command)
        except SystemExit:
            problems.append(f"{name}: `streamlearn {' '.join(command)}` does not parse: "
                            f"{err.getvalue().strip().splitlines()[-1:]}")
            continue
        if not callable(getattr(args, "func", None)):
            problems.append(f"{name}: `streamlearn {' '.join(command)}` names no runnable command")
        checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 12, f"only {checked} streamlearn services found"


def test_services_are_the_platform_that_streamlearn_up_runs(services: dict[str, dict[str, Any]]) -> None:
    """Same names and commands as streamlearn.stack, so `up --only X` and `compose up X` agree."""
    from streamlearn.stack import default_services

    stack = {s.name: s.args for s in default_services(config.load(environ={}), gateway=True, registry_http=True)}
    workers = {n for n in services if n not in INFRA}
    assert workers == set(stack), \
        f"compose-only: {sorted(workers - set(stack))}, up-only: {sorted(set(stack) - workers)}"
    for name, args in stack.items():
        command = services[name]["command"]
        assert "--instance-id" not in args, f"{name}: `streamlearn up` lets workers derive their static member id"
        # compose scales these (`--scale`): a pinned id would make the replicas fence each other
        assert "--instance-id" not in command and "--slot" not in command, f"{name}: compose pins a member id"
        assert command[:len(args)] == args, f"{name}: compose runs {command}, `streamlearn up` runs {args}"
    assert services["topics"]["command"] == ["topics", "create"]
    expected = ({f"stream-{k}" for k in KINDS} | {f"train-{m}" for m in MODELS} | {f"serve-{m}" for m in MODELS}
                | {"gateway", "registry"})
    assert expected <= workers
    for model in MODELS:
        assert flag_value(services[f"serve-{model}"]["command"], "--http-port") == "8501", \
            f"serve-{model}: the TF Serving REST port is 8501 in every serving container"


def test_environment_is_declared_once_and_known_to_config(compose: dict[str, Any],
                                                          services: dict[str, dict[str, Any]]) -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    assert re.search(r"^x-streamlearn-env:\s*&env\s*$", text, re.M), "the shared env must be the &env anchor"
    shared = {str(k): str(v) for k, v in compose["x-streamlearn-env"].items()}
    assert shared["STREAMLEARN_KAFKA_BOOTSTRAP"] == ",".join(f"{b}:9092" for b in BROKERS)
    # the platform key rides in the URL's userinfo (schemas/http_client.py strips it from messages)
    assert re.sub(r"//[^@/]*@", "//", shared["STREAMLEARN_REGISTRY_URL"]) == "http://registry:8081"
    known = {s.env for s in config.SPECS}
    for name, svc in services.items():
        if not is_streamlearn(svc):
            continue
        env = env_of(svc)
        missing = {k: v for k, v in shared.items() if env.get(k) != v}
        assert not missing, f"{name}: does not carry the shared environment {missing}"
        unknown = {k for k in env if k.startswith("STREAMLEARN_")} - known
        assert not unknown, f"{name}: {sorted(unknown)} are not settings of streaming/config.py"
        settings = config.load(environ={k: interpolate(v) for k, v in env.items()})  # types coerce
        assert settings.kafka_bootstrap == shared["STREAMLEARN_KAFKA_BOOTSTRAP"] and not settings.embedded
        assert (settings.replication_factor, settings.min_insync_replicas) == (3, 2), name
        assert str(settings.feature_store) == shared["STREAMLEARN_FEATURE_STORE"]
        assert str(settings.model_dir) == shared["STREAMLEARN_MODEL_DIR"]


def test_kafka_is_a_three_broker_kraft_cluster(services: dict[str, dict[str, Any]],
                                               compose: dict[str, Any]) -> None:
    bootstrap = compose["x-streamlearn-env"]["STREAMLEARN_KAFKA_BOOTSTRAP"].split(",")
    assert [n for n in services if n.startswith("kafka-") and n != "kafka-users"] == list(BROKERS)
    node_ids = set()
    voters = None
    for name in BROKERS:
        kafka = services[name]
        assert re.fullmatch(r"apache/kafka:(3\.9\.\d+|4\.\d+\.\d+)", kafka["image"]), kafka["image"]
        env = env_of(kafka)
        assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
        assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in env["KAFKA_LISTENERS"]
        node_ids.add(env["KAFKA_NODE_ID"])
        voters = voters or env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
        assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == voters, f"{name}: every node names the same quorum"
        assert f"{env['KAFKA_NODE_ID']}@{name}:9093" in voters.split(","), f"{name} is not a voter as itself"
        advertised = [a.split("://", 1)[1] for a in env["KAFKA_ADVERTISED_LISTENERS"].split(",")]
        assert f"{name}:9092" in advertised and f"{name}:9092" in bootstrap, (name, advertised, bootstrap)
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "topics come only from `streamlearn topics create`"
        # internal topics (offsets, transactions) and every created topic: 3 replicas, acks need 2
        for key, want in (("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "3"), ("KAFKA_DEFAULT_REPLICATION_FACTOR", "3"),
                          ("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "3"),
                          ("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "2"), ("KAFKA_MIN_INSYNC_REPLICAS", "2"),
                          ("KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE", "false")):
            assert env[key] == want, f"{name}: {key}={env[key]}, want {want}"
        assert env["CLUSTER_ID"] == env_of(services[BROKERS[0]])["CLUSTER_ID"], "one cluster id"
        assert "kafka-broker-api-versions" in " ".join(kafka["healthcheck"]["test"])
    assert node_ids == {"1", "2", "3"} and voters is not None and len(voters.split(",")) == 3


def test_scalable_services_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    """`docker compose up --scale X=N` needs no container name and no single fixed host port."""
    scalable = [n for n in services if n.startswith(SCALABLE_PREFIXES)]
    assert {f"stream-{k}" for k in KINDS} | {f"serve-{m}" for m in MODELS} | {"registry"} <= set(scalable)
    for name in scalable:
        svc = services[name]
        assert "container_name" not in svc and "hostname" not in svc, f"{name}: a fixed name blocks --scale"
        for port in svc.get("ports", []):
            host = str(port).rsplit(":", 1)[0]
            low, _, high = host.rpartition(":")[2].partition("-")
            assert high and int(high) - int(low) >= 3, f"{name}: host port {host} is not a range (blocks --scale)"


def test_volumes_are_declared_used_and_mounted_where_settings_point(compose: dict[str, Any],
                                                                     services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    for name, svc in services.items():
        mounts = named_volume_mounts(svc)
        assert set(mounts) <= declared, f"{name}: volumes {sorted(set(mounts) - declared)} are not declared"
        used |= set(mounts)
        for path in bind_mounts(svc):
            assert (ROOT / path).exists(), f"{name}: bind mount {path} does not exist"
    assert declared <= used, f"declared but unused volumes: {sorted(declared - used)}"
    shared = compose["x-streamlearn-env"]
    need = {"stream": {"STREAMLEARN_FEATURE_STORE"}, "train": {"STREAMLEARN_FEATURE_STORE", "STREAMLEARN_MODEL_DIR"},
            "serve": {"STREAMLEARN_MODEL_DIR"}, "registry": {"STREAMLEARN_HOME"}}
    for name, svc in services.items():
        if not is_streamlearn(svc) or svc["command"][0] not in need:
            continue
        targets = set(named_volume_mounts(svc).values())
        for var in need[svc["command"][0]]:
            assert shared[var] in targets, f"{name}: {var}={shared[var]} is not on a named volume"


def test_depends_on_targets_exist_and_workers_wait_for_topics(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for target, spec in deps.items():
            assert target in services, f"{name} depends on undefined service {target}"
            condition = (spec or {}).get("condition", "service_started")
            assert condition in V1_CONDITIONS, f"{name} -> {target}: condition {condition} (v1 cannot parse it)"
            assert set(spec or {}) <= {"condition"}, f"{name} -> {target}: {sorted(spec)} (v1 rejects extra keys)"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy; it has no check"
            if condition == "service_completed_successfully":
                assert one_shot(services[target]), f"{name} waits for {target} to exit; it restarts"
        if is_streamlearn(svc) and not one_shot(svc) and name != "registry":
            assert deps.get("topics", {}).get("condition") == "service_completed_successfully", name
            for broker in BROKERS:
                assert deps.get(broker, {}).get("condition") == "service_healthy", (name, broker)
    for broker in BROKERS:  # RF 3 topics need all three
        assert services["topics"]["depends_on"][broker]["condition"] == "service_healthy"
        assert services["kafka-users"]["depends_on"][broker]["condition"] == "service_healthy"
    seen: dict[str, int] = {}

    def visit(node: str) -> None:  # no cycles: compose would refuse to start
        if seen.get(node) == 1:
            raise AssertionError(f"depends_on cycle through {node}")
        if seen.get(node) == 2:
            return
        seen[node] = 1
        for dep in services[node].get("depends_on") or {}:
            visit(dep)
        seen[node] = 2

    for node in services:
        visit(node)


def test_restart_policies_and_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        assert "restart" in svc, f"{name} has no restart policy"
        if one_shot(svc):
            assert "healthcheck" not in svc
            continue
        assert svc["restart"] == "unless-stopped", f"{name}: restart {svc['restart']!r}"
        check = svc.get("healthcheck")
        assert check and isinstance(check.get("test"), list) and check["test"][0] in ("CMD", "CMD-SHELL"), \
            f"{name} has no healthcheck"
        port = metrics_port(svc)
        if port is not None:
            assert f"127.0.0.1:{port}/" in " ".join(check["test"]), \
                f"{name}: its healthcheck does not probe its metrics/health port {port}"
    assert [n for n, s in services.items() if one_shot(s)] == ["kafka-users", "topics"]


def test_published_ports_do_not_collide(services: dict[str, dict[str, Any]]) -> None:
    published: dict[int, str] = {}
    for name, svc in services.items():
        for port in svc.get("ports", []):
            host = str(port).rsplit(":", 1)[0] if ":" in str(port) else str(port)
            low, _, high = host.rpartition(":")[2].partition("-")  # "127.0.0.1:9090", "8501-8509"
            for p in range(int(low), int(high or low) + 1):
                assert p not in published, f"host port {p}: {published.get(p)} and {name}"
                published[p] = name


def test_every_metrics_port_is_a_prometheus_target_and_back(services: dict[str, dict[str, Any]]) -> None:
    prom = load_yaml(PROMETHEUS)
    jobs: dict[str, list[str]] = {}
    for job in prom["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        assert not job.get("static_configs"), f"{job['job_name']}: a static target misses scaled replicas"
        # DNS service discovery: the compose service name resolves to every replica (type A)
        jobs[job["job_name"]] = [f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]
                                 if sd.get("type") == "A"]
    expected = {}
    for name, svc in services.items():
        port = metrics_port(svc)
        if port is not None:
            assert port > 0, f"{name}: metrics port {port} is not a fixed port Prometheus could scrape"
            expected[name] = [f"{name}:{port}"]
    assert jobs == expected, (f"services without a job: {sorted(set(expected) - set(jobs))}; jobs without a "
                              f"service: {sorted(set(jobs) - set(expected))}; jobs {jobs} vs {expected}")
    worker_ports = {metrics_port(services[n]) for n in expected if services[n]["command"][:2] != ["ingest", "serve"]}
    assert worker_ports == {9100}, worker_ports


def test_dockerfile_builds_the_cli_image_from_the_lock_file() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r'^ENTRYPOINT \["streamlearn"\]\s*$', text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    lock = text.index("pip install -r requirements.lock")
    assert lock < text.index("pip install --no-deps .")
    with open(ROOT / "pyproject.toml", "rb") as fh:
        include = tomllib.load(fh)["tool"]["setuptools"]["packages"]["find"]["include"]
    top = sorted({p.rstrip("*") for p in include})
    assert set(top) == set(PACKAGES), top
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in [*top, "requirements.lock", "pyproject.toml", "README.md"]:
        assert re.search(rf"^COPY\s.*\b{re.escape(needed)}\b", text, re.M), f"the Dockerfile does not copy {needed}"
        assert needed not in ignored, f".dockerignore excludes {needed}, which the build needs"


# --- the dashboard and the metrics contract ------------------------------------------------------
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                 "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels, durations left out)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery durations
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables such as $__rate_interval
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in _PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names


def test_promql_metric_names_extractor() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{model="x", le!="1"}[$__rate_interval])))'
            ' / on (model) group_left sum(b_total offset 5m) + up{job=~"s.*"} * 1e-3')
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "up"}
    assert promql_metric_names("sum(rate(c_total[5m])) by (kind)") == {"c_total"}


def contract() -> dict[str, set[str]]:
    """{metric: labels} from the 'Metrics contract' table of docs/DEPLOY.md."""
    text = DEPLOY_DOC.read_text(encoding="utf-8")
    section = text.split("## Metrics contract", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*`([A-Za-z_:][\w:]*)`\s*\|\s*`([^`]*)`", section, re.M)
    assert rows, "docs/DEPLOY.md: no metrics in the 'Metrics contract' table"
    return {name: {x.strip() for x in labels.split(",") if x.strip()} for name, labels in rows}


def dashboard_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in panels:
        out.append(p)
        out += dashboard_panels(p.get("panels", []))  # collapsed rows nest their panels
    return out


def test_grafana_is_provisioned_with_the_dashboard(services: dict[str, dict[str, Any]]) -> None:
    sources = [d for f in sorted((GRAFANA / "provisioning" / "datasources").glob("*.yml"))
               for d in load_yaml(f)["datasources"]]
    assert [d["type"] for d in sources] == ["prometheus"]
    assert sources[0]["url"] == "http://prometheus:9090" and "prometheus" in services
    providers = [p for f in sorted((GRAFANA / "provisioning" / "dashboards").glob("*.yml"))
                 for p in load_yaml(f)["providers"]]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in services["grafana"]["volumes"]}
    for provider in providers:
        path = provider["options"]["path"]
        assert (ROOT / mounts[path]).resolve() == DASHBOARD.parent, f"provider path {path} is not the dashboards dir"
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    uids = {t["datasource"]["uid"] for p in dashboard_panels(dash["panels"]) for t in p.get("targets", [])}
    assert uids == {sources[0]["uid"]}, uids


def test_dashboard_queries_use_only_contract_metrics() -> None:
    allowed = contract()
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    used: set[str] = set()
    problems = []
    exprs = 0
    for panel in dashboard_panels(dash["panels"]):
        for target in panel.get("targets", []):
            exprs += 1
            names = promql_metric_names(target["expr"])
            if not names:
                problems.append(f"panel {panel['title']!r}: {target['expr']!r} selects no metric")
            if names - set(allowed):
                problems.append(f"panel {panel['title']!r}: {sorted(names - set(allowed))} not in docs/DEPLOY.md")
            used |= names
    assert not problems, "\n".join(problems)
    assert exprs >= 10
    assert set(allowed) <= used, f"contract metrics no panel shows: {sorted(set(allowed) - used)}"
    quantiles = [t["expr"] for p in dashboard_panels(dash["panels"]) for t in p.get("targets", [])
                 if "histogram_quantile" in t["expr"]]
    assert any("0.5," in q for q in quantiles) and any("0.99," in q for q in quantiles), "p50 and p99 panels"


def test_promtool_accepts_the_config_and_every_dashboard_query(tmp_path: Path) -> None:
    """Prometheus's own parser (Debian: apt-get install prometheus) on the config and the panels' PromQL."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (Debian: apt-get install -y --no-install-recommends prometheus)")
    config_copy = tmp_path / "prometheus.yml"
    config_copy.write_text(PROMETHEUS.read_text(encoding="utf-8"), encoding="utf-8")
    result = subprocess.run([promtool, "check", "config", str(config_copy)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard_panels(dash["panels"]) for t in p.get("targets", [])]
    # Recording rules are the one promtool input made of bare expressions; Grafana's $__rate_interval
    # becomes a literal range first.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr{i}", "expr": e.replace("$__rate_interval", "1m")} for i, e in enumerate(exprs)]}]}
    rules_file = tmp_path / "rules.json"  # JSON is YAML: no PyYAML needed to write it
    rules_file.write_text(json.dumps(rules), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout, result.stdout


def declared_metrics() -> dict[str, set[str]]:
    """{exposed sample name: label names} of every prometheus_client metric declared in the packages."""
    kinds = {"Counter", "Gauge", "Histogram", "Summary"}
    out: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Call):
                    continue
                fn = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if fn not in kinds or not node.args or not isinstance(node.args[0], ast.Constant):
                    continue
                name = str(node.args[0].value)
                label_node = node.args[2] if len(node.args) > 2 else next(
                    (k.value for k in node.keywords if k.arg == "labelnames"), None)
                labels = ({e.value for e in label_node.elts if isinstance(e, ast.Constant)}
                          if isinstance(label_node, (ast.List, ast.Tuple)) else set())
                base = name.removesuffix("_total")
                if fn == "Counter":
                    exposed = [f"{base}_total"]
                elif fn in ("Histogram", "Summary"):
                    exposed = [name, f"{name}_bucket", f"{name}_sum", f"{name}_count"]
                else:
                    exposed = [name]
                for e in exposed:
                    out.setdefault(e, set()).update(labels)
    return out


def test_code_declares_every_contract_metric() -> None:
    """Fails until the metric names of the workers and docs/DEPLOY.md agree (the lead reconciles)."""
    declared = declared_metrics()
    assert "streamlearn_stream_batches_total" in declared, "the AST scan found no metric declarations"
    problems = []
    for name, labels in contract().items():
        if name == "up":  # Prometheus's own
            continue
        if name not in declared:
            near = difflib.get_close_matches(name, list(declared), n=3, cutoff=0.7)
            problems.append(f"{name} is declared nowhere in {', '.join(PACKAGES)} (closest: {near})")
        elif not labels <= declared[name]:
            problems.append(f"{name}: labels {sorted(labels - declared[name])} missing (has {sorted(declared[name])})")
    assert not problems, "\n".join(problems)
