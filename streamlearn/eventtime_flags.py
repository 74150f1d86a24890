"""The event-time flags every timestamped source shares: ``--backfill``, ``--max-age``, ``--timestamp-unit``,
``--timezone``.

One definition, so ``ingest sensors``, ``ingest weblog``, ``publish`` and ``ingest serve`` spell
and explain them identically; the policy itself is :mod:`streaming.eventtime` (docs/EVENT_TIME.md).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from streaming import config, eventtime


def add_event_time_flags(p: argparse.ArgumentParser, *, unit_setting: str | None = "timestamp_unit",
                         auto: bool = True) -> None:
    """Add the flags; ``unit_setting`` names the setting ``--timestamp-unit`` falls back to (None: no flag)."""
    p.add_argument("--backfill", action="store_const", const=True, default=None,
                   help=config.flag_help("backfill"))
    p.add_argument("--max-age", default=None, metavar="AGE",
                   help=config.flag_help("event_max_age", "with --backfill the default is none"))
    if unit_setting is not None:  # sources that read timestamps (an image's time is its file's)
        p.add_argument("--timezone", default=None, metavar="ZONE", help=config.flag_help("timestamp_timezone"))
        units = [u for u in eventtime.UNITS if auto or u != "auto"]
        p.add_argument("--timestamp-unit", default=None, choices=units,
                       help=config.flag_help(unit_setting, f"auto reads the first {eventtime.AUTO_SAMPLE} values"
                                             if auto else None))


def policy_from_args(args: argparse.Namespace, settings: config.Settings, source: str) -> eventtime.EventTimePolicy:
    """The source's policy (flags over env); a backfill says so on stderr with its run id."""
    pol = eventtime.policy(settings, backfill=getattr(args, "backfill", None),
                           max_age=getattr(args, "max_age", None), source=source,
                           timezone=getattr(args, "timezone", None))
    if pol.backfill:
        print(f"{source}: {pol.describe()}", file=sys.stderr, flush=True)
    return pol


def unit_from_args(args: argparse.Namespace, settings: config.Settings, setting: str = "timestamp_unit") -> str:
    unit: Any = getattr(args, "timestamp_unit", None) or getattr(settings, setting)
    if unit not in eventtime.UNITS:
        raise config.ConfigError(f"setting '{setting}' must be one of {'|'.join(eventtime.UNITS)}, got {unit!r}")
    return str(unit)
