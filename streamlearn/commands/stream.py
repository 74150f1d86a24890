"""`streamlearn stream <kind>`, `streamlearn replay <kind> ...`, `streamlearn offsets show|reset ...`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from streaming import config
from streaming.exceptions import StreamingError
from streaming.timeargs import HELP as TIME_HELP
from streaming.timeargs import time_arg
from streaming.topics import KINDS
from streamlearn.argtypes import offset_arg, seconds


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("stream", help="consume a kind's raw topic in a consumer group, featurize and write "
                                      "micro-batches to the feature store (run one per partition to scale)")
    s.add_argument("kind", choices=sorted(KINDS))
    s.add_argument("--group", help="consumer group (default <prefix>stream.<kind>)")
    s.add_argument("--instance-id", help="pin the static group membership id (default: derived from group, host "
                                         "and the lowest free slot, so a restart with the same command takes "
                                         "its partitions back at once; see docs/RECOVERY.md)")
    s.add_argument("--batch-max-records", type=int,
                   help=config.flag_help("batch_max_records"))
    s.add_argument("--batch-max-seconds", type=float,
                   help=config.flag_help("batch_max_seconds"))
    s.add_argument("--metrics-port", type=int, help=config.flag_help("metrics_port"))
    s.add_argument("--watchdog-s", type=float, metavar="S", help=config.flag_help("watchdog_s"))
    s.add_argument("--idle-exit", type=seconds(), help="exit after this many seconds without records (batch jobs); "
                                                   "non-zero when it owned no partition while the topic had lag")
    s.set_defaults(func=_stream)

    r = sub.add_parser("replay", help="rebuild feature batches from a point of the raw topic into a separate "
                                      "namespace (deterministic; never touches the live group's offsets); "
                                      "`streamlearn store promote` makes it live")
    r.add_argument("kind", choices=sorted(KINDS))
    start = r.add_mutually_exclusive_group(required=True)
    start.add_argument("--from-beginning", action="store_true",
                       help="from each partition's earliest offset still on the topic")
    start.add_argument("--from-offset", action="append", metavar="P:O",
                       help="from offset O of partition P; repeat or comma-separate (0:120,1:95); only the "
                            "partitions named are replayed")
    start.add_argument("--from-timestamp", type=time_arg("--from-timestamp"), metavar="T",
                       help=f"from the first record at/after T (Kafka record time): {TIME_HELP}")
    r.add_argument("--to", type=time_arg("--to"), metavar="T",
                   help="stop before records at/after T (default: the end offsets when the replay starts)")
    r.add_argument("--into", required=True, dest="namespace", help="feature-store namespace to write (not 'live')")
    r.add_argument("--batch-max-records", type=int,
                   help=config.flag_help("batch_max_records"))
    r.add_argument("--featurizer-version", help="featurizer version (default: the current one)")
    r.add_argument("--dead-letters", action="store_true", help="re-publish dead letters (default: only record "
                                                               "their offsets; the live run already did)")
    r.add_argument("--quiet", action="store_true", dest="replay_quiet",
                   help="no progress (default: a bar on a terminal, else a line every --progress-interval s)")
    r.add_argument("--progress-interval", type=seconds(0.0, above=True), metavar="S",
                   help="seconds between progress lines off a terminal (default 10)")
    r.set_defaults(func=_replay)

    o = sub.add_parser("offsets", help="show or reset a live consumer group's offsets")
    osub = o.add_subparsers(dest="offsets_cmd", metavar="ACTION")
    osub.required = True
    show = osub.add_parser("show", help="committed offset, earliest, latest and lag per partition")
    reset = osub.add_parser("reset", help="set committed offsets (only while the group has no members)")
    for p in (show, reset):
        p.add_argument("--group", help="consumer group (default: the stream group of --kind)")
        p.add_argument("--kind", choices=sorted(KINDS), default=None, help="raw topic of this kind")
        p.add_argument("--topic", help="topic name without the topic prefix, which is added as for --group "
                       "(default: the raw topic of --kind)")
        p.add_argument("--json", action="store_true")
    target = reset.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-timestamp", type=time_arg("--to-timestamp"), metavar="T",
                        help=f"first offset at/after T: {TIME_HELP}")
    target.add_argument("--to-offset", type=offset_arg, help="this offset on every partition")
    target.add_argument("--to-earliest", action="store_true")
    target.add_argument("--to-latest", action="store_true")
    show.set_defaults(func=_offsets_show)
    reset.set_defaults(func=_offsets_reset)


def _stream(args: argparse.Namespace, settings: config.Settings) -> int:
    from streaming.worker import run_worker

    changes = {k: v for k, v in (("batch_max_records", args.batch_max_records),
                                 ("batch_max_seconds", args.batch_max_seconds),
                                 ("watchdog_s", args.watchdog_s)) if v is not None}
    group = settings.group(args.group) if args.group else None
    stats = run_worker(settings.with_(**changes), args.kind, group=group, instance_id=args.instance_id,
                       idle_exit_s=args.idle_exit)
    print(json.dumps(stats.__dict__, sort_keys=True))
    return 0


def _replay(args: argparse.Namespace, settings: config.Settings) -> int:
    from streaming.progress import progress
    from streaming.replay import parse_partition_offsets, replay

    if args.batch_max_records is not None:
        settings = settings.with_(batch_max_records=args.batch_max_records)
    if args.progress_interval is not None and args.progress_interval <= 0:
        raise StreamingError(f"--progress-interval: {args.progress_interval} must be > 0 seconds")
    from_offsets = parse_partition_offsets(args.from_offset) if args.from_offset else None
    quiet = True if args.replay_quiet else None  # None: follow a process-wide --quiet

    def bar(total: int) -> Any:
        return progress(total, f"replay {args.kind} -> {args.namespace}", quiet, unit="records",
                        interval=args.progress_interval)

    result = replay(settings, args.kind, from_ms=args.from_timestamp, from_offsets=from_offsets,
                    from_beginning=args.from_beginning, to_ms=args.to, namespace=args.namespace,
                    dead_letters=args.dead_letters, featurizer_version=args.featurizer_version, progress=bar)
    print(json.dumps(result.as_dict(), sort_keys=True))
    return 0


def _group_topic(args: argparse.Namespace, settings: config.Settings) -> tuple[str, str]:
    from streaming.topics import raw_topic
    from streaming.worker import default_group

    if args.topic is None and args.kind is None:
        raise StreamingError("offsets: give --kind (its raw topic and stream group) or --topic and --group")
    # --topic gets the prefix as --group does (and as `subscribe TOPIC` does): given as is, a tenant's
    # `offsets reset --topic b.sensor.raw` committed offsets on another tenant's topic
    topic = settings.topic(args.topic) if args.topic else raw_topic(settings, args.kind)
    if args.group is None and args.kind is None:
        raise StreamingError("group: give --group, or --kind for the stream workers' group")
    group = settings.group(args.group) if args.group else default_group(settings, args.kind)
    return group, topic


def _offsets_show(args: argparse.Namespace, settings: config.Settings) -> int:
    from streaming.members import describe_group
    from streaming.offsets import show

    group, topic = _group_topic(args, settings)
    state, members = describe_group(settings, group)
    rows = show(settings, group, topic)
    if args.json:
        print(json.dumps({"group": group, "topic": topic, "state": state, "members": len(members),
                          "member_list": [m.as_dict() for m in members],
                          "partitions": [dict(r.__dict__, lag=r.lag) for r in rows]}, indent=2))
        return 0
    print(f"group {group} ({state}, {len(members)} members) on {topic}")
    for m in members:
        print(f"  member {m.describe()}")
    for r in rows:
        print(f"  p{r.partition}: committed={r.committed} earliest={r.earliest} latest={r.latest} lag={r.lag}")
    if any(m.local and m.alive is False for m in members):
        print("  dead members of this host are removed by `streamlearn offsets reset` (or any worker of the group "
              "when it starts)")
    return 0


def _offsets_reset(args: argparse.Namespace, settings: config.Settings) -> int:
    from streaming.offsets import reset

    group, topic = _group_topic(args, settings)
    target = reset(settings, group, topic, to_timestamp=args.to_timestamp, to_offset=args.to_offset,
                   to_earliest=args.to_earliest, to_latest=args.to_latest)
    if args.json:
        print(json.dumps({"group": group, "topic": topic, "offsets": target}))
    else:
        print(f"group {group} on {topic}: " + " ".join(f"p{p}={o}" for p, o in sorted(target.items())))
        print("note: live workers still resume after the highest offset their feature store holds; "
              "rebuild older ranges with `streamlearn replay`")
    return 0
