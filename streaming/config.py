"""The one place that reads environment variables and the config file (pydantic-settings).

Every setting is a field of :class:`Settings`: a name, a type, a default and a description. Its
environment variable is ``STREAMLEARN_<NAME>`` (:func:`env_name`). Precedence, highest first: an
explicit value passed by the caller (a CLI flag), the environment variable, the config file (TOML:
``$STREAMLEARN_CONFIG``, else ``$STREAMLEARN_HOME/config.toml``, else ``./streamlearn.toml``), the
default. pydantic-settings does the lookup and the coercion; this module only fixes the order of the
sources, keeps the ``[models]`` trust rule and turns pydantic's ``ValidationError`` into our
:class:`ConfigError` naming the variable. Nothing else in streamlearn calls ``os.environ`` for its own
settings, so ``--help`` (:func:`flag_help`) and the README read every knob from the field docs.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, ClassVar, Union, get_args, get_origin

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from schemas.access import tenant_problem
from schemas.exceptions import ConfigError

__all__ = ["ConfigError", "SPECS", "Settings", "Spec", "env_help", "env_name", "flag_help", "load", "to_env"]

ENV_PREFIX = "STREAMLEARN_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TOPIC_PREFIX_RE = re.compile(r"^[A-Za-z0-9._-]{0,100}$")
#: Fields that are not settings of their own: never read from the environment, never in ``to_env``.
_NOT_FROM_ENV = frozenset({"model_specs"})


def _location(raw: Path | str | None, default: Path) -> Path | str:
    """A store location: an object-storage URL stays a str (``s3://...``); a path or ``file://`` URL
    becomes an absolute Path, as before."""
    from streaming.objstore import is_remote, local_path

    if raw and is_remote(raw):
        return str(raw).rstrip("/")
    return (local_path(raw) if raw else default).expanduser().absolute()


class Settings(BaseSettings):
    """Resolved settings. Build with :func:`load`; derive variants with :meth:`with_`.

    Frozen, so a settings object handed to a thread or a child's environment never changes under it.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, case_sensitive=False, env_ignore_empty=True,
                                      extra="forbid", frozen=True, protected_namespaces=(),
                                      coerce_numbers_to_str=True)  # topic_prefix = 5 in TOML is "5", as before

    home: Path = Field(Path(".streamlearn"), description=(
        "root of broker data, schema registry, feature store, models and checkpoints"))
    kafka_bootstrap: str | None = Field(None, description=(
        "Kafka bootstrap address; when set, no embedded broker is started"))
    broker_host: str = Field("127.0.0.1", description=("address the embedded broker binds"))
    broker_port: int = Field(19092, ge=1, le=65_535, description=("port of the embedded broker"))
    registry_url: str | None = Field(None, description=(
        "URL of a Confluent-compatible schema registry (a key goes in as http://name:token@host:port); when "
        "unset the file store under HOME is used"))
    registry_port: int = Field(8081, ge=0, le=65_535, description=("port `streamlearn registry serve` listens on"))
    topic_prefix: str = Field("", description=(
        "prefix for every topic and consumer group name (isolates tenants and test runs)"))
    tenant: str = Field("", description=(
        "tenant this process acts for: its topic and group names become <topic_prefix><tenant>., and its "
        "Kafka clients refuse topics, groups and transactional ids outside that prefix (docs/SECURITY.md)"))
    partitions: int = Field(3, ge=1, description=("partitions of the raw and request topics"))
    # A str only for an object-storage URL (streaming/objstore.py); a path or file:// URL is an absolute Path.
    feature_store: Path | str = Field(None, validate_default=False,  # type: ignore[assignment]  # HOME/features
                                      description=("feature batch directory or object-storage URL, e.g. "
                                                   "s3://bucket/features (default HOME/features, for a tenant "
                                                   "HOME/tenants/<tenant>/features)"))
    model_dir: Path | str = Field(None, validate_default=False,  # type: ignore[assignment]  # HOME/models
                                  description=("model registry directory or object-storage URL, e.g. "
                                               "s3://bucket/models (default HOME/models, for a tenant "
                                               "HOME/tenants/<tenant>/models)"))
    ingest_tokens: str = Field("", repr=False, description=(  # a secret: never in a repr or a log line
        "comma-separated bearer tokens of the HTTP ingest gateway (name:token or token)"))
    ingest_port: int = Field(8088, ge=0, le=65_535, description=("port the HTTP ingest gateway listens on"))
    ingest_host: str = Field("127.0.0.1", description=(
        "address the HTTP ingest gateway binds, 0.0.0.0 for all interfaces"))
    ingest_max_body_bytes: int = Field(16 * 1024 * 1024, ge=1, description=(
        "gateway: 413 above this request size in bytes"))
    ingest_rate: float = Field(10_000.0, ge=0, allow_inf_nan=False, description=(
        "gateway: records/s per token, token bucket (0 disables)"))
    ingest_burst: float = Field(20_000.0, ge=0, allow_inf_nan=False, description=(
        "gateway: token bucket size in records"))
    ingest_max_in_flight: int = Field(50_000, ge=1, description=(
        "gateway: un-acked records across requests before new requests get 503"))
    metrics_port: int = Field(0, ge=-1, le=65_535, description=(
        "port of a worker's /metrics (0 picks a free port, -1 disables)"))
    transactions: bool = Field(True, description=(
        "use Kafka transactions for consume-transform-produce (exactly once)"))
    fast_reader: bool = Field(True, description=(
        "bounded reads of the raw and dead-letter topics (replays, read-backs, subscribe --until-end) fetch with "
        "confluent-kafka's C client; false reads everything with kafka-python (streaming/cfetch.py)"))
    fast_publisher: bool = Field(True, description=(
        "publishers (sources, the gateway, dead letters) send with confluent-kafka's C client; false sends "
        "with kafka-python (streaming/cproduce.py)"))
    batch_max_records: int = Field(500, ge=1, description=("a micro-batch closes at this many records"))
    batch_max_seconds: float = Field(5.0, gt=0, allow_inf_nan=False, description=(
        "a micro-batch also closes when its oldest record is this many seconds old"))
    image_decode_threads: int = Field(0, ge=0, description=(
        "threads a stream worker decodes a poll's photos on (0: up to 4, at most the CPUs this process may "
        "run on; 1: one at a time); set it where a CPU quota is lower than the CPUs the process sees"))
    retrain_every_batches: int = Field(4, ge=1, description=("retrain after this many new feature batches"))
    retrain_every_seconds: float = Field(30.0, ge=0, allow_inf_nan=False, description=(
        "retrain at the latest this many seconds after the last training started (if new batches exist), "
        "resting at least half of it after a run ends"))
    leader_lease_s: float = Field(15.0, gt=0, description=(
        "trainer leader lease in seconds: renewed every third of it; a standby takes over at most 4/3 of it "
        "after the leader died (docs/LEADER.md)"))
    serve_poll_s: float = Field(1.0, gt=0, description=(
        "serving replicas look for a newly promoted version at least this often, in seconds (a ModelUpdate "
        "event wakes them sooner); replicas serve different versions at most this plus one version's load "
        "time apart (docs/LEADER.md)"))
    serve_standby: bool = Field(False, description=(
        "serve: pair processes per member slot as active + warm standby; a standby loads and warms the model, "
        "then waits (no Kafka client) and takes the slot over the moment the active process dies "
        "(docs/STANDBY.md)"))
    up_standby: bool = Field(True, description=(
        "`streamlearn up` starts a warm standby beside each serving worker (serve --standby; docs/STANDBY.md)"))
    watchdog_s: float = Field(300.0, ge=0, description=(
        "stream and serve: exit (stack dump, code 70) when the worker's loop stalls this long, so it is restarted "
        "or its standby takes over; waits on the broker do not count; 0 turns it off (streaming/watchdog.py)"))
    serve_max_batch: int = Field(64, ge=1, description=("largest dynamic serving batch"))
    serve_max_wait_ms: float = Field(5.0, ge=0, allow_inf_nan=False, description=(
        "longest a prediction request waits for its batch to fill, in ms"))
    serve_http_host: str = Field("127.0.0.1", description=(
        "address the serving worker's HTTP API binds, 0.0.0.0 for all interfaces (containers)"))
    log_level: str = Field("INFO", description=("logging level"))
    # -- access (schemas/access.py, docs/SECURITY.md) --
    keys: str = Field("", repr=False, description=(  # a secret: never in a repr or a log line
        "API keys of every HTTP server: name:token[:scopes[:tenant]], comma separated (never on argv)"))
    keys_file: Path | None = Field(None, description=(
        "file of API keys, one name:token[:scopes[:tenant]] a line"))
    registry_read_open: bool = Field(True, description=(
        "registry server: reads need no key (writes always need schema-admin when keys are set)"))
    registry_host: str = Field("127.0.0.1", description=("address `streamlearn registry serve` binds"))
    metrics_host: str = Field("127.0.0.1", description=("address /metrics servers bind"))
    ingest_tenant_rate: float = Field(0.0, ge=0, allow_inf_nan=False, description=(
        "gateway: records/s per tenant across its keys (0 = no tenant quota)"))
    serve_tenant_rate: float = Field(0.0, ge=0, allow_inf_nan=False, description=(
        "serving HTTP: instances/s per tenant (0 = no tenant quota)"))
    serve_max_body_bytes: int = Field(4 * 1024 * 1024, ge=1, description=(
        "serving HTTP: 413 above this request size in bytes"))
    serve_max_instances: int = Field(1024, ge=1, description=("serving HTTP: instances per predict request"))
    serve_max_concurrent: int = Field(8, ge=1, description=("serving HTTP: predict requests at once before 429"))
    api_host: str = Field("127.0.0.1", description=(
        "address `streamlearn api serve` (the control API: /query, /trainModel, /process, /jobs) binds"))
    api_port: int = Field(8090, ge=0, le=65_535, description=("port `streamlearn api serve` listens on"))
    api_max_jobs: int = Field(4, ge=1, description=(
        "control API: jobs (training, replay, promote) running at once; more get 429 + Retry-After"))
    api_max_body_bytes: int = Field(64 * 1024, ge=1024, description=(
        "control API: 413 above this request body size"))
    api_cancel_grace_s: float = Field(10.0, gt=0, description=(
        "control API: seconds a cancelled job's process group has after SIGTERM before SIGKILL"))
    api_compact_interval_s: float = Field(60.0, ge=0, description=(
        "control API: seconds between compactions of new feature batches and predictions into the "
        "columnar store that /query reads (0 = off)"))
    # -- Kafka client security (streaming/kafka_security.py) --
    kafka_security_protocol: str = Field("PLAINTEXT", description=(
        "PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL"))
    kafka_sasl_mechanism: str = Field("SCRAM-SHA-512", description=(
        "PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 (SASL protocols only)"))
    kafka_sasl_username: str = Field("", description=("SASL user"))
    kafka_sasl_password: str = Field("", repr=False, description=(  # a secret: never in a repr or a log line
        "SASL password (env or config file only)"))
    kafka_ssl_cafile: Path | None = Field(None, description=("CA bundle that signs the brokers' certificates"))
    # -- event-time policy (streaming/eventtime.py, docs/EVENT_TIME.md) --
    event_max_age: str = Field("20y", description=(
        "live sources reject event times older than this (90s, 15m, 12h, 30d, 52w, 20y; none: back to 1678)"))
    backfill: bool = Field(False, description=(
        "publish history on purpose: any event time from 1678 on is accepted and every record is marked as "
        "one backfill run, so the featurizers' live lateness rules do not apply"))
    max_future_skew_s: float = Field(300.0, ge=0, allow_inf_nan=False, description=(
        "every entry and featurizer rejects event times more than this many seconds ahead of now"))
    timestamp_unit: str = Field("auto", description=(
        "unit of numeric timestamps of files and stdin: s|ms|us|ns|iso|auto; auto decides once per input from "
        "its first values and rejects rows that disagree (ISO 8601 text is always read as such)"))
    timestamp_timezone: str = Field("", description=(
        "IANA time zone (UTC, Europe/Berlin) of ISO 8601 timestamps written without an offset ('2024-01-01 "
        "00:04:00', as spreadsheets and loggers export them), for files, stdin, logs and the gateway; empty: "
        "such timestamps are refused with their reason, since which zone they meant cannot be known"))
    ingest_timestamp_unit: str = Field("ms", description=(
        "unit of numeric timestamps posted to the HTTP ingest gateway: s|ms|us|ns|iso (ISO 8601 text is always "
        "accepted)"))
    max_record_bytes: int = Field(1_000_000, ge=64 * 1024, description=(
        "broker record limit assumed when the broker does not report max.message.bytes; answers and "
        "dead letters are cut to fit it less a margin"))
    reply_topics: str = Field("{predictions}.*", description=(
        "comma-separated fnmatch patterns of topics a prediction request may name as reply_topic, besides "
        "the model's predictions topic ({predictions} = that topic, {model} = the model name)"))
    broker_loss_window_s: float = Field(5.0, ge=0, allow_inf_nan=False, description=(
        "publishers keep acked records this long (and re-send them if the broker lost them); 0 disables"))
    # -- feature-store growth (streaming/store_index.py, streaming/retention.py, docs/STORE.md) --
    store_retention_days: float = Field(0.0, ge=0, description=(
        "`store gc` deletes batches older than this many days (0 = no age limit); lineage batches stay"))
    store_max_bytes: int = Field(0, ge=0, description=(
        "`store gc` deletes the oldest batches above this many bytes per kind (0 = no size limit)"))
    store_state_inline_max_bytes: int = Field(4096, ge=0, description=(
        "featurizer state above this size goes to a <batch>.state.json file, not the manifest"))
    # -- distributed training (trainer/distributed.py, docs/DISTRIBUTED.md) --
    distributed_timeout_s: float = Field(300.0, gt=0, description=(
        "`train --distributed`: longest wait in seconds for the other workers to join and for any one "
        "collective step"))
    # -- scale-out (streaming/topics.py, streamlearn/scaling.py, docs/SCALING.md) --
    replication_factor: int = Field(0, ge=0, description=(
        "replicas of every created topic (0 = auto: 1 on a one-broker cluster such as the embedded one, else 3 "
        "capped at the brokers listed)"))
    min_insync_replicas: int = Field(0, ge=0, description=(
        "min.insync.replicas of every created topic (0 = auto: replication factor - 1, at least 1)"))
    columnar_dir: Path | None = Field(None, description=(
        "directory of the columnar (Parquet) copy of feature batches and predictions that queries read "
        "(default HOME/columnar, HOME/tenants/<tenant>/columnar for a tenant; docs/COLUMNAR.md)"))
    query_max_rows: int = Field(10_000, ge=1, description=(
        "queries: most rows one page may return (a larger limit is refused with 413)"))
    query_max_scan_rows: int = Field(5_000_000, ge=1, description=(
        "queries: most Parquet rows one request may scan after pruning (narrow the time range beyond it)"))
    query_max_bytes: int = Field(64 * 1024 * 1024, ge=1, description=(
        "queries: most bytes of Arrow data one page may hold (ask for fewer rows beyond it)"))
    query_timeout_s: float = Field(10.0, gt=0, description=(
        "queries: seconds one request may spend reading before it is refused"))
    workers: str = Field("", description=(
        "`streamlearn up`: processes per consumer group, e.g. stream.sensor=3,serve.digits_cnn=2 (default 1 each)"))
    # Not a setting of its own: the [models] table of a trusted config file (never from the environment).
    model_specs: dict[str, str] = Field(default_factory=dict, description=(
        "model plugins, name = 'module:attribute' (the [models] table of the config file)"))

    _SECRETS: ClassVar[frozenset[str]] = frozenset({"ingest_tokens", "keys", "kafka_sasl_password"})

    @model_validator(mode="before")
    @classmethod
    def _paths_under_home(cls, data: Any) -> Any:
        """``home`` is absolute; the feature store and model directory default to directories under it:
        ``HOME/features`` and ``HOME/models``, or ``HOME/tenants/<tenant>/...`` for a tenant's process.

        Why per tenant: a tenant's stream worker used to write into the platform's store, where the
        default tenant's trainer lists batches by kind and would train on them; the control API's jobs
        for a tenant already used ``HOME/tenants/<tenant>`` (streamlearn/api/requests.py), as does the
        columnar copy. (The tenant id is validated after this; an invalid one fails the settings.)"""
        if not isinstance(data, dict):
            return data
        home = Path(data.get("home") or ".streamlearn").expanduser().absolute()
        base = _store_base(home, data.get("tenant"))
        return {**data, "home": home,
                "feature_store": _location(data.get("feature_store"), base / "features"),
                "model_dir": _location(data.get("model_dir"), base / "models")}

    @field_validator("*", mode="before")
    @classmethod
    def _empty_means_unset(cls, value: Any, info: Any) -> Any:
        """An empty string (a flag or a config value left blank) means "not set": the default applies."""
        if value != "" or not isinstance(value, str):
            return value
        return cls.model_fields[info.field_name].default

    @field_validator("tenant")
    @classmethod
    def _tenant_id(cls, value: str) -> str:
        if value and (problem := tenant_problem(value)) is not None:
            raise ValueError(f"must be a tenant id, the same as in a key's tenant field: {value!r} {problem}")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        """``--log-level BOGUS`` was INFO in silence."""
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {'|'.join(LOG_LEVELS)}")
        return value.upper()

    @field_validator("topic_prefix")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        """Every topic name starts with it, and Kafka allows only these characters in one (``a/b`` was
        taken, then every topic was refused by a real broker)."""
        if not TOPIC_PREFIX_RE.match(value):
            raise ValueError("must be up to 100 of the characters Kafka allows in a topic name: A-Z a-z 0-9 . _ -")
        return value

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, value: str | None) -> str | None:
        """``host:port[,host:port...]``; ``::::`` was a ValueError traceback inside kafka-python."""
        if value is None:
            return None
        for entry in value.split(","):
            host, colon, port = entry.strip().rpartition(":")
            if not entry.strip() or (colon and (not host or not port.isdigit() or not 0 < int(port) < 65_536)):
                raise ValueError("must be host:port entries separated by commas, e.g. localhost:9092,kafka-2:9092")
        return value

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
        """A copy with ``changes`` applied and validated again (never reads the environment)."""
        unknown = set(changes) - set(type(self).model_fields)
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}; known: {sorted(type(self).model_fields)}")
        data = {**self.model_dump(), **changes}
        if "tenant" in changes:  # a store left at the old tenant's default follows the new tenant's default
            for name, leaf in (("feature_store", "features"), ("model_dir", "models")):
                if name not in changes and getattr(self, name) == _store_base(self.home, self.tenant) / leaf:
                    data[name] = None
        try:  # model_validate runs the validators but no settings source: the environment is not read again
            return type(self).model_validate(data)
        except ValidationError as exc:
            raise _config_error(exc) from None


