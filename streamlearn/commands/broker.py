"""`streamlearn broker start|stop|status`: the embedded Kafka-compatible broker."""

from __future__ import annotations

import argparse
import signal
import threading

from streaming import config
from streaming.broker import EmbeddedBroker
from streamlearn.argtypes import seconds


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("broker", help="run the embedded Kafka broker (noida-db)")
    bs = p.add_subparsers(dest="broker_cmd", metavar="ACTION")
    bs.required = True
    start = bs.add_parser("start", help="start the broker in the background (unless a bootstrap is configured)")
    start.add_argument("--port", dest="broker_port", type=int, help=config.flag_help("broker_port"))
    start.add_argument("--foreground", action="store_true", help="stay in the foreground until Ctrl-C")
    start.add_argument("--timeout", type=seconds(0.0, above=True), default=30.0,
                       help="seconds to wait for readiness (default 30)")
    start.set_defaults(func=_start)
    stop = bs.add_parser("stop", help="stop the broker cleanly (it persists its data)")
    stop.set_defaults(func=_stop)
    status = bs.add_parser("status", help="is the broker running, where, with how many topics")
    status.set_defaults(func=_status)


def _start(args: argparse.Namespace, settings: config.Settings) -> int:
    broker = EmbeddedBroker(settings)
    if not settings.embedded:
        print(f"bootstrap {settings.bootstrap} is configured (STREAMLEARN_KAFKA_BOOTSTRAP or config file); "
              "not starting an embedded broker")
        return 0
    status = broker.start(timeout_s=args.timeout, detach=not args.foreground)
    print(status.describe())
    if args.foreground:
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        try:
            done.wait()
        except KeyboardInterrupt:
            pass
        broker.stop()
        print("broker stopped")
    return 0


def _stop(args: argparse.Namespace, settings: config.Settings) -> int:
    if EmbeddedBroker(settings).stop():
        print("broker stopped")
    else:
        print("no embedded broker was running")
    return 0


def _status(args: argparse.Namespace, settings: config.Settings) -> int:
    status = EmbeddedBroker(settings).status()
    print(status.describe())
    return 0 if status.running else 3
