"""`streamlearn publish <kind>`: publish events from a JSON-lines file, stdin, or the demo generators.

Timestamps of ``--file``/``--stdin`` events follow the event-time policy (docs/EVENT_TIME.md):
epoch numbers in ``--timestamp-unit`` (``auto`` decides once from the first lines) or ISO 8601
text, accepted within the live window unless ``--backfill``. Generated events are synthetic
history ending about now, so ``--generate`` publishes them as a backfill run: the featurizers take
them whenever they run, whatever live events they have seen.
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from collections.abc import Iterator
from typing import Any

from ingest.exceptions import InputRejectedError, SourceError
from ingest.source import compressed, read_line
from schemas.exceptions import RecordValidationError, SchemaError
from streaming import config
from streaming.eventtime import EventTimePolicy, TimestampReader
from streaming.exceptions import EventTimeError
from streaming.jsoncodec import from_json
from streaming.limits import MAX_JSON_BYTES, InputLimitError, bounded_json
from streaming.producer import Publisher
from streaming.progress import progress
from streaming.topics import KINDS
from streamlearn.eventtime_flags import add_event_time_flags, policy_from_args, unit_from_args

#: Lines ``--timestamp-unit auto`` reads ahead in a file to decide the unit.
_LOOKAHEAD = 100


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="publish web-log, sensor or image events as Avro")
    p.add_argument("kind", choices=sorted(KINDS))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", help="JSON-lines file, one event per line (bytes fields base64)")
    src.add_argument("--stdin", action="store_true", help="read JSON lines from standard input")
    src.add_argument("--generate", type=int, metavar="N",
                     help="publish N events from the demo generator (as a backfill run, see --backfill)")
    p.add_argument("--seed", type=int, default=7, help="seed of --generate (default 7)")
    add_event_time_flags(p)
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


#: One input line: its number, its bytes, and its text or why it has none.
Line = tuple[int, bytes, str | InputRejectedError]


def _lines(args: argparse.Namespace) -> Iterator[Line]:
    """The non-blank lines with their numbers; a line that is not UTF-8 or over the JSON size limit
    comes as its error instead (dead-lettered with its first bytes, the run goes on).

    Read as bytes, at most :data:`MAX_JSON_BYTES` per line in memory: a text-mode read raised
    UnicodeDecodeError out of the loop (one latin-1 byte ended the run), and a line without a newline
    was read whole whatever its size. A UTF-8 byte-order mark before the first line is skipped.
    """
    stream = sys.stdin.buffer if args.stdin else open(args.file, "rb")  # noqa: SIM115
    with stream:
        lineno = 0
        while True:
            raw, size = read_line(stream, MAX_JSON_BYTES)
            if not raw:
                return
            over = size > len(raw)  # only its head came back (before the BOM is taken off)
            lineno += 1
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if lineno == 1 and (packed := compressed(raw[:8], args.file or "stdin")) is not None:
                raise SourceError(packed)  # not one bad_encoding dead letter per random newline
            if over:
                yield lineno, raw, InputRejectedError(
                    f"line is {size} bytes, over the {MAX_JSON_BYTES}-byte limit of one JSON event; "
                    "send a smaller event", "line_too_long")
                continue
            if not raw.strip():
                continue
            try:
                text: str | InputRejectedError = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                text = InputRejectedError(
                    f"line is not UTF-8 ({exc}); convert the file to UTF-8", "bad_encoding")
            yield lineno, raw, text


def _decide(reader: TimestampReader, lines: Iterator[Line]) -> Iterator[Line]:
    """``auto``: read the first lines' timestamps, decide the unit once, then hand every line on."""
    head: list[Line] = []
    for item in lines:
        head.append(item)
        if len(head) >= _LOOKAHEAD:
            break
    if reader.unit == "auto":
        stamps = []
        for _, _, line in head:
            if not isinstance(line, str):
                continue
            try:
                obj = bounded_json(line, "line")
            except ValueError:
                continue
            if isinstance(obj, dict) and "timestamp" in obj:
                stamps.append(obj["timestamp"])
        reader.decide(stamps)
    yield from head
    yield from lines


