"""The shared key mechanism, the HTTP guards, schema limits and client security settings (no broker).

Issue 12 items 0, 2, 4, 5: one key module for every server (digests, constant time, scopes,
tenants), JSON refused by shape before it is built, registry schemas bounded, loopback binds,
Kafka clients that build SASL/SSL configs from settings.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from schemas.access import KeyTable, Principal, bind_host, load_keys, tenant_prefix
from schemas.exceptions import AccessDeniedError, ConfigError, InvalidSchemaError, UnauthenticatedError
from schemas.http_client import HttpRegistryClient
from schemas.httpguard import GuardError, RateBuckets, check_json_shape, loads_guarded, scan_json
from schemas.schema_limits import SchemaLimits, check_schema
from streaming import config
from streaming.kafka_security import kafka_security

SECRET = "s3cret-token-abcdef"


def test_entries_carry_scopes_and_tenants_and_the_repr_never_shows_tokens() -> None:
    table = KeyTable(f"ops:{SECRET}, ing:ingtoken:ingest.weblog, acme:acmetoken:predict+schema-read:acme")
    ops = table.authenticate(f"Bearer {SECRET}")
    assert ops == Principal("ops", frozenset({"*"}), "") and ops.allows("schema-admin")
    ing = table.authenticate("Bearer ingtoken")
    assert ing.allows("ingest.weblog") and not ing.allows("ingest.sensor") and not ing.allows("predict")
    acme = table.authenticate("bearer acmetoken")
    assert acme.tenant == "acme" and acme.prefix == "acme." and acme.allows("schema-read")
    assert not acme.allows("schema-admin")
    assert table.tenants == {"acme"}
    for text in (repr(table), repr(ops), repr(acme), str(table.names)):
        assert SECRET not in text and "acmetoken" not in text


def test_wider_scopes_imply_narrower_ones() -> None:
    p = KeyTable("a:t1:ingest+schema-admin").authenticate("Bearer t1")
    assert all(p.allows(s) for s in ("ingest.weblog", "ingest.sensor", "ingest.image", "schema-read"))
    assert not p.allows("predict")


@pytest.mark.parametrize("header", [None, "", "Bearer", "Token x", "Bearer a b"])
def test_missing_or_malformed_header_is_401(header: str | None) -> None:
    with pytest.raises(UnauthenticatedError) as info:
        KeyTable(f"a:{SECRET}").authenticate(header)
    assert info.value.status == 401 and "STREAMLEARN_KEYS" in info.value.message


def test_unknown_key_is_403_without_echo() -> None:
    with pytest.raises(AccessDeniedError) as info:
        KeyTable(f"a:{SECRET}").authenticate("Bearer wrong-key-xyz")
    assert info.value.status == 403 and "wrong-key-xyz" not in str(info.value)


def test_basic_credentials_only_where_allowed_and_name_must_match() -> None:
    table = KeyTable(f"reg:{SECRET}:schema-admin")
    basic = "Basic " + base64.b64encode(f"reg:{SECRET}".encode()).decode()
    assert table.authenticate(basic, allow_basic=True).name == "reg"
    with pytest.raises(UnauthenticatedError):
        table.authenticate(basic)
    wrong_name = "Basic " + base64.b64encode(f"other:{SECRET}".encode()).decode()
    with pytest.raises(AccessDeniedError):
        table.authenticate(wrong_name, allow_basic=True)


@pytest.mark.parametrize("spec, word", [
    ("a:tok:fly", "scopes"), ("a:tok:*:Acme", "tenant"), ("a:tok,a:tok2", "twice"), ("a:tok,b:tok", "same token"),
    ("a:tok:*:t:x", "4"), ("bad name:tok", "name"), ("a:has space", "token"),
])
def test_bad_key_configuration_names_the_setting_never_the_token(spec: str, word: str) -> None:
    with pytest.raises(ConfigError) as info:
        KeyTable(spec)
    assert "STREAMLEARN_KEYS" in str(info.value) and word in str(info.value)
    assert "tok2" not in str(info.value) and "has space" not in str(info.value)


def test_key_file_adds_entries_with_comments(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# operators\nops:{SECRET}\n\nacme:acmetoken:predict:acme  # tenant acme\n")
    table = load_keys("cli:clitoken:ingest", path)
    assert sorted(table.names) == ["acme", "cli", "ops"]
    assert table.authenticate("Bearer acmetoken").tenant == "acme"
    with pytest.raises(ConfigError, match="STREAMLEARN_KEYS_FILE"):
        load_keys("", tmp_path / "missing")


def test_tenants_own_their_prefix_and_the_default_tenant_owns_the_rest() -> None:
    table = KeyTable("ops:t0, a:t1:*:acme, g:t2:*:globex")
    ops, acme, globex = (table.authenticate(f"Bearer t{i}") for i in range(3))
    assert table.owns(acme, "acme.churn") and not table.owns(acme, "globex.churn")
    assert not table.owns(acme, "acme.") and not table.owns(acme, "weblog_classifier")
    assert table.owns(ops, "weblog_classifier") and not table.owns(ops, "acme.churn")
    with pytest.raises(AccessDeniedError, match="acme"):
        table.require(acme, "predict", "globex.churn")
    assert tenant_prefix("") == "" and tenant_prefix("acme") == "acme."
    operator = KeyTable("root:t9:schema-admin:*, a:t1:*:acme").authenticate("Bearer t9")
    assert operator.tenant == "" and operator.all_tenants and operator.prefix == ""
    assert table.owns(operator, "acme.churn") and table.owns(operator, "weblog_classifier")
    assert table.tenant_label(ops) == "default" and table.tenant_label(acme) == "acme"


def test_without_a_key_servers_bind_loopback_and_say_so() -> None:
    host, warning = bind_host("0.0.0.0", KeyTable(), "schema registry", "--host")
    assert host == "127.0.0.1" and warning is not None and "STREAMLEARN_KEYS" in warning
    assert bind_host("0.0.0.0", KeyTable("a:t"), "x", "--host") == ("0.0.0.0", None)
    assert bind_host("127.0.0.1", KeyTable(), "x", "--host") == ("127.0.0.1", None)


def test_settings_defaults_bind_loopback_and_hide_secrets() -> None:
    s = config.load(environ={"STREAMLEARN_KEYS": f"a:{SECRET}", "STREAMLEARN_KAFKA_SASL_PASSWORD": "pw-secret"})
    assert s.metrics_host == s.registry_host == s.ingest_host == s.serve_http_host == "127.0.0.1"
    assert SECRET not in repr(s) and "pw-secret" not in repr(s)
    import inspect

    from streaming.metrics import start_metrics_server
    assert inspect.signature(start_metrics_server).parameters["addr"].default == "127.0.0.1"


# -- JSON shape ------------------------------------------------------------------------------------
def test_scan_json_counts_without_parsing_and_ignores_brackets_in_strings() -> None:
    assert scan_json(b'[{"a": "]]]\\"[[["}, [1, [2]], 3]') == scan_json(b'[{"a": ""}, [1, [2]], 3]')
    shape = scan_json(b'[{"a": "]]]\\"[[["}, [1, [2]], 3]')
    assert (shape.depth, shape.containers, shape.top_level) == (3, 4, 3)
    assert scan_json(b"[]").top_level == 0 and scan_json(b'{"a": 1}').top_level == 1


def test_deep_and_wide_bodies_are_refused_before_they_are_built() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(GuardError) as info:
        loads_guarded(deep, max_depth=32, max_containers=10_000)
    assert info.value.status == 400 and "nested" in info.value.message
    wide = b"[" + b",".join([b"[]"] * 1_000_000) + b"]"
    started = time.perf_counter()
    with pytest.raises(GuardError) as info:
        check_json_shape(wide, max_depth=32, max_containers=10_000)
    assert info.value.status == 413
    assert time.perf_counter() - started < 30  # generous: the scan is vectorized, not per element
    with pytest.raises(GuardError, match="finite"):
        loads_guarded(b"[NaN]", max_depth=4, max_containers=4)


def test_rate_buckets_charge_per_key_and_answer_429_with_retry_after() -> None:
    now = [0.0]
    buckets = RateBuckets(10, 10, clock=lambda: now[0])
    buckets.take("acme", 10)
    with pytest.raises(GuardError) as info:
        buckets.take("acme", 1)
    assert info.value.status == 429 and info.value.retry_after == 1
    buckets.take("globex", 10)  # another tenant's bucket is its own
    now[0] += 1.0
    buckets.take("acme", 10)


# -- registry schemas ------------------------------------------------------------------------------
def _record(fields: list[dict[str, object]], name: str = "R") -> str:
    return json.dumps({"type": "record", "name": name, "fields": fields})


@pytest.mark.parametrize("schema, word", [
    (_record([{"name": "a b", "type": "int"}]), "field name"),
    (_record([{"name": "a", "type": "int"}], name="bad-name"), "name"),
    (json.dumps({"type": "enum", "name": "E", "symbols": ["ok", "not ok"]}), "symbol"),
    (_record([{"name": f"f{i}", "type": "int"} for i in range(6000)]), "more than"),
    ("[" * 5000 + '"int"' + "]" * 5000, "levels deep"),
    ('"x' + "a" * 300_000 + '"', "bytes"),
    # Avro the registry took (200) and then failed on: a 500 reading it back (NaN), raw errors encoding
    (json.dumps({"type": "fixed", "name": "F", "size": "abc"}), "fixed size 'abc' must be an integer"),
    (json.dumps({"type": "fixed", "name": "F", "size": -1}), "fixed size"),
    (_record([{"name": "a", "type": []}]), "at least one branch"),
    (_record([{"name": "a", "type": ["int", "int"]}]), "the union holds 'int' twice"),
    (_record([{"name": "a", "type": [["int"], "null"]}]), "may not hold a union"),
    (_record([{"name": "a", "type": "int"}, {"name": "a", "type": "long"}]), "field 'a' is declared twice"),
    (_record([{"name": "a", "type": "long", "default": 10**40}]), "does not fit an Avro long"),
    ('{"type": "record", "name": "R", "fields": [{"name": "a", "type": "double", "default": NaN}]}', "not JSON"),
], ids=["field_name", "record_name", "enum_symbol", "too_many", "too_deep", "too_big", "fixed_text", "fixed_negative",
        "empty_union", "twice_in_union", "union_in_union", "field_twice", "default_range", "nan_default"])
def test_schema_limits_and_avro_names(schema: str, word: str) -> None:
    with pytest.raises(InvalidSchemaError, match=word):
        check_schema(schema, SchemaLimits())


def test_a_valid_schema_passes_the_limits() -> None:
    from schemas.catalog import SCHEMA_NAMES, load_schema

    for name in SCHEMA_NAMES:
        check_schema(json.dumps(load_schema(name)))


# -- clients ---------------------------------------------------------------------------------------
def test_registry_client_sends_the_urls_key_and_never_shows_it() -> None:
    client = HttpRegistryClient(f"http://platform:{SECRET}@registry.invalid:8081")
    assert client.url == "http://registry.invalid:8081"
    assert client._authorization == "Basic " + base64.b64encode(f"platform:{SECRET}".encode()).decode()
    assert SECRET not in repr(vars(client).get("url"))


def _settings(**env: str) -> config.Settings:
    return config.load(environ={f"STREAMLEARN_{k.upper()}": v for k, v in env.items()})


def test_kafka_clients_build_sasl_and_ssl_settings(tmp_path: Path) -> None:
    from streaming.consumer import consumer_config
    from streaming.producer import producer_config

    assert kafka_security(_settings()) == {}
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    s = _settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                  kafka_sasl_username="streamlearn", kafka_sasl_password="pw", kafka_ssl_cafile=str(ca))
    want = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "streamlearn",
            "sasl_plain_password": "pw", "ssl_cafile": str(ca), "ssl_check_hostname": True}
    assert kafka_security(s) == want
    for cfg in (producer_config(s), consumer_config(s, group_id="g")):
        assert {k: cfg[k] for k in want} == want
    plain = _settings(kafka_security_protocol="sasl_plaintext", kafka_sasl_username="u", kafka_sasl_password="p")
    assert kafka_security(plain)["security_protocol"] == "SASL_PLAINTEXT" and "ssl_cafile" not in kafka_security(plain)


@pytest.mark.parametrize("env, word", [
    ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol"),
    ({"kafka_security_protocol": "SASL_SSL"}, "kafka_sasl_username"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "GSSAPI", "kafka_sasl_username": "u",
      "kafka_sasl_password": "p"}, "kafka_sasl_mechanism"),
    ({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/nonexistent/ca.pem"}, "kafka_ssl_cafile"),
])
def test_bad_kafka_security_settings_name_the_setting(env: dict[str, str], word: str) -> None:
    with pytest.raises(ConfigError, match=word) as info:
        kafka_security(_settings(**env))
    assert "pw" not in str(info.value)


def _subparser(parser: object, *path: str) -> object:
    import argparse

    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # type: ignore[attr-defined]
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("path", [("ingest", "serve"), ("serve",), ("registry", "serve")])
def test_every_servers_help_names_its_key_setting(path: tuple[str, ...]) -> None:
    from streamlearn.cli import build_parser

    text = " ".join(_subparser(build_parser(), *path).format_help().split())  # type: ignore[attr-defined]
    assert "STREAMLEARN_KEYS" in text and "STREAMLEARN_KEYS_FILE" in text, text
    assert "--key" not in text and "--token" not in text  # never on argv


def test_a_refused_registry_key_is_retryable_not_a_bad_record(tmp_path: Path) -> None:
    from schemas.exceptions import RegistryUnavailableError
    from schemas.registry import FileRegistry
    from schemas.server import start_in_thread

    keys = KeyTable(f"admin:{SECRET}:schema-admin, ro:rotoken:schema-read")
    server = start_in_thread(FileRegistry(tmp_path), keys=keys)
    try:
        host = server.url.split("//", 1)[1]
        schema = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}]}
        for url in (server.url, f"http://ro:rotoken@{host}", f"http://admin:wrong-key@{host}"):
            with pytest.raises(RegistryUnavailableError) as info:  # retried by callers, never dead-lettered
                HttpRegistryClient(url).register("s-value", schema)
            assert "wrong-key" not in str(info.value) and "rotoken" not in str(info.value)
        assert HttpRegistryClient(f"http://admin:{SECRET}@{host}").register("s-value", schema) == 1
        assert HttpRegistryClient(server.url).get_schema(1)  # reads open by default
    finally:
        server.stop()
