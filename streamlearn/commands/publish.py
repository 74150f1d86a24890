"""`streamlearn publish <kind>`: publish events from a JSON-lines file, stdin, or the demo generators.

Timestamps of ``--file``/``--stdin`` events follow the event-time policy (docs/EVENT_TIME.md):
epoch numbers in ``--timestamp-unit`` (``auto`` decides once from the first lines) or ISO 8601
text, accepted within the live window unless ``--backfill``. Generated events are synthetic
history (sensor readings end about now; web-log and image events start in 2023), so
``--generate`` publishes them as a backfill run: the featurizers take them whenever they run,
whatever live events they have seen.

``--file`` is a checkpointed source of the one ingest runner (ingest/jsonlines.py): the same command
run again after a crash or Ctrl-C resumes after the last acknowledged line, and once finished it
publishes nothing again. ``--stdin`` cannot be read twice and has no checkpoint.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from streaming import config
from streaming.producer import Publisher
from streaming.progress import progress
from streaming.topics import KINDS
from streamlearn.argtypes import generate_arg, seed_arg
from streamlearn.eventtime_flags import add_event_time_flags, policy_from_args, unit_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="publish web-log, sensor or image events as Avro")
    p.add_argument("kind", choices=sorted(KINDS))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", help="JSON-lines file, one event per line (bytes fields base64); published once: "
                     "a rerun resumes after the last acknowledged line (checkpoint under HOME/state/publish/)")
    src.add_argument("--stdin", action="store_true", help="read JSON lines from standard input")
    src.add_argument("--generate", type=generate_arg, metavar="N",
                     help="publish N events from the demo generator (as a backfill run, see --backfill)")
    p.add_argument("--seed", type=seed_arg, default=7, help="seed of --generate (default 7)")
    p.add_argument("--checkpoint", type=Path, help="position file of --file (default: HOME/state/publish/KIND/"
                   "<file name>.<hash of the path and the event-time flags>.json)")
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


def _publish(args: argparse.Namespace, settings: config.Settings) -> int:
    from ingest.jsonlines import JsonLinesSource, default_checkpoint_path
    from ingest.runner import SourceRunner
    from ingest.source import IterSource, SourcePartition
    from streamlearn.commands.ingest import EXIT_NOT_ACKED, _ensure_kind_topics, _stop_on_signals

    started = time.monotonic()
    if args.generate is not None and args.backfill is None:
        args.backfill = True
    source = "stdin" if args.stdin else (args.file or f"generator:{args.kind}:{args.seed}")
    policy = policy_from_args(args, settings, f"publish {args.kind} {source}")
    unit = unit_from_args(args, settings)
    cp_path = None
    try:
        mode = os.stat(args.file).st_mode if args.file else None
    except OSError:
        mode = None  # missing or unreadable: the file source says so
    piped = mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)
    if piped:  # a FIFO, /dev/stdin on a pipe, <(process substitution): readable once, like --stdin
        print(f"publish {args.kind}: {args.file} is not a regular file; it is read once as a stream, with no "
              "checkpoint (a re-run sends anew)", file=sys.stderr, flush=True)
    elif args.file:
        cp_path = args.checkpoint or default_checkpoint_path(settings, args.kind, Path(args.file), policy=policy,
                                                             timestamp_unit=unit)
    # Every mode: the checkpoint's read-back floors are the topics' offsets (--file), a cluster that does not
    # create topics on first use refuses a send to a missing one, and with no broker at the address this is
    # the one clear error after the bootstrap timeout. Before, --generate and --stdin went straight to the
    # (librdkafka) producer, which never fails a bootstrap: they waited for acks until interrupted.
    _ensure_kind_topics(settings, args.kind)

    def rejected_line(lineno: str, reasons: str, exc: BaseException) -> None:
        print(f"line {lineno}: rejected ({reasons}): {exc}", file=sys.stderr)

    give_up = threading.Event()  # set by a second Ctrl-C or the stop's grace: see _stop_on_signals
    with Publisher(settings, give_up=give_up) as pub:
        if args.generate is not None:
            with progress(args.generate, f"publish {args.kind} --generate", unit="events") as bar:
                def counted() -> Iterator[dict[str, Any]]:
                    for record in generated(args.kind, args.generate, args.seed):
                        yield record
                        bar.advance()

                # A generator source of the one ingest runner (no checkpoint: each run publishes anew).
                stats = SourceRunner(settings, pub, lambda _: IterSource(args.kind, counted(), name=source,
                                                                         headers=policy.headers() or None),
                                     kind=args.kind, checkpoint_path=None).run()
        else:
            def build(state: dict[str, Any] | None) -> SourcePartition:
                if args.stdin or piped:
                    stream = sys.stdin.buffer if args.stdin else open(args.file, "rb")  # noqa: SIM115 (closed by the source)
                    return JsonLinesSource(args.kind, stream=stream, name=source, policy=policy,
                                           timestamp_unit=unit, on_reject=rejected_line)
                return JsonLinesSource(args.kind, path=Path(args.file), resume_state=state, policy=policy,
                                       timestamp_unit=unit, on_reject=rejected_line)

            runner = SourceRunner(settings, pub, build, kind=args.kind, checkpoint_path=cp_path)
            src = runner.source
            assert isinstance(src, JsonLinesSource)
            if src.pos is not None:
                print(f"publish {args.kind}: {args.file} " + (
                    f"was published to its end by an earlier run with these flags; delete {cp_path} to publish "
                    "it again" if src.pos.at_end() else f"from line {src.pos.line + 1} (checkpoint {cp_path})"),
                    file=sys.stderr, flush=True)
            # A file stops cleanly on Ctrl-C/SIGTERM (acked, checkpointed: the same command resumes);
            # standard input keeps Python's Ctrl-C, which a blocked read of the pipe would not see.
            stop = None if args.stdin or piped else _stop_on_signals(give_up)
            stats = runner.run(stop)
            if stop is not None and stop.is_set() and not src.lines.eof:
                print(f"publish {args.kind}: stopped after line {src.lines.line} of {args.file} "
                      f"(checkpoint {cp_path}); the same command resumes", file=sys.stderr, flush=True)
        pub.settle()  # a broker killed right after we exit must not lose the last acks
    sent, rejected = stats.published, stats.dead_lettered
    took = time.monotonic() - started
    skipped = f"; {stats.skipped_duplicates} already on the topic" if stats.skipped_duplicates else ""
    unacked = (f", {pub.abandoned} of them not acked by the broker (not checkpointed: the same command sends them "
               "again)") if pub.abandoned else ""
    print(f"published {sent} {args.kind} events in {took:.2f} s{unacked}; {rejected} rejected to the dead-letter "
          f"topic{skipped}")
    if pub.abandoned:
        return EXIT_NOT_ACKED
    return 0 if rejected == 0 else 1
