"""`streamlearn store promote <kind> --from <namespace>`: make a rebuilt namespace the live one;
`streamlearn store gc [--dry-run]`: apply the retention limits (docs/STORE.md);
`streamlearn store compact [--kind] [--namespace]`: the Parquet copy that queries read (docs/COLUMNAR.md).

Why under ``store`` and not ``replay``: promotion acts on the feature store and the live group, not on
the topic; ``replay <kind>`` takes the kind as its first word, so ``replay promote`` would be ambiguous;
and any namespace a replay completed can be promoted (also an archived ``replaced-*`` one, to go back).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from schemas.exceptions import StreamlearnError
from streaming import config
from streaming.topics import KINDS
from streamlearn.argtypes import seconds, whole


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("store", help="feature-store namespaces, retention and Parquet copy: promote, gc, compact")
    ssub = s.add_subparsers(dest="store_cmd", metavar="ACTION")
    ssub.required = True
    p = ssub.add_parser(
        "promote", help="swap a namespace written by `streamlearn replay --into NS` in as the live batches and "
                        "move the live group's offsets to its end (refused while stream workers run; a crash "
                        "half-way is finished by running it again or by the next `streamlearn stream`)")
    p.add_argument("kind", choices=sorted(KINDS))
    p.add_argument("--from", dest="source", required=True, metavar="NAMESPACE",
                   help="the namespace a completed replay wrote (its --into)")
    p.add_argument("--group", help="live consumer group (default <prefix>stream.<kind>)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_promote)
    g = ssub.add_parser(
        "gc", help="delete batches past the retention limits, oldest first; never a batch that a version in the "
                   "model registry names in its lineage, nor the newest batch of a partition")
    g.add_argument("--dry-run", action="store_true", help="list what would be deleted and delete nothing")
    g.add_argument("--kind", action="append", choices=sorted(KINDS), help="only this kind (repeatable; default all)")
    g.add_argument("--namespace", default="live", help="store namespace (default live)")
    g.add_argument("--retention-days", type=seconds(0.0, 100 * 365.0), default=None, metavar="DAYS",
                   help=config.flag_help("store_retention_days"))
    g.add_argument("--max-bytes", type=whole(0), default=None, metavar="BYTES",
                   help=config.flag_help("store_max_bytes"))
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=_gc)
    c = ssub.add_parser(
        "compact", help="copy the feature batches not yet compacted (and the prediction topics) into the Parquet "
                        "store that `streamlearn query` and GET /query read; incremental, safe to re-run after a crash")
    c.add_argument("--kind", action="append", help="only this kind (repeatable; default every kind in the store)")
    c.add_argument("--namespace", action="append", help="only this namespace (repeatable; default all)")
    c.add_argument("--model", action="append", help="only this model's predictions (repeatable; default all)")
    c.add_argument("--no-predictions", action="store_true", help="compact feature batches only")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_compact)


def _compact(args: argparse.Namespace, settings: config.Settings) -> int:
    from streaming.columnar import compact_all

    report = compact_all(settings, kinds=args.kind, namespaces=args.namespace, predictions=False)
    if not args.no_predictions:  # features first: they need no broker, and are kept if it is down
        try:
            report.predictions = compact_all(settings, models=args.model, features=False).predictions
        except StreamlearnError:
            _print_compact(args, report)
            raise
    _print_compact(args, report)
    for bad in report.skipped:  # the rest is compacted; these need a hand (the reason says how)
        print(f"error: {bad['reason']}", file=sys.stderr)
    return 1 if report.skipped else 0


def _print_compact(args: argparse.Namespace, report: Any) -> None:
    if args.json:
        print(json.dumps(report.as_dict(), sort_keys=True))
        return
    for f in report.features:
        rebuilt = " (rebuilt: the namespace was replaced)" if f["rebuilt"] else ""
        left_out = f", {len(f['skipped'])} left out (see below)" if f.get("skipped") else ""
        print(f"features {f['namespace']}/{f['kind']}: {f['batches']} batches, {f['rows']} rows, "
              f"{f['files']} files{rebuilt}{left_out}")
    for p in report.predictions:
        if p.get("skipped"):
            print(f"predictions {p['model']}: skipped, {p['skipped']}")
            continue
        print(f"predictions {p['model']}: {p['rows']} rows, {p['files']} files, {p['dead_letters']} dead letters")


def _gc(args: argparse.Namespace, settings: config.Settings) -> int:
    from streaming.retention import collect

    result = collect(settings, dry_run=args.dry_run, kinds=args.kind, namespace=args.namespace,
                     retention_days=args.retention_days, max_bytes=args.max_bytes)
    if args.json:
        print(json.dumps(result.as_dict(), sort_keys=True))
        return 0
    if result.retention_days <= 0 and result.max_bytes <= 0:
        print("retention is off: set --retention-days/--max-bytes or STREAMLEARN_STORE_RETENTION_DAYS/"
              "STREAMLEARN_STORE_MAX_BYTES; nothing deleted")
        return 0
    verb = "would delete" if result.dry_run else "deleted"
    for d in result.deleted:
        print(f"{verb} {d['kind']}/{d['batch_id']} ({d['bytes']} bytes, {d['reason']})")
    print(f"{verb} {len(result.deleted)} batches, {result.freed_bytes} bytes; kept {result.kept_for_lineage} for "
          f"model lineage and {result.kept_newest_of_partition} as the newest of their partition")
    for kind, after in sorted(result.bytes_after.items()):
        over = "  (above --max-bytes: the rest is lineage)" if 0 < result.max_bytes < after else ""
        print(f"{kind}: {result.bytes_before[kind]} -> {after} bytes{over}")
    return 0


def _promote(args: argparse.Namespace, settings: config.Settings) -> int:
    from streaming.promote import promote

    group = settings.group(args.group) if args.group else None
    result = promote(settings, args.kind, args.source, group=group)
    if args.json:
        print(json.dumps(result.as_dict(), sort_keys=True))
        return 0
    if result.already_live:
        print(f"{result.kind}: namespace {result.source!r} is already live (an earlier run of this command finished "
              "it); nothing to do")
        return 0
    if result.rolled_forward:
        print(f"finished an interrupted promotion of {result.kind} from {result.source!r}")
    where = f"; the previous live batches are in namespace {result.archive!r}" if result.archive else ""
    print(f"{result.kind}: namespace {result.source!r} is live{where}")
    offsets = " ".join(f"p{p}={o}" for p, o in sorted(result.offsets.items()))
    print(f"group {result.group} on {result.topic}: {offsets}")
    return 0
