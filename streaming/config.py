"""The one place that reads environment variables and the config file.

Every setting has a name, a type, a default and an environment variable. Precedence, highest
first: an explicit value passed by the caller (a CLI flag), the environment variable, the config
file (TOML: ``$STREAMLEARN_CONFIG``, else ``$STREAMLEARN_HOME/config.toml``, else
``./streamlearn.toml``), the default. Nothing else in streamlearn calls ``os.environ`` for its
own settings, so ``streamlearn --help`` and the README can list every knob from :data:`SPECS`.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from schemas.access import TENANT_RE
from schemas.exceptions import ConfigError

__all__ = ["ConfigError", "SPECS", "Settings", "Spec", "env_help", "load", "to_env"]


@dataclass(frozen=True)
class Spec:
    name: str
    env: str
    type: type
    default: Any
    help: str


SPECS: tuple[Spec, ...] = (
    Spec("home", "STREAMLEARN_HOME", Path, Path(".streamlearn"),
         "root of broker data, schema registry, feature store, models and checkpoints"),
    Spec("kafka_bootstrap", "STREAMLEARN_KAFKA_BOOTSTRAP", str, None,
         "Kafka bootstrap address; when set, no embedded broker is started"),
    Spec("broker_host", "STREAMLEARN_BROKER_HOST", str, "127.0.0.1", "address the embedded broker binds"),
    Spec("broker_port", "STREAMLEARN_BROKER_PORT", int, 19092, "port of the embedded broker"),
    Spec("registry_url", "STREAMLEARN_REGISTRY_URL", str, None,
         "URL of a Confluent-compatible schema registry (a key goes in as http://name:token@host:port); when "
         "unset the file store under HOME is used"),
    Spec("registry_port", "STREAMLEARN_REGISTRY_PORT", int, 8081, "port of `streamlearn registry serve`"),
    Spec("topic_prefix", "STREAMLEARN_TOPIC_PREFIX", str, "",
         "prefix for every topic and consumer group name (isolates tenants and test runs)"),
    Spec("tenant", "STREAMLEARN_TENANT", str, "",
         "tenant this process acts for: its topic and group names become <topic_prefix><tenant>.<name>, and its "
         "Kafka clients refuse topics, groups and transactional ids outside that prefix (docs/SECURITY.md)"),
    Spec("partitions", "STREAMLEARN_PARTITIONS", int, 3, "partitions of the raw and request topics"),
    Spec("feature_store", "STREAMLEARN_FEATURE_STORE", Path, None, "feature batch directory (default HOME/features)"),
    Spec("model_dir", "STREAMLEARN_MODEL_DIR", Path, None, "model registry directory (default HOME/models)"),
    Spec("ingest_tokens", "STREAMLEARN_INGEST_TOKENS", str, "",
         "comma-separated bearer tokens of the HTTP ingest gateway (name:token or token)"),
    Spec("ingest_port", "STREAMLEARN_INGEST_PORT", int, 8088, "port of the HTTP ingest gateway"),
    Spec("ingest_host", "STREAMLEARN_INGEST_HOST", str, "127.0.0.1", "address the HTTP ingest gateway binds"),
    Spec("ingest_max_body_bytes", "STREAMLEARN_INGEST_MAX_BODY_BYTES", int, 16 * 1024 * 1024,
         "gateway: 413 above this request size"),
    Spec("ingest_rate", "STREAMLEARN_INGEST_RATE", float, 10_000.0, "gateway: records/s per token (0 = unlimited)"),
    Spec("ingest_burst", "STREAMLEARN_INGEST_BURST", float, 20_000.0, "gateway: token bucket size in records"),
    Spec("ingest_max_in_flight", "STREAMLEARN_INGEST_MAX_IN_FLIGHT", int, 50_000,
         "gateway: un-acked records before new requests get 503"),
    Spec("metrics_port", "STREAMLEARN_METRICS_PORT", int, 0,
         "port for /metrics of a worker (0 picks a free port, -1 disables)"),
    Spec("transactions", "STREAMLEARN_TRANSACTIONS", bool, True,
         "use Kafka transactions for consume-transform-produce (exactly once)"),
    Spec("batch_max_records", "STREAMLEARN_BATCH_MAX_RECORDS", int, 500, "a micro-batch closes at this many records"),
    Spec("batch_max_seconds", "STREAMLEARN_BATCH_MAX_SECONDS", float, 5.0, "... or when its oldest record is this old"),
    Spec("retrain_every_batches", "STREAMLEARN_RETRAIN_EVERY_BATCHES", int, 4, "retrain after this many new batches"),
    Spec("retrain_every_seconds", "STREAMLEARN_RETRAIN_EVERY_SECONDS", float, 30.0, "... or after this long"),
    Spec("serve_max_batch", "STREAMLEARN_SERVE_MAX_BATCH", int, 64, "largest dynamic serving batch"),
    Spec("serve_max_wait_ms", "STREAMLEARN_SERVE_MAX_WAIT_MS", float, 5.0, "longest a request waits for a batch"),
    Spec("serve_http_host", "STREAMLEARN_SERVE_HTTP_HOST", str, "127.0.0.1",
         "address the serving worker's HTTP API binds (0.0.0.0 in containers)"),
    Spec("log_level", "STREAMLEARN_LOG_LEVEL", str, "INFO", "logging level"),
    # -- access (schemas/access.py, docs/SECURITY.md) --
    Spec("keys", "STREAMLEARN_KEYS", str, "",
         "API keys of every HTTP server: name:token[:scopes[:tenant]], comma separated (never on argv)"),
    Spec("keys_file", "STREAMLEARN_KEYS_FILE", Path, None, "file of API keys, one name:token[:scopes[:tenant]] a line"),
    Spec("registry_read_open", "STREAMLEARN_REGISTRY_READ_OPEN", bool, True,
         "registry server: reads need no key (writes always need schema-admin when keys are set)"),
    Spec("registry_host", "STREAMLEARN_REGISTRY_HOST", str, "127.0.0.1", "address `registry serve` binds"),
    Spec("metrics_host", "STREAMLEARN_METRICS_HOST", str, "127.0.0.1", "address /metrics servers bind"),
    Spec("ingest_tenant_rate", "STREAMLEARN_INGEST_TENANT_RATE", float, 0.0,
         "gateway: records/s per tenant across its keys (0 = no tenant quota)"),
    Spec("serve_tenant_rate", "STREAMLEARN_SERVE_TENANT_RATE", float, 0.0,
         "serving HTTP: instances/s per tenant (0 = no tenant quota)"),
    Spec("serve_max_body_bytes", "STREAMLEARN_SERVE_MAX_BODY_BYTES", int, 4 * 1024 * 1024,
         "serving HTTP: 413 above this request size"),
    Spec("serve_max_instances", "STREAMLEARN_SERVE_MAX_INSTANCES", int, 1024,
         "serving HTTP: instances per predict request"),
    Spec("serve_max_concurrent", "STREAMLEARN_SERVE_MAX_CONCURRENT", int, 8,
         "serving HTTP: predict requests at once before 429"),
    # -- Kafka client security (streaming/kafka_security.py) --
    Spec("kafka_security_protocol", "STREAMLEARN_KAFKA_SECURITY_PROTOCOL", str, "PLAINTEXT",
         "PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL"),
    Spec("kafka_sasl_mechanism", "STREAMLEARN_KAFKA_SASL_MECHANISM", str, "SCRAM-SHA-512",
         "PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 (SASL protocols only)"),
    Spec("kafka_sasl_username", "STREAMLEARN_KAFKA_SASL_USERNAME", str, "", "SASL user"),
    Spec("kafka_sasl_password", "STREAMLEARN_KAFKA_SASL_PASSWORD", str, "", "SASL password (env or config file only)"),
    Spec("kafka_ssl_cafile", "STREAMLEARN_KAFKA_SSL_CAFILE", Path, None,
         "CA bundle that signs the brokers' certificates"),
    # Event-time policy (streaming/eventtime.py, docs/EVENT_TIME.md).
    Spec("event_max_age", "STREAMLEARN_EVENT_MAX_AGE", str, "20y",
         "live sources reject event times older than this (90s, 15m, 12h, 30d, 52w, 20y; 'none': back to 1678)"),
    Spec("backfill", "STREAMLEARN_BACKFILL", bool, False,
         "sources publish history: no age limit, records marked as one backfill run (no live lateness)"),
    Spec("max_future_skew_s", "STREAMLEARN_MAX_FUTURE_SKEW_S", float, 300.0,
         "every entry and featurizer rejects event times more than this many seconds ahead of now"),
    Spec("timestamp_unit", "STREAMLEARN_TIMESTAMP_UNIT", str, "auto",
         "numeric timestamps of files and stdin: s|ms|us|ns|iso|auto (auto decides once per file)"),
    Spec("ingest_timestamp_unit", "STREAMLEARN_INGEST_TIMESTAMP_UNIT", str, "ms",
         "numeric timestamps posted to the HTTP ingest gateway: s|ms|us|ns|iso (ISO strings always accepted)"),
    Spec("max_record_bytes", "STREAMLEARN_MAX_RECORD_BYTES", int, 1_000_000,
         "broker record limit assumed when the broker does not report max.message.bytes; answers and "
         "dead letters are cut to fit it less a margin"),
    Spec("reply_topics", "STREAMLEARN_REPLY_TOPICS", str, "{predictions}.*",
         "comma-separated fnmatch patterns of topics a prediction request may name as reply_topic, besides "
         "the model's predictions topic ({predictions} = that topic, {model} = the model name)"),
    Spec("broker_loss_window_s", "STREAMLEARN_BROKER_LOSS_WINDOW_S", float, 5.0,
         "publishers keep acked records this long (and re-send them if the broker lost them); 0 disables"),
    # Feature-store growth (streaming/store_index.py, streaming/retention.py, docs/STORE.md).
    Spec("store_retention_days", "STREAMLEARN_STORE_RETENTION_DAYS", float, 0.0,
         "`store gc` deletes batches older than this many days (0 = no age limit); lineage batches stay"),
    Spec("store_max_bytes", "STREAMLEARN_STORE_MAX_BYTES", int, 0,
         "`store gc` deletes the oldest batches above this many bytes per kind (0 = no size limit)"),
    Spec("store_state_inline_max_bytes", "STREAMLEARN_STORE_STATE_INLINE_MAX_BYTES", int, 4096,
         "featurizer state above this size goes to a <batch>.state.json file, not the manifest"),
    # Distributed training (trainer/distributed.py, docs/DISTRIBUTED.md).
    Spec("distributed_timeout_s", "STREAMLEARN_DISTRIBUTED_TIMEOUT_S", float, 300.0,
         "`train --distributed`: longest wait for the other workers to join and for any one collective step"),
)
_BY_NAME = {s.name: s for s in SPECS}


def env_help(name: str) -> str:
    """Text for ``--help``: which environment variable a flag falls back to and its default."""
    spec = _BY_NAME[name]
    default = spec.default if spec.default is not None else "unset"
    return f"(env {spec.env}; default {default})"


def _coerce(spec: Spec, raw: Any) -> Any:
    if raw is None:
        return None
    try:
        if spec.type is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if spec.type is str:
            text = str(raw)
            return text if text != "" or spec.default == "" else None
        return spec.type(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"setting '{spec.name}' (env {spec.env}) must be a {spec.type.__name__}, got {raw!r}"
        ) from exc


def _config_file(environ: dict[str, str], home: Path) -> dict[str, Any]:
    """The first config file found. Its ``[models]`` table (import targets that get called) is
    honoured only from ``$STREAMLEARN_CONFIG`` (``--config``) or ``$STREAMLEARN_HOME/config.toml``,
    never from a ``./streamlearn.toml`` that happens to sit in the working directory (a cloned repo)."""
    candidates = []
    if environ.get("STREAMLEARN_CONFIG"):
        candidates.append(Path(environ["STREAMLEARN_CONFIG"]))
    candidates += [home / "config.toml", Path("streamlearn.toml")]
    for n, path in enumerate(candidates):
        if path.is_file():
            with path.open("rb") as fh:
                data = tomllib.load(fh)
            unknown = set(data) - set(_BY_NAME) - {"models"}
            if unknown:
                raise ConfigError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(_BY_NAME)}")
            if n == len(candidates) - 1 and "models" in data:
                import logging

                logging.getLogger(__name__).warning(
                    "%s: [models] ignored: model plugins load only from the file named by STREAMLEARN_CONFIG "
                    "(--config), $STREAMLEARN_HOME/config.toml or installed entry points", path)
                data = {k: v for k, v in data.items() if k != "models"}
            return data
    return {}


@dataclass(frozen=True)
class Settings:
    """Resolved settings. Build with :func:`load`; derive variants with :meth:`with_`."""

    home: Path
    kafka_bootstrap: str | None
    broker_host: str
    broker_port: int
    registry_url: str | None
    registry_port: int
    topic_prefix: str
    partitions: int
    feature_store: Path
    model_dir: Path
    ingest_tokens: str = field(repr=False)  # a secret: never in a repr or a log line
    ingest_port: int
    ingest_host: str
    ingest_max_body_bytes: int
    ingest_rate: float
    ingest_burst: float
    ingest_max_in_flight: int
    metrics_port: int
    transactions: bool
    batch_max_records: int
    batch_max_seconds: float
    retrain_every_batches: int
    retrain_every_seconds: float
    serve_max_batch: int
    serve_max_wait_ms: float
    serve_http_host: str
    log_level: str
    keys: str = field(repr=False)  # a secret: never in a repr or a log line
    keys_file: Path | None
    registry_read_open: bool
    registry_host: str
    metrics_host: str
    ingest_tenant_rate: float
    serve_tenant_rate: float
    serve_max_body_bytes: int
    serve_max_instances: int
    serve_max_concurrent: int
    kafka_security_protocol: str
    kafka_sasl_mechanism: str
    kafka_sasl_username: str
    kafka_sasl_password: str = field(repr=False)  # a secret: never in a repr or a log line
    kafka_ssl_cafile: Path | None
    event_max_age: str = "20y"
    backfill: bool = False
    max_future_skew_s: float = 300.0
    timestamp_unit: str = "auto"
    ingest_timestamp_unit: str = "ms"
    max_record_bytes: int = 1_000_000
    reply_topics: str = "{predictions}.*"
    broker_loss_window_s: float = 5.0
    store_retention_days: float = 0.0
    store_max_bytes: int = 0
    store_state_inline_max_bytes: int = 4096
    distributed_timeout_s: float = 300.0
    tenant: str = ""
    model_specs: dict[str, str] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        """The address clients connect to: the configured one, else the embedded broker's."""
        return self.kafka_bootstrap or f"{self.broker_host}:{self.broker_port}"

    @property
    def embedded(self) -> bool:
        return self.kafka_bootstrap is None

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    @property
    def registry_dir(self) -> Path:
        return self.home / "registry"

    @property
    def state_dir(self) -> Path:
        """Checkpoints of sources (file positions, processed images) and worker state."""
        return self.home / "state"

    @property
    def namespace(self) -> str:
        """Prefix of every topic and group name this process uses: ``<topic_prefix>[<tenant>.]``."""
        return f"{self.topic_prefix}{self.tenant}." if self.tenant else self.topic_prefix

    def topic(self, name: str) -> str:
        return f"{self.namespace}{name}"

    def group(self, name: str) -> str:
        return f"{self.namespace}{name}"

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def load(overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Resolve every setting. ``overrides`` (e.g. CLI flags) win; None values are ignored."""
    env = dict(os.environ if environ is None else environ)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - set(_BY_NAME)
    if unknown:
        raise ConfigError(f"unknown settings {sorted(unknown)}")
    home_raw = overrides.get("home") or env.get("STREAMLEARN_HOME") or ".streamlearn"
    home = Path(home_raw).expanduser().absolute()
    filecfg = _config_file(env, home)
    values: dict[str, Any] = {}
    for spec in SPECS:
        if spec.name in overrides:
            raw = overrides[spec.name]
        elif env.get(spec.env, "") != "":
            raw = env[spec.env]
        elif spec.name in filecfg:
            raw = filecfg[spec.name]
        else:
            raw = spec.default
        values[spec.name] = _coerce(spec, raw)
    values["home"] = home
    values["feature_store"] = Path(values["feature_store"] or home / "features").absolute()
    values["model_dir"] = Path(values["model_dir"] or home / "models").absolute()
    if values["partitions"] < 1:
        raise ConfigError("setting 'partitions' (env STREAMLEARN_PARTITIONS) must be >= 1")
    if values["distributed_timeout_s"] <= 0:
        raise ConfigError("setting 'distributed_timeout_s' (env STREAMLEARN_DISTRIBUTED_TIMEOUT_S) must be > 0 "
                          "seconds")
    for name in ("store_retention_days", "store_max_bytes", "store_state_inline_max_bytes"):
        if values[name] < 0:
            raise ConfigError(f"setting {name!r} (env {_BY_NAME[name].env}) must be >= 0 (0 turns it off)")
    if values["tenant"] and not TENANT_RE.match(values["tenant"]):
        raise ConfigError(f"setting 'tenant' (env STREAMLEARN_TENANT) is {values['tenant']!r}; a tenant id is "
                          "[a-z][a-z0-9-]{0,30}, the same as in a key's tenant field")
    models = filecfg.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError("config file: [models] must be a table of name = 'module:attribute'")
    return Settings(**values, model_specs={str(k): str(v) for k, v in models.items()})


def tf_config(environ: dict[str, str] | None = None) -> str:
    """TensorFlow's ``TF_CONFIG`` (cluster and task of a ``train --distributed`` worker), "" when unset.

    TensorFlow reads this variable itself; streamlearn reads it here too (the one place) so the
    trainer can check it and name it in errors before TensorFlow starts. It is deliberately not a
    setting: :func:`to_env` must not hand one worker's task index to the processes it starts.
    """
    env = os.environ if environ is None else environ
    return env.get("TF_CONFIG", "")


def to_env(settings: Settings) -> dict[str, str]:
    """The environment variables that reproduce ``settings`` in a child process.

    Used by the supervisor and by tests that run workers as subprocesses.
    """
    env: dict[str, str] = {}
    for spec in SPECS:
        value = getattr(settings, spec.name)
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        env[spec.env] = str(value)
    if not settings.embedded:
        env["STREAMLEARN_KAFKA_BOOTSTRAP"] = settings.bootstrap
    return env
