"""Settings on pydantic-settings (issue 15, step 3): precedence, ConfigError naming the variable,
``--help`` texts taken from the field docs, and the one place that reads the environment.

No broker, no TensorFlow: every test here parses, validates or formats help text.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from schemas.exceptions import ConfigError, StreamlearnError
from streaming import config
from streamlearn.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _help_of(parser: argparse.ArgumentParser, flag: str) -> str:
    action = next(a for a in parser._actions if flag in a.option_strings)
    return str(action.help)


def _flat(text: str) -> str:
    return " ".join(text.split())


# -- precedence: flag > env > config file > default ---------------------------------------------------
def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("partitions = 5\nbatch_max_records = 77\nlog_level = 'DEBUG'\n")
    env = {"STREAMLEARN_PARTITIONS": "6", "STREAMLEARN_BATCH_MAX_SECONDS": "2.5"}
    s = config.load({"home": home, "partitions": 7}, environ=env)
    assert s.partitions == 7  # flag beats env and file
    s = config.load({"home": home}, environ=env)
    assert s.partitions == 6 and s.batch_max_seconds == 2.5  # env beats file
    assert s.batch_max_records == 77 and s.log_level == "DEBUG"  # file beats default
    assert s.retrain_every_batches == 4  # default
    assert s.feature_store == home.absolute() / "features" and s.model_dir == home.absolute() / "models"
    # An empty variable is unset (the file's value applies), as before the move to pydantic-settings.
    assert config.load({"home": home}, environ={"STREAMLEARN_PARTITIONS": ""}).partitions == 5


def test_a_tenant_process_defaults_to_its_tenant_stores(tmp_path: Path) -> None:
    """A tenant's stream worker wrote into the platform store, where the default tenant's trainer lists
    batches by kind; the API's jobs for the tenant used HOME/tenants/<t>, so the two never met either."""
    home = tmp_path / "home"
    s = config.load({"home": home}, environ={"STREAMLEARN_TENANT": "acme"})
    assert s.feature_store == home / "tenants" / "acme" / "features"
    assert s.model_dir == home / "tenants" / "acme" / "models"
    from streamlearn.api.requests import tenant_settings

    api = tenant_settings(config.load({"home": home}, environ={}), "acme")
    assert (api.feature_store, api.model_dir) == (s.feature_store, s.model_dir)
    explicit = config.load({"home": home, "feature_store": tmp_path / "fs"}, environ={"STREAMLEARN_TENANT": "acme"})
    assert explicit.feature_store == tmp_path / "fs" and explicit.model_dir == s.model_dir
    plain = config.load({"home": home}, environ={})
    assert (plain.feature_store, plain.model_dir) == (home / "features", home / "models")
    # with_(tenant=...) is the same process as one started with STREAMLEARN_TENANT; explicit stores stay
    moved = plain.with_(tenant="acme")
    assert (moved.feature_store, moved.model_dir) == (s.feature_store, s.model_dir)
    assert explicit.with_(tenant="globex").feature_store == tmp_path / "fs"
    assert moved.with_(tenant="").feature_store == home / "features"


