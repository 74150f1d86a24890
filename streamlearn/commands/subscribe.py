"""`streamlearn subscribe <topic>`: print decoded records from a group or from any position."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from streaming import config
from streaming.consumer import Subscriber
from streaming.jsoncodec import to_json
from streaming.logs import CONTROL_ESCAPES
from streaming.producer import header_dict
from streaming.timeargs import HELP as TIME_HELP
from streaming.timeargs import time_arg
from streamlearn.argtypes import count_arg, offset_arg, seconds


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("subscribe", help="read and print records of a topic (e.g. weblog.raw, digits_cnn.predictions)")
    p.add_argument("topic", help="topic name without the topic prefix (the prefix is added)")
    p.add_argument("--group", help="consume in this consumer group and commit what was printed")
    pos = p.add_mutually_exclusive_group()
    pos.add_argument("--from-beginning", action="store_true")
    pos.add_argument("--from-offset", type=offset_arg, metavar="N", help="start every partition at offset N")
    pos.add_argument("--from-timestamp", type=time_arg("--from-timestamp"), metavar="T",
                     help=f"from the first record at/after T: {TIME_HELP}")
    until = p.add_mutually_exclusive_group()
    until.add_argument("--until-offset", type=offset_arg, metavar="N", help="stop each partition before offset N")
    until.add_argument("--until-timestamp", type=time_arg("--until-timestamp"), metavar="T",
                       help="stop at records at/after T (same forms as --from-timestamp)")
    until.add_argument("--until-end", action="store_true", help="stop at the end offsets seen at start")
    p.add_argument("--json", action="store_true", help="one JSON object per line (bytes as base64)")
    p.add_argument("--max-records", type=count_arg, metavar="N", help="stop after N records (N >= 1)")
    p.add_argument("--idle-timeout", type=seconds(), metavar="SECONDS", help="stop after this long without records")
    p.add_argument("--raw", action="store_true",
                   help="do not decode; print headers (automatic for *.deadletter topics, which hold the original "
                        "bytes plus dl.* reason headers)")
    p.set_defaults(func=_subscribe)


def _subscribe(args: argparse.Namespace, settings: config.Settings) -> int:
    start: Any = "committed" if args.group else "end"
    if args.from_beginning:
        start = "beginning"
    elif args.from_offset is not None:
        start = {"offset": args.from_offset}
    elif args.from_timestamp is not None:
        start = {"timestamp": args.from_timestamp}
    until: Any = None
    if args.until_offset is not None:
        until = {"offset": args.until_offset}
    elif args.until_timestamp is not None:
        until = {"timestamp": args.until_timestamp}
    elif args.until_end:
        until = "end"
    topic = settings.topic(args.topic)
    dead_letters = topic.endswith(".deadletter")
    raw = args.raw or dead_letters  # dead letters are the original bytes: there is nothing to decode
    group = settings.group(args.group) if args.group else None
    if group and start == "committed" and until is not None:  # it read on for ever past the end
        print("error: --until-offset/--until-timestamp/--until-end stop a read from given positions, and a --group "
              "member reads from its committed offsets for as long as it runs; use --idle-timeout to stop once it "
              "has caught up, or add --from-beginning/--from-offset/--from-timestamp to read without the group",
              file=sys.stderr)
        return 2
    if group and start == "committed":  # joining a group on a missing topic waited in silence for ever
        from streaming.topics import describe

        if not describe(settings, [topic])[0]["partitions"]:
            print(f"error: topic {topic!r} does not exist; create it with `streamlearn topics create`", file=sys.stderr)
            return 1
    if group and start != "committed":
        print("note: explicit positions read without the group; nothing will be committed", file=sys.stderr)
    lease, member = None, dict[str, Any]()
    if group and start == "committed":  # a group member: static id and slot lock like every worker
        from streaming import members

        lease = members.claim(settings, group, f"subscribe-{topic}")
        _Sigterm.install()
        member = {"group_instance_id": lease.instance_id, "client_id": members.client_id("subscribe")}
        try:
            members.remove_dead_local(settings, group, quick=True)
        except Exception as exc:  # noqa: BLE001 - the subscription itself still works
            print(f"note: could not check group {group} for dead members: {exc}", file=sys.stderr)
    try:
        n, failed = _print_items(args, settings, topic, group, start, until, member, raw, dead_letters)
    finally:
        if lease is not None:
            lease.release()
    if failed:
        print(f"{n} records, {failed} could not be decoded (see 'error'; --raw prints the bytes)", file=sys.stderr)
        return 1
    print(f"{n} records", file=sys.stderr)
    return 0


class _Sigterm:
    """SIGTERM ends a group subscription the way Ctrl-C does: through the ``finally`` that closes the
    consumer and releases the slot, which removes the static member from its group.

    Why: Python's default SIGTERM ends the process at once, like ``kill -9``, so a plain ``kill`` (or a
    supervisor's stop) left the member behind, and the embedded broker never expires one (docs/RECOVERY.md:
    "a clean stop (SIGTERM, Ctrl-C, --idle-exit) removes its own member"). A SIGTERM that arrives during an
    offset commit takes effect right after it, so the commit of what was printed is not cut off; a second
    SIGTERM during the cleanup is ignored rather than cutting that short (``kill -9`` still ends it at once).
    """

    committing = False
    pending = 0

    @classmethod
    def install(cls) -> None:
        if threading.current_thread() is threading.main_thread():  # the CLI always runs there
            signal.signal(signal.SIGTERM, cls._handler)

    @classmethod
    def _handler(cls, signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if cls.committing:
            cls.pending = signum
            return
        raise SystemExit(128 + signum)

    @classmethod
    def after_commit(cls) -> None:
        cls.committing = False
        if cls.pending:
            raise SystemExit(128 + cls.pending)


def _print_items(args: argparse.Namespace, settings: config.Settings, topic: str, group: str | None, start: Any,
                 until: Any, member: dict[str, Any], raw: bool, dead_letters: bool) -> tuple[int, int]:
    """Print each item; returns (items, items that could not be decoded)."""
    n = failed = 0
    with Subscriber(settings, topic, group=group, start=start, until=until, decode=not raw,
                    idle_backoff=True, **member) as sub:
        # What was printed is committed once per fetched batch (and at any exit, Ctrl-C and SIGTERM
        # included): one commit round trip per record capped a group subscription at ~330 records/s.
        # At least once: a kill -9 prints at most the rest of one batch again after the restart.
        printed: dict[Any, int] = {}
        committing = bool(args.group and sub.grouped)
        try:
            for item in sub.iterate(max_records=args.max_records, idle_timeout_s=args.idle_timeout,
                                    batch_done=(lambda: _commit(sub, printed)) if committing else None):
                n += 1
                failed += _print_item(args, item, raw, dead_letters)
                if committing:
                    printed[_tp(item)] = item.offset + 1
        finally:
            if committing:
                _commit(sub, printed)
    return n, failed


def _print_item(args: argparse.Namespace, item: Any, raw: bool, dead_letters: bool) -> int:
    """Print one item; 1 when it could not be decoded."""
    meta = {"topic": item.topic, "partition": item.partition, "offset": item.offset,
            "timestamp": item.timestamp, "key": item.key.decode("utf-8", "replace") if item.key else None}
    if item.ok:
        out = {**meta, "schema_id": item.schema_id, "value": item.value}
        if raw:
            out["headers"] = header_dict(item.headers)
    else:
        out = {**meta, "error": item.reason}
    if args.json:
        print(to_json(out), flush=True)
    elif dead_letters and item.ok:
        print(_dead_letter_line(item), flush=True)
    else:
        shown = to_json(out.get("value", out.get("error")))[:300]
        print(f"{item.topic}[{item.partition}]@{item.offset} {shown}", flush=True)
    return 0 if item.ok else 1


def _commit(sub: Subscriber, printed: dict[Any, int]) -> None:
    """Commit what was printed (``{tp: next offset}``), then forget it. A commit refused by a rebalance
    (the group is rejoining, e.g. right after a restart) is not fatal: the next batch's commit covers it,
    and a partition that moved is re-read from its last commit by its new owner."""
    from kafka.errors import KafkaError

    if not printed:
        return
    offsets = dict(printed)
    printed.clear()
    _Sigterm.committing = True
    try:
        sub.commit(offsets)
    except KafkaError as exc:
        where = ", ".join(f"{tp.topic}[{tp.partition}]@{off - 1}" for tp, off in sorted(offsets.items()))
        print(f"note: commit of {where} refused ({type(exc).__name__}); a later commit covers it", file=sys.stderr)
    finally:
        _Sigterm.after_commit()


def _dead_letter_line(item: Any) -> str:
    """``topic[p]@offset stage=parse ValueError: no request line (file access.log line 12) | <bytes>``."""
    h = header_dict(item.headers)
    reason = f"{h.get('dl.error_class', '?')}: {h.get('dl.message', '?')}".translate(CONTROL_ESCAPES)
    source = ", ".join(f"{k.removeprefix('dl.source_')} {v}" for k, v in h.items()
                       if k.startswith("dl.source_")).translate(CONTROL_ESCAPES)
    body = bytes(item.value).decode("utf-8", "replace") if isinstance(item.value, (bytes, bytearray)) \
        else to_json(item.value)
    stage = h.get("dl.stage", "?").translate(CONTROL_ESCAPES)
    return (f"{item.topic}[{item.partition}]@{item.offset} stage={stage} {reason}"
            + (f" ({source})" if source else "") + f" | {body[:200]!r}")


def _tp(item: Any) -> Any:
    from kafka import TopicPartition

    return TopicPartition(item.topic, item.partition)
