"""`streamlearn store promote <kind> --from <namespace>`: make a rebuilt namespace the live one.

Why under ``store`` and not ``replay``: promotion acts on the feature store and the live group, not on
the topic; ``replay <kind>`` takes the kind as its first word, so ``replay promote`` would be ambiguous;
and any namespace a replay completed can be promoted (also an archived ``replaced-*`` one, to go back).
"""

from __future__ import annotations

import argparse
import json

from streaming import config
from streaming.topics import KINDS


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("store", help="feature-store namespaces: promote a rebuilt namespace to live")
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


def _promote(args: argparse.Namespace, settings: config.Settings) -> int:
    from streaming.promote import promote

    group = settings.group(args.group) if args.group else None
    result = promote(settings, args.kind, args.source, group=group)
    if args.json:
        print(json.dumps(result.as_dict(), sort_keys=True))
        return 0
    if result.rolled_forward:
        print(f"finished an interrupted promotion of {result.kind} from {result.source!r}")
    where = f"; the previous live batches are in namespace {result.archive!r}" if result.archive else ""
    print(f"{result.kind}: namespace {result.source!r} is live{where}")
    offsets = " ".join(f"p{p}={o}" for p, o in sorted(result.offsets.items()))
    print(f"group {result.group} on {result.topic}: {offsets}")
    return 0