def _store_base(home: Path, tenant: Any) -> Path:
    """Where the default feature store and model directory live: HOME, or HOME/tenants/<tenant>."""
    return home / "tenants" / tenant if isinstance(tenant, str) and tenant else home


class _Environment(EnvSettingsSource):
    """pydantic-settings' env source over a given mapping (``load(environ=...)``; ``os.environ`` by default)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items() if v != ""}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if field_name in _NOT_FROM_ENV:
            return None, field_name, False
        return super().get_field_value(field, field_name)


#: A model's name: also its registry directory and part of its topic names, so nothing that could escape.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class _ConfigFile(TomlConfigSettingsSource):
    """The first config file found, read by pydantic-settings' TOML source.

    Its ``[models]`` table (import targets that get called) is honoured only from
    ``$STREAMLEARN_CONFIG`` (``--config``) or ``$STREAMLEARN_HOME/config.toml``, never from a
    ``./streamlearn.toml`` that happens to sit in the working directory (a cloned repo).
    """

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None, trusted: bool) -> None:
        self.path, self.trusted = path, trusted
        self.models: dict[str, str] = {}
        super().__init__(settings_cls, toml_file=path)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        data = dict(super()._read_file(file_path))
        known = set(Settings.model_fields) - _NOT_FROM_ENV
        unknown = set(data) - known - {"models"}
        if unknown:
            raise ConfigError(f"{file_path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        models = data.pop("models", {})
        if not isinstance(models, dict):
            raise ConfigError(f"{file_path}: [models] must be a table of name = 'module:attribute'")
        if models and not self.trusted:
            logging.getLogger(__name__).warning(
                "%s: [models] ignored: model plugins load only from the file named by STREAMLEARN_CONFIG "
                "(--config), $STREAMLEARN_HOME/config.toml or installed entry points", file_path)
            models = {}
        odd = sorted(str(k) for k, v in models.items() if not isinstance(v, str))
        if odd:  # `x = { a = 1 }` became the text "{'a': 1}", an error only when the model was used
            raise ConfigError(f"{file_path}: [models] {odd}: each entry is name = 'module:attribute' (a string)")
        bad = sorted(str(k) for k in models if not MODEL_NAME_RE.match(str(k)))
        if bad:  # it broke `models list` (and every command that lists models) with an error naming no file
            raise ConfigError(f"{file_path}: [models] {bad}: not a valid model name; use letters, digits, '_', "
                              "'-', '.' (starting with a letter or digit, at most 128)")
        self.models = {str(k): str(v) for k, v in models.items()}
        return data


def _config_file(environ: Mapping[str, str], home: Path) -> tuple[Path | None, bool]:
    """The config file to read (the first that exists) and whether its ``[models]`` are trusted."""
    named = environ.get("STREAMLEARN_CONFIG")
    if named and not Path(named).is_file():  # a file the user named: its settings must not be skipped in silence
        raise ConfigError(f"config file {named} (--config / STREAMLEARN_CONFIG): not a readable file; fix the "
                          "path or drop the flag")
    candidates = [Path(named)] if named else []
    candidates += [home / "config.toml", Path("streamlearn.toml")]
    for n, path in enumerate(candidates):
        if path.is_file():
            return path, n < len(candidates) - 1
    return None, False


def env_name(name: str) -> str:
    """The environment variable of setting ``name``."""
    return f"{ENV_PREFIX}{name.upper()}"


def _what(name: str, value: Any) -> str:
    return "(hidden)" if name in Settings._SECRETS else repr(value)


def _build(sources: tuple[PydanticBaseSettingsSource, ...], config_file: Path | None = None) -> Settings:
    """Run pydantic-settings over ``sources`` (highest first); its ValidationError becomes a ConfigError."""
    try:
        return Settings(_build_sources=(sources, {}))  # type: ignore[call-arg]  # pydantic-settings keyword
    except ValidationError as exc:
        raise _config_error(exc, config_file) from None


def _config_error(exc: ValidationError, config_file: Path | None = None) -> ConfigError:
    """One message per bad value, naming the setting and its env var and saying where to fix it."""
    problems = []
    in_file = f" or {config_file}" if config_file else " or the config file"
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else "?"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown setting {name!r}; known: {[s.name for s in SPECS]}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"setting {name!r} (env {env_name(name)}): {msg[:1].lower()}{msg[1:]}, got "
                        f"{_what(name, err.get('input'))}; fix the flag, {env_name(name)}{in_file}")
    return ConfigError("; ".join(problems))


def load(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Resolve every setting. ``overrides`` (e.g. CLI flags) win; None values are ignored."""
    env = os.environ if environ is None else environ
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    known = set(Settings.model_fields) - _NOT_FROM_ENV
    unknown = set(overrides) - known
    if unknown:
        raise ConfigError(f"unknown settings {sorted(unknown)}")
    # HOME decides where the config file is, so it comes from a flag, the env or the default (never the file).
    home = Path(overrides.get("home") or env.get(env_name("home")) or ".streamlearn").expanduser().absolute()
    path, trusted = _config_file(env, home)
    try:
        filecfg = _ConfigFile(Settings, path, trusted)
    except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"config file {path}: {exc}; fix or remove it") from exc
    except RecursionError:  # a value nested thousands deep: tomllib recurses (was a traceback in every command)
        raise ConfigError(f"config file {path}: values nested too deeply to read; a config file holds "
                          "settings and a [models] table of name = 'module:attribute'") from None
    init = InitSettingsSource(Settings, {**overrides, "home": home, "model_specs": filecfg.models})
    return _build((init, _Environment(Settings, env), filecfg), path)