def event_from_line(kind: str, line: str, reader: TimestampReader, policy: EventTimePolicy) -> dict[str, Any]:
    """One JSON line -> a record of ``kind`` with its timestamp read and checked (raises on any problem)."""
    record = from_json(KINDS[kind], bounded_json(line, "line"))
    if kind == "sensor":
        from ingest.exceptions import SensorValidationError
        from ingest.sensors import validate

        found: list[SensorValidationError] = []
        if "timestamp" in record:
            try:
                record["timestamp"] = reader(record["timestamp"])
            except EventTimeError as exc:
                found.append(SensorValidationError(str(exc), exc.reason))
                del record["timestamp"]
        record.setdefault("values", {})
        return validate(record, policy=policy, problems=found)
    if "timestamp" not in record:
        raise EventTimeError(f"{KINDS[kind]} needs a timestamp (epoch number or ISO 8601 text)", "bad_timestamp")
    record["timestamp"] = policy.check(reader(record["timestamp"]))
    return record


def _reasons(exc: BaseException) -> str:
    """Short reason codes (``dl.source_reason(s)``), as the ingest sources write them: a record that breaks
    its schema is ``schema`` (its ``reason`` is the sentence already in the message), not the sentence."""
    if isinstance(exc, RecordValidationError):
        return "schema"
    if isinstance(exc, InputLimitError):  # bounded_json's refusals: as the log tailer names them
        return "bad_json"
    reasons = getattr(exc, "reasons", None) or [getattr(exc, "reason", None) or type(exc).__name__]
    return ",".join(str(r) for r in reasons)


def _publish(args: argparse.Namespace, settings: config.Settings) -> int:
    sent = rejected = 0
    started = time.monotonic()
    if args.generate is not None and args.backfill is None:
        args.backfill = True
    source = "stdin" if args.stdin else (args.file or f"generator:{args.kind}:{args.seed}")
    policy = policy_from_args(args, settings, f"publish {args.kind} {source}")
    headers = policy.headers() or None
    with Publisher(settings) as pub:
        futures = []
        if args.generate is not None:
            from ingest.runner import SourceRunner
            from ingest.source import IterSource

            with progress(args.generate, f"publish {args.kind} --generate", unit="events") as bar:
                def counted() -> Iterator[dict[str, Any]]:
                    for record in generated(args.kind, args.generate, args.seed):
                        yield record
                        bar.advance()

                # A generator source of the one ingest runner (no checkpoint: each run publishes anew).
                stats = SourceRunner(settings, pub, lambda _: IterSource(args.kind, counted(), name=source,
                                                                         headers=headers),
                                     kind=args.kind, checkpoint_path=None).run()
            sent, rejected = stats.published, stats.dead_lettered
        else:
            reader = TimestampReader(unit_from_args(args, settings), source=source)
            # A file is looked ahead into for auto's decision; stdin, a stream, decides at its first number.
            lines = _decide(reader, _lines(args)) if args.file else _lines(args)
            for lineno, raw, line in lines:
                try:
                    if not isinstance(line, str):
                        raise line
                    futures.append(pub.publish(args.kind, event_from_line(args.kind, line, reader, policy),
                                               headers=headers))
                except (ValueError, SchemaError) as exc:  # EventTimeError and InputRejectedError are ValueErrors
                    rejected += 1
                    reasons = _reasons(exc)
                    print(f"line {lineno}: rejected ({reasons}): {exc}", file=sys.stderr)
                    pub.dead_letter(args.kind, raw.rstrip(b"\r\n"), stage="publish", error=exc,
                                    source={"file": source, "line": lineno, "reason": reasons.split(",")[0],
                                            "reasons": reasons})
        pub.flush()
        for fut in futures:
            fut.get(timeout=30)
            sent += 1
        pub.settle()  # a broker killed right after we exit must not lose the last acks
    took = time.monotonic() - started
    print(f"published {sent} {args.kind} events in {took:.2f} s; {rejected} rejected to the dead-letter topic")
    return 0 if rejected == 0 else 1