def test_home_from_env_finds_its_config_file_and_explicit_file_wins(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    (home / "config.toml").write_text("partitions = 4\n")
    assert config.load(environ={"STREAMLEARN_HOME": str(home)}).partitions == 4
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("partitions = 9\n")
    s = config.load(environ={"STREAMLEARN_HOME": str(home), "STREAMLEARN_CONFIG": str(explicit)})
    assert s.partitions == 9


# -- errors: ConfigError (our root class), naming the variable and saying what to do -------------------
@pytest.mark.parametrize(("var", "value", "words"), [
    ("STREAMLEARN_PARTITIONS", "three", "valid integer"),
    ("STREAMLEARN_PARTITIONS", "0", "greater than or equal to 1"),
    ("STREAMLEARN_TRANSACTIONS", "maybe", "valid boolean"),
    ("STREAMLEARN_BATCH_MAX_SECONDS", "soon", "valid number"),
    ("STREAMLEARN_STORE_MAX_BYTES", "-1", "greater than or equal to 0"),
    ("STREAMLEARN_TENANT", "Acme Corp", "tenant id"),
    # Accepted in silence before (an exploratory run): each was a traceback, a hang or a wrong run later.
    ("STREAMLEARN_BATCH_MAX_RECORDS", "0", "greater than or equal to 1"),
    ("STREAMLEARN_BATCH_MAX_SECONDS", "nan", "finite number"),
    ("STREAMLEARN_RETRAIN_EVERY_BATCHES", "0", "greater than or equal to 1"),  # retrained on nothing, on a loop
    ("STREAMLEARN_RETRAIN_EVERY_SECONDS", "-1", "greater than or equal to 0"),
    ("STREAMLEARN_API_PORT", "99999", "less than or equal to 65535"),  # an OverflowError traceback at bind
    ("STREAMLEARN_BROKER_PORT", "0", "greater than or equal to 1"),  # clients dialled 127.0.0.1:0
    ("STREAMLEARN_METRICS_PORT", "-2", "greater than or equal to -1"),
    ("STREAMLEARN_MAX_RECORD_BYTES", "1", "greater than or equal to 65536"),
    ("STREAMLEARN_LOG_LEVEL", "LOUD", "DEBUG|INFO|WARNING|ERROR|CRITICAL"),
    ("STREAMLEARN_TOPIC_PREFIX", "a/b", "characters Kafka allows in a topic name"),
    ("STREAMLEARN_KAFKA_BOOTSTRAP", "::::", "host:port entries"),  # a ValueError inside kafka-python
])
def test_a_bad_env_value_is_a_config_error_naming_the_variable(var: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(environ={var: value})
    text = str(info.value)
    assert isinstance(info.value, StreamlearnError)
    assert var in text and words in text and repr(value) in text and "fix the flag" in text
    assert "pydantic" not in text.lower() and "validation error" not in text.lower()


def test_a_bad_secret_is_named_but_not_echoed() -> None:
    s = config.load(environ={"STREAMLEARN_KAFKA_SASL_PASSWORD": "pw-secret", "STREAMLEARN_KEYS": "a:tok-secret"})
    assert "secret" not in repr(s) and s.kafka_sasl_password == "pw-secret"
    with pytest.raises(ConfigError, match="STREAMLEARN_KEYS") as info:
        s.with_(keys=["name:tok-987654321"])  # not a string: the message names the setting, not the value
    assert "987654321" not in str(info.value) and "(hidden)" in str(info.value)


def test_bad_config_file_values_and_unknown_keys_are_config_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("partitions = 'many'\n")
    with pytest.raises(ConfigError, match=rf"STREAMLEARN_PARTITIONS.*{re.escape(str(cfg))}"):
        config.load(environ={"STREAMLEARN_CONFIG": str(cfg)})
    cfg.write_text("partitionz = 3\n")
    with pytest.raises(ConfigError, match=r"unknown settings \['partitionz'\]"):
        config.load(environ={"STREAMLEARN_CONFIG": str(cfg)})
    cfg.write_text("partitions = [\n")
    with pytest.raises(ConfigError, match="fix or remove it"):
        config.load(environ={"STREAMLEARN_CONFIG": str(cfg)})
    with pytest.raises(ConfigError, match="unknown settings"):
        config.load({"no_such_setting": 1}, environ={})
    with pytest.raises(ConfigError, match=r"--config / STREAMLEARN_CONFIG\): not a readable file"):
        config.load(environ={"STREAMLEARN_CONFIG": str(tmp_path / "missing.toml")})  # was skipped in silence
    cfg.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")  # a RecursionError traceback in every command
    with pytest.raises(ConfigError, match="nested too deeply"):
        config.load(environ={"STREAMLEARN_CONFIG": str(cfg)})
    cfg.write_text("[models]\nx = { a = 1 }\ny = 5\n")  # was read as the text "{'a': 1}" and "5"
    with pytest.raises(ConfigError, match=r"\[models\] \['x', 'y'\]: each entry is name = 'module:attribute'"):
        config.load(environ={"STREAMLEARN_CONFIG": str(cfg)})
    target = '"trainer.specs.weblog:BOT_SPEC"'
    cfg.write_text(f'[models]\n"bad name!" = {target}\nok_name = {target}\n')
    # it broke `models list` for every model, with an error that named no file
    bad = rf"{re.escape(str(cfg))}: \[models\] \['bad name!'\]: not a valid model name"
    with pytest.raises(ConfigError, match=bad):
        config.load(environ={"STREAMLEARN_CONFIG": str(cfg)})


def test_with_validates_and_never_rereads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = config.load(environ={})
    monkeypatch.setenv("STREAMLEARN_PARTITIONS", "11")
    assert s.with_(topic_prefix="x.").partitions == 3
    with pytest.raises(ConfigError, match="STREAMLEARN_TENANT"):
        s.with_(tenant="Bad Tenant")
    with pytest.raises(ConfigError, match="unknown settings"):
        s.with_(partitionz=2)
    with pytest.raises(Exception):  # noqa: B017 - frozen: a worker's settings never change under it
        s.partitions = 5  # type: ignore[misc]


def test_to_env_round_trips_every_setting(tmp_path: Path) -> None:
    s = config.load({"home": tmp_path, "kafka_bootstrap": "k:9092", "tenant": "acme", "transactions": False,
                     "keys": "a:tok"}, environ={})
    again = config.load(environ=config.to_env(s))
    assert again == s.with_(model_specs={})
    assert config.to_env(s)["STREAMLEARN_TRANSACTIONS"] == "false"


# -- --help texts come from the field docs -------------------------------------------------------------
@pytest.mark.parametrize(("path", "flag", "setting"), [
    ((), "--home", "home"),
    ((), "--tenant", "tenant"),
    (("stream",), "--batch-max-seconds", "batch_max_seconds"),
    (("serve",), "--max-wait-ms", "serve_max_wait_ms"),
    (("serve",), "--at-least-once", "transactions"),
    (("train",), "--every-seconds", "retrain_every_seconds"),
    (("ingest", "serve"), "--rate", "ingest_rate"),
    (("store", "gc"), "--max-bytes", "store_max_bytes"),
])
def test_help_shows_the_field_doc_and_env_var(path: tuple[str, ...], flag: str, setting: str) -> None:
    parser = _subparser(build_parser(), *path)
    text = _flat(parser.format_help())
    doc = config.Settings.model_fields[setting].description
    assert doc and _flat(doc) in text, f"{flag}: the field doc of {setting!r} is not in --help"
    assert config.env_name(setting) in text
    assert _help_of(parser, flag).startswith(doc)


def test_every_flag_naming_an_env_var_uses_its_field_doc() -> None:
    """No hand-written twin of a field doc: a help text naming (env STREAMLEARN_X; ...) starts with X's doc."""
    seen = 0

    def walk(parser: argparse.ArgumentParser) -> None:
        nonlocal seen
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)
                continue
            m = re.search(r"\(env (STREAMLEARN_[A-Z0-9_]+); default", str(action.help or ""))
            if m and m.group(1) != "STREAMLEARN_CONFIG":
                name = m.group(1).removeprefix("STREAMLEARN_").lower()
                assert str(action.help).startswith(config.Settings.model_fields[name].description or "?"), action
                seen += 1

    walk(build_parser())
    assert seen >= 30


# -- one place reads the environment ---------------------------------------------------------------------
def test_only_config_reads_the_environment() -> None:
    """os.environ / getenv in the packages: config reads; the rest only set TF's own variables, export
    --config for child processes, or build a child's environment (streamlearn/stack.py)."""
    allowed = {
        "streaming/config.py",  # the one reader
        "streaming/logs.py",  # setdefault of TensorFlow's TF_CPP_MIN_LOG_LEVEL & co before TF is imported
        "trainer/training.py",  # the same, for the trainer's TF import
        "streamlearn/cli.py",  # exports --config as STREAMLEARN_CONFIG so started processes read the same file
        "streamlearn/stack.py",  # copies the parent's non-STREAMLEARN_ environment into a child's env
    }
    found = set()
    for pkg in ("schemas", "streaming", "ingest", "trainer", "serving", "streamlearn"):
        for path in (ROOT / pkg).rglob("*.py"):
            if re.search(r"os\.environ|getenv\(|from os import .*environ", path.read_text(encoding="utf-8")):
                found.add(path.relative_to(ROOT).as_posix())
    assert found <= allowed, f"read settings through streaming.config, not the environment: {sorted(found - allowed)}"