def _base_type(annotation: Any) -> type:
    """``str | None`` -> ``str``: the type a value of the setting has when it is set."""
    if get_origin(annotation) in (Union, UnionType):
        return next(a for a in get_args(annotation) if a is not type(None))
    return annotation


@dataclass(frozen=True)
class Spec:
    """One setting as a row (name, env var, type, default, doc), derived from the :class:`Settings` fields."""

    name: str
    env: str
    type: type
    default: Any
    help: str


#: Every setting, in declaration order (README tables, ``--help`` epilogs, docker-compose checks).
SPECS: tuple[Spec, ...] = tuple(
    Spec(name, env_name(name), _base_type(f.annotation), f.default, f.description or "")
    for name, f in Settings.model_fields.items() if name not in _NOT_FROM_ENV)
_BY_NAME = {s.name: s for s in SPECS}


def env_help(name: str) -> str:
    """Which environment variable a setting falls back to and its default: ``(env X; default D)``."""
    spec = _BY_NAME[name]
    default = spec.default if spec.default is not None else "unset"
    return f"(env {spec.env}; default {default if default != '' else 'empty'})"


def flag_help(name: str, note: str | None = None) -> str:
    """The ``--help`` text of a flag that sets ``name``: the field's doc, ``note`` (what the flag itself
    adds, e.g. an inverted sense), then its env var and default. The doc lives only on the field."""
    spec = _BY_NAME[name]
    text = f"{spec.help}; {note}" if note else spec.help
    return f"{text} {env_help(name)}".replace("%", "%%")  # argparse formats help with %


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


def child_env(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process that sees exactly ``settings``.

    The parent's variables minus its ``STREAMLEARN_*`` ones (a setting unset in ``settings`` must not
    leak through from the parent), plus :func:`to_env`. ``STREAMLEARN_CONFIG`` stays: it names the file
    whose ``[models]`` the child must load too. Used by the control API's jobs (streamlearn/api/jobs.py).
    """
    env = os.environ if environ is None else environ
    out = {k: v for k, v in env.items() if not k.startswith(ENV_PREFIX) or k == f"{ENV_PREFIX}CONFIG"}
    out.update(to_env(settings))
    return out
