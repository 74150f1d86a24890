"""`streamlearn topics create|list|describe`: the declared topics, idempotently."""

from __future__ import annotations

import argparse
import json

from streaming import config
from streaming.topics import declared_topics, describe, ensure_topics


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("topics", help="create, list and describe the platform's topics")
    ts = p.add_subparsers(dest="topics_cmd", metavar="ACTION")
    ts.required = True
    c = ts.add_parser("create", help="create every declared topic that does not exist (idempotent)")
    c.add_argument("--model", action="append", default=[], help="also create topics of this custom model")
    c.set_defaults(func=_create)
    ls = ts.add_parser("list", help="declared topics with partitions, retention and cleanup policy")
    ls.set_defaults(func=_list)
    d = ts.add_parser("describe", help="partitions and offsets of topics (default: all declared)")
    d.add_argument("names", nargs="*")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_describe)


def _create(args: argparse.Namespace, settings: config.Settings) -> int:
    specs = declared_topics(settings, args.model)
    created = ensure_topics(settings, specs)
    print(f"{len(created)} created, {len(specs) - len(created)} already existed")
    for name in created:
        print(f"  + {name}")
    return 0


def _list(args: argparse.Namespace, settings: config.Settings) -> int:
    for s in declared_topics(settings):
        days = s.retention_ms / 86_400_000
        print(f"{s.name:45} partitions={s.partitions} retention={days:g}d cleanup={s.cleanup_policy:8} "
              f"{s.record or 'original bytes'}  # {s.purpose}")
    return 0


def _describe(args: argparse.Namespace, settings: config.Settings) -> int:
    names = args.names or [s.name for s in declared_topics(settings)]
    info = describe(settings, names)
    # A topic named on the command line that does not exist is a failure (a script's `&&` must stop);
    # a declared topic not created yet is only reported.
    missing = 1 if args.names and any(not t["partitions"] for t in info) else 0
    if args.json:
        print(json.dumps(info, indent=2))
        return missing
    for t in info:
        if not t["partitions"]:
            print(f"{t['name']}: does not exist")
            continue
        parts = " ".join(f"p{p}=[{b},{e})" for p, (b, e) in t["offsets"].items())
        print(f"{t['name']}: {t['partitions']} partitions {parts}")
    return missing
