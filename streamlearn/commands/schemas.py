"""`streamlearn schemas list|show|register|check|register-builtin` and `streamlearn registry serve`.

The registry used is the one configuration names (``open_registry(settings.registry_url,
settings.registry_dir)``): the machine-wide file store by default, or a Confluent-compatible
registry when ``--registry-url`` / STREAMLEARN_REGISTRY_URL is set. The topic-aware part (which
schema goes under which subject) lives here, because ``schemas`` must not import ``streaming``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from schemas import catalog
from schemas.exceptions import SchemaNotFoundError
from schemas.registry import SchemaRegistry, open_registry
from streaming import config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schemas", help="list, show, register and check Avro schemas in the registry")
    ss = p.add_subparsers(dest="schemas_cmd", metavar="ACTION")
    ss.required = True
    ls = ss.add_parser("list", help="subjects with their latest version and schema id")
    ls.add_argument("--builtin", action="store_true", help="list the built-in schema names instead")
    ls.set_defaults(func=_list)
    show = ss.add_parser("show", help="print one version of a subject's schema")
    show.add_argument("subject")
    show.add_argument("--version", default="latest", help="version number or 'latest' (default)")
    show.set_defaults(func=_show)
    reg = ss.add_parser("register", help="register a schema under a subject; prints its id")
    reg.add_argument("subject")
    reg.add_argument("schema", help="an .avsc file, or a built-in name: " + ", ".join(catalog.SCHEMA_NAMES))
    reg.set_defaults(func=_register)
    chk = ss.add_parser("check", help="test a schema against the subject's compatibility level (exit 1 if not)")
    chk.add_argument("subject")
    chk.add_argument("schema", help="an .avsc file or a built-in name")
    chk.add_argument("--version", default="latest", help="version to check against (default latest)")
    chk.set_defaults(func=_check)
    builtin = ss.add_parser("register-builtin",
                            help="register each built-in schema under the <topic>-value subject of its topics")
    builtin.set_defaults(func=_register_builtin)

    r = sub.add_parser("registry", help="run the Confluent-compatible schema registry REST server")
    rs = r.add_subparsers(dest="registry_cmd", metavar="ACTION")
    rs.required = True
    serve = rs.add_parser("serve", help="serve the file registry over the Confluent REST API",
                          description="Keys come from env STREAMLEARN_KEYS or the file named by STREAMLEARN_KEYS_FILE "
                                      "(name:token[:scopes[:tenant]]; writes need schema-admin, reads schema-read "
                                      "unless STREAMLEARN_REGISTRY_READ_OPEN is true), never from the command "
                                      "line. Without a key the server binds 127.0.0.1 only.")
    serve.add_argument("--host", dest="registry_host", default=None,
                       help=config.flag_help("registry_host"))
    serve.add_argument("--port", dest="registry_port", type=int,
                       help=config.flag_help("registry_port"))
    serve.set_defaults(func=_serve)


def registry_for(settings: config.Settings) -> SchemaRegistry:
    """The registry configuration names (HTTP client when registry_url is set, else the file store)."""
    return open_registry(settings.registry_url, settings.registry_dir)


def read_schema_arg(value: str) -> dict[str, Any]:
    """A built-in schema name or a path to an .avsc file -> schema JSON."""
    if value in catalog.SCHEMA_NAMES:
        return catalog.load_schema(value)
    path = Path(value)
    if not path.is_file():
        raise SchemaNotFoundError(
            f"schema: {value!r} is neither an existing .avsc file nor a built-in schema "
            f"({', '.join(catalog.SCHEMA_NAMES)})"
        )
    loaded: dict[str, Any] = catalog.schema_to_dict(path.read_text(encoding="utf-8"))
    return loaded


def register_builtin(registry: SchemaRegistry, settings: config.Settings) -> dict[str, int]:
    """Register every declared topic's record schema under ``<topic>-value``; returns subject -> id.

    Idempotent (same schema, same id), so stacks and workers can call it on every start.
    """
    from streaming.topics import declared_topics

    out: dict[str, int] = {}
    for spec in declared_topics(settings):
        if spec.record is None:
            continue  # dead-letter topics keep the original bytes
        subject = catalog.value_subject(spec.name)
        out[subject] = registry.register(subject, catalog.load_schema(spec.record))
    return out


def _list(args: argparse.Namespace, settings: config.Settings) -> int:
    if args.builtin:
        for name in catalog.SCHEMA_NAMES:
            print(name)
        return 0
    registry = registry_for(settings)
    subjects = registry.subjects()
    if not subjects:
        print("no subjects registered (run `streamlearn schemas register-builtin`)", file=sys.stderr)
    for subject in subjects:
        latest = registry.latest(subject)
        print(f"{subject}\tversion={latest.version}\tid={latest.id}\t{_record_name(latest.schema)}")
    return 0


def _record_name(text: str) -> str:
    value = json.loads(text)
    if isinstance(value, dict):
        return str(value.get("name", value.get("type", "")))
    return value if isinstance(value, str) else "union"  # a primitive schema ("string") was shown as a union


def _show(args: argparse.Namespace, settings: config.Settings) -> int:
    found = registry_for(settings).get_version(args.subject, args.version)
    print(f"# subject={found.subject} version={found.version} id={found.id}")
    print(json.dumps(json.loads(found.schema), indent=2))
    return 0


def _register(args: argparse.Namespace, settings: config.Settings) -> int:
    schema_id = registry_for(settings).register(args.subject, read_schema_arg(args.schema))
    print(schema_id)
    return 0


def _check(args: argparse.Namespace, settings: config.Settings) -> int:
    registry = registry_for(settings)
    messages = registry.test_compatibility(args.subject, read_schema_arg(args.schema), args.version)
    level = registry.get_config(args.subject)
    if not messages:
        print(f"compatible with {args.subject} ({level})")
        return 0
    print(f"incompatible with {args.subject} ({level}):")
    for message in messages:
        print(f"  - {message}")
    return 1


def _register_builtin(args: argparse.Namespace, settings: config.Settings) -> int:
    for subject, schema_id in register_builtin(registry_for(settings), settings).items():
        print(f"{subject}\tid={schema_id}")
    return 0


def _serve(args: argparse.Namespace, settings: config.Settings) -> int:
    from schemas.access import bind_host, load_keys
    from schemas.registry import FileRegistry
    from schemas.server import serve

    port = args.registry_port if args.registry_port is not None else settings.registry_port
    keys = load_keys(settings.keys, settings.keys_file)
    host, _ = bind_host(args.registry_host or settings.registry_host, keys, "schema registry", "--host")
    registry = FileRegistry(settings.registry_dir)  # serving a remote registry would only proxy it
    access = f"{len(keys)} key(s), reads {'open' if settings.registry_read_open else 'keyed'}" if keys else \
        "no key: open, loopback only"
    print(f"schema registry on http://{host}:{port} (store {settings.registry_dir}; {access})", file=sys.stderr)
    serve(registry, args.registry_host or settings.registry_host, port, keys=keys,
          read_open=settings.registry_read_open, topic_prefix=settings.topic_prefix)
    return 0
