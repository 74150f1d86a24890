"""`streamlearn publish <kind>`: publish events from a JSON-lines file, stdin, or the demo generators."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

from schemas.exceptions import SchemaError
from streaming import config
from streaming.jsoncodec import from_json
from streaming.producer import Publisher
from streaming.topics import KINDS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="publish web-log, sensor or image events as Avro")
    p.add_argument("kind", choices=sorted(KINDS))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", help="JSON-lines file, one event per line (bytes fields base64)")
    src.add_argument("--stdin", action="store_true", help="read JSON lines from standard input")
    src.add_argument("--generate", type=int, metavar="N", help="publish N events from the demo generator")
    p.add_argument("--seed", type=int, default=7, help="seed of --generate (default 7)")
    p.set_defaults(func=_publish)


def generated(kind: str, n: int, seed: int) -> Iterator[dict[str, Any]]:
    """Demo events of one kind (deterministic given the seed)."""
    if kind == "weblog":
        from ingest.generators import web_traffic

        yield from web_traffic(n, seed=seed)
    elif kind == "sensor":
        from ingest.sensors import generate

        yield from generate(n, n_sensors=max(1, min(20, n // 50 or 1)), seed=seed)
    else:
        from ingest.generators import digits

        yield from digits(n, seed=seed)


def _lines(args: argparse.Namespace) -> Iterator[tuple[int, str]]:
    stream = sys.stdin if args.stdin else open(args.file, encoding="utf-8")  # noqa: SIM115
    with stream:
        for lineno, line in enumerate(stream, 1):
            if line.strip():
                yield lineno, line


def _publish(args: argparse.Namespace, settings: config.Settings) -> int:
    record_name = KINDS[args.kind]
    sent = rejected = 0
    started = time.monotonic()
    with Publisher(settings) as pub:
        futures = []
        if args.generate is not None:
            for record in generated(args.kind, args.generate, args.seed):
                futures.append(pub.publish(args.kind, record))
        else:
            source = "stdin" if args.stdin else args.file
            for lineno, line in _lines(args):
                try:
                    record = from_json(record_name, json.loads(line))
                    futures.append(pub.publish(args.kind, record))
                except (ValueError, SchemaError) as exc:
                    rejected += 1
                    print(f"line {lineno}: rejected: {exc}", file=sys.stderr)
                    pub.dead_letter(args.kind, line.encode(), stage="publish", error=exc,
                                    source={"file": source, "line": lineno})
        pub.flush()
        for fut in futures:
            fut.get(timeout=30)
            sent += 1
        pub.settle()  # a broker killed right after we exit must not lose the last acks
    took = time.monotonic() - started
    print(f"published {sent} {args.kind} events in {took:.2f} s; {rejected} rejected to the dead-letter topic")
    return 0 if rejected == 0 else 1
