"""`streamlearn ingest weblog|sensors|images`: the file and generator event sources.

``serve`` (the HTTP gateway) is added by ``ingest.gateway.cli.register_serve`` when that module
is present, so the gateway can ship independently of these sources.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from streaming import config
from streaming.producer import STOP_GRACE_S
from streaming.progress import progress
from streamlearn.argtypes import generate_arg, seconds, seed_arg, whole
from streamlearn.eventtime_flags import add_event_time_flags, policy_from_args, unit_from_args


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    p = sub.add_parser("ingest", help="ingest events from log files, sensor CSVs/generators and image folders")
    isub = p.add_subparsers(dest="ingest_command", metavar="SOURCE")
    isub.required = True

    w = isub.add_parser("weblog", help="publish an access log (combined/common/JSON lines), optionally following it")
    w.add_argument("path", type=Path, help="log file, e.g. /var/log/nginx/access.log")
    w.add_argument(
        "--follow",
        "-F",
        action="store_true",
        help="keep following the file like `tail -F` (rotation and truncation survive); "
        "without it the file is read once to its end",
    )
    w.add_argument(
        "--checkpoint",
        type=Path,
        help="position file (default: HOME/state/weblog/<file name>.<path hash>.json, where HOME is --home "
        "or $STREAMLEARN_HOME; a --backfill run has its own, the hash also over its window)",
    )
    w.add_argument("--poll", type=seconds(0.0, 3600.0, above=True), default=0.2,
                   help="seconds between checks at end of file (default 0.2)")
    w.add_argument(
        "--rotate-grace",
        type=seconds(0.0, 86_400.0),
        default=1.0,
        help="seconds a rotated file must stay unchanged before switching to the new one (default 1)",
    )
    w.add_argument("--idle-exit", type=seconds(), help="with --follow, exit after this many seconds without new lines")
    add_event_time_flags(w)
    w.set_defaults(func=_weblog)

    s = isub.add_parser("sensors", help="publish sensor readings from a CSV file or the generator")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", type=Path, help="CSV with columns sensor_id,timestamp,value[,unit,label,...], or one "
                     "column per sensor (time|timestamp|datetime|date,<sensor>,...: each filled cell a reading); "
                     "published once: a rerun resumes after the last acknowledged row (checkpoint under "
                     "HOME/state/sensor/)")
    src.add_argument("--generate", type=generate_arg, metavar="N", help="publish N generated readings")
    s.add_argument("--sensors", type=whole(1, 1_000_000), default=10, help="number of generated sensors (default 10)")
    s.add_argument("--seed", type=seed_arg, default=0, help="generator seed (default 0)")
    s.add_argument("--start-ms", type=int, help="timestamp of the first generated reading (default: ends at now)")
    s.add_argument("--interval-ms", type=whole(1, 365 * 86_400_000), default=60_000,
                   help="generated reading interval (default 60000)")
    s.add_argument("--unit", default="unit", help="unit of CSV rows without a unit column (default 'unit')")
    add_event_time_flags(s)
    s.set_defaults(func=_sensors)

    i = isub.add_parser("images", help="publish PNG/JPEG files of a directory once each, then move them "
                          "to processed/ or, with a .reason file, to rejected/")
    i.add_argument("--watch", type=Path, required=True, metavar="DIR", help="directory to watch")
    i.add_argument("--once", action="store_true", help="process the files present now and exit")
    i.add_argument("--poll", type=seconds(0.0, 3600.0, above=True), default=0.5,
                   help="seconds between directory scans (default 0.5)")
    i.add_argument("--idle-exit", type=seconds(), help="exit after this many seconds without new files; a file "
                   "still being written is waited for (up to 60 s more), then logged and left in place")
    i.add_argument("--settle", type=seconds(0.0, 86_400.0), default=1.0,
                   help="seconds a file's size and mtime must stay unchanged before it is taken (default 1)")
    add_event_time_flags(i, unit_setting=None)
    i.set_defaults(func=_images)

    try:
        from ingest.gateway.cli import register_serve  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pass
    else:
        register_serve(isub)


#: Exit status of a source command stopped before every record was acked (the same command resumes).
EXIT_NOT_ACKED = 3
#: Exit status of a file run that refused every record it read (all dead-lettered, none published).
EXIT_ALL_REFUSED = 1


def _all_refused(command: str, published: int, dead_lettered: int, reasons: dict[str, int] | None) -> bool:
    """Say so, and True, when a run dead-lettered every record and published none. Why: 3,756 rows of
    1970s data without --backfill, all refused, exited 0, and a script went on as if the load had worked.
    A run that refused some rows still exits 0 (dead letters are kept, with reasons)."""
    if published or not dead_lettered:
        return False
    why = ", ".join(f"{k} x{v}" for k, v in sorted((reasons or {}).items(), key=lambda kv: -kv[1])[:5])
    print(f"{command}: every record read was refused ({dead_lettered} dead letters{': ' + why if why else ''}); "
          "nothing was published. The dead-letter messages say what to change (e.g. --backfill for history)",
          file=sys.stderr, flush=True)
    return True
#: How long a stop may take before the console is told how to end it sooner.
STOP_HINT_AFTER_S = 2.0


def _stop_on_signals(give_up: threading.Event, grace_s: float = STOP_GRACE_S) -> threading.Event:
    """SIGTERM/SIGINT end the loop gracefully: in-flight lines are acked and checkpointed first.

    ``give_up`` is the Publisher's (:attr:`streaming.producer.Publisher.give_up`): a second signal, or
    ``grace_s`` after the first, sets it, so a broker that is down for good cannot keep the process from
    exiting; what was not acked is not checkpointed and the same command sends it again. Why: without it a
    stopped ``publish --file`` whose broker had died waited for acks forever, and only ``kill -9`` ended it.
    """
    stop = threading.Event()

    def hint() -> None:  # a thread, not the handler: a print in a signal handler can re-enter stderr's writer
        if not give_up.wait(STOP_HINT_AFTER_S):
            print(f"stopping: waiting for the records in flight to be acked and confirmed kept (at most "
                  f"{grace_s:.0f} s; Ctrl-C again stops now, and the same command sends what is not confirmed)",
                  file=sys.stderr, flush=True)

    def handler(signum: int, frame: Any) -> None:
        if not stop.is_set():
            stop.set()
            timer = threading.Timer(grace_s, give_up.set)
            timer.daemon = True
            timer.start()
            threading.Thread(target=hint, name="stop-hint", daemon=True).start()
        else:
            give_up.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _ensure_kind_topics(settings: config.Settings, kind: str) -> None:
    """Create the raw and dead-letter topics of ``kind`` when missing (idempotent), so a source
    can start on a fresh broker and its start-up offsets read never races topic creation."""
    from streaming.topics import dead_letter_topic, declared_topics, ensure_topics, raw_topic

    names = {raw_topic(settings, kind), dead_letter_topic(settings, kind)}
    ensure_topics(settings, [spec for spec in declared_topics(settings) if spec.name in names])


def _report(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, sort_keys=True), flush=True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _weblog(args: argparse.Namespace, settings: config.Settings) -> int:
    from dataclasses import asdict

    from ingest.tailer import FileTailer
    from streaming.producer import Publisher

    give_up = threading.Event()
    stop = _stop_on_signals(give_up)
    _ensure_kind_topics(settings, "weblog")
    started = time.monotonic()
    with Publisher(settings, give_up=give_up) as pub:
        tailer = FileTailer(
            settings,
            pub,
            args.path,
            checkpoint_path=args.checkpoint,
            follow=args.follow,
            poll_s=args.poll,
            rotate_grace_s=args.rotate_grace,
            policy=policy_from_args(args, settings, f"ingest weblog {args.path}"),
            timestamp_unit=unit_from_args(args, settings),
        )
        print(
            f"ingest weblog: {args.path} from line {tailer.pos.line + 1} (checkpoint {tailer.cp_path})",
            file=sys.stderr,
            flush=True,
        )
        # Read once: the bytes left to read are the total (ETA). Following: no end, so no total.
        total = None if args.follow else max(0, _size(args.path) - tailer.pos.offset)
        with progress(total, f"ingest {args.path.name}", unit="bytes") as bar:
            tailer.on_read = bar.advance
            stats = tailer.run(stop, idle_exit_s=args.idle_exit)
        pub.settle()  # a broker killed right after we exit must not lose the last acks
    _report({"source": str(args.path), "seconds": round(time.monotonic() - started, 3), **asdict(stats),
             "not_acked": pub.abandoned})
    if pub.abandoned:
        return EXIT_NOT_ACKED
    return EXIT_ALL_REFUSED if _all_refused("ingest weblog", stats.published, stats.dead_lettered, None) else 0


def _sensors(args: argparse.Namespace, settings: config.Settings) -> int:
    from ingest import sensor_csv, sensors
    from streaming.producer import Publisher

    give_up = threading.Event()
    stop = _stop_on_signals(give_up)
    _ensure_kind_topics(settings, "sensor")
    started = time.monotonic()
    with Publisher(settings, give_up=give_up) as pub:
        if args.csv is not None:
            source = str(args.csv)
            policy = policy_from_args(args, settings, f"--csv {source}")
            # bytes read, without a total: a resumed run starts part-way through the file
            with progress(None, f"ingest {args.csv.name}", unit="bytes") as bar:
                def announce(line: int, cp: Path) -> None:
                    print(f"ingest sensors: {args.csv} from line {line} (checkpoint {cp})", file=sys.stderr,
                          flush=True)

                stats = sensor_csv.publish_csv(
                    settings, pub, args.csv, unit=args.unit, policy=policy,
                    timestamp_unit=unit_from_args(args, settings), on_start=announce, stop=stop, on_read=bar.advance)
        else:
            records = sensors.generate(
                args.generate,
                n_sensors=args.sensors,
                seed=args.seed,
                start_ms=args.start_ms,
                interval_ms=args.interval_ms,
            )
            source = f"generator:sensors:{args.seed}"
            # Generated readings are synthetic history ending now: published as a backfill run, so a
            # featurizer accepts them whenever they run, whatever live readings it has seen before.
            if args.backfill is None:
                args.backfill = True
            policy = policy_from_args(args, settings, source)
            stats = sensors.publish_records(pub, records, source=source, policy=policy, stop=stop)
        pub.settle()
    _report(
        {
            "source": source,
            "published": stats.published,
            "dead_lettered": stats.dead_lettered,
            "reasons": stats.reasons or {},
            "timestamp_unit": stats.timestamp_unit,
            "skipped_duplicates": stats.skipped_duplicates,
            **({"empty_columns": stats.empty_columns} if stats.empty_columns else {}),
            "backfill": stats.backfill_run or policy.run_id or None,  # a resumed CSV run keeps its id
            "not_acked": pub.abandoned,
            "seconds": round(time.monotonic() - started, 3),
        }
    )
    if pub.abandoned:
        return EXIT_NOT_ACKED
    mismatched = (stats.reasons or {}).get("timestamp_unit_mismatch", 0)
    if mismatched:
        print(f"ingest sensors: {mismatched} rows disagree with the timestamp unit decided for the file; they are "
              "dead-lettered (reason timestamp_unit_mismatch); pass --timestamp-unit", file=sys.stderr)
        return 1
    if args.csv is not None and _all_refused("ingest sensors", stats.published, stats.dead_lettered, stats.reasons):
        return EXIT_ALL_REFUSED
    return 0


def _images(args: argparse.Namespace, settings: config.Settings) -> int:
    from ingest.images import ImageWatcher
    from streaming.producer import Publisher

    give_up = threading.Event()
    stop = _stop_on_signals(give_up)
    _ensure_kind_topics(settings, "image")
    started = time.monotonic()
    with Publisher(settings, give_up=give_up) as pub:
        watcher = ImageWatcher(settings, pub, args.watch, settle_s=args.settle,
                               policy=policy_from_args(args, settings, f"ingest images {args.watch}"))
        try:
            watcher.run(follow=not args.once, poll_s=args.poll, stop=stop, idle_exit_s=args.idle_exit)
            pub.settle()
        finally:
            watcher.close()
    _report(
        {
            "source": str(args.watch),
            "published": watcher.published,
            "rejected": watcher.rejected_count,
            "duplicates": watcher.duplicates,
            "not_acked": pub.abandoned,
            "seconds": round(time.monotonic() - started, 3),
        }
    )
    return EXIT_NOT_ACKED if pub.abandoned else 0
