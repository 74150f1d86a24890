"""`streamlearn demo [--duration S]`: what `make demo` runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from streaming import config
from streamlearn.argtypes import finite, seconds


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole loop (broker, workers, generators, requesters) with a live "
                                    "dashboard, then write reports/<timestamp>/ with plots")
    p.add_argument("--duration", type=seconds(0.0, 86_400.0, above=True), default=180.0,
                   help="seconds of traffic (default 180)")
    p.add_argument("--weblog-rate", type=finite(0.0, 100_000.0, what="a rate"), default=120.0,
                   help="web-log events/s (default 120)")
    p.add_argument("--sensor-rate", type=finite(0.0, 100_000.0, what="a rate"), default=60.0,
                   help="sensor readings/s (default 60)")
    p.add_argument("--image-rate", type=finite(0.0, 100_000.0, what="a rate"), default=15.0,
                   help="digit images/s (default 15)")
    p.add_argument("--request-rate", type=finite(0.0, 100_000.0, what="a rate"), default=8.0,
                   help="prediction requests/s per model (default 8)")
    p.add_argument("--reports", default="reports", help="report root directory (default reports/)")
    p.add_argument("--broker-port", dest="broker_port", type=int,
                   help=config.flag_help("broker_port"))
    p.add_argument("--no-live", action="store_true", help="print a status line every 10 s instead of the live view")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace, settings: config.Settings) -> int:
    from streamlearn.demo import Rates, run_demo

    rates = Rates(args.weblog_rate, args.sensor_rate, args.image_rate, args.request_rate)
    run_demo(settings, args.duration, rates, Path(args.reports), live=False if args.no_live else None)
    return 0
