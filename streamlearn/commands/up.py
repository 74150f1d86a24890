"""`streamlearn up` (the whole platform, supervised) and `streamlearn status` (what runs)."""

from __future__ import annotations

import argparse
import signal
import threading

from streaming import config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start broker (unless a bootstrap is configured), registry and every worker, "
                                  "supervised; Ctrl-C/SIGTERM drains in order")
    p.add_argument("--no-gateway", action="store_true", help="do not start the HTTP ingest gateway")
    p.add_argument("--only", help="comma-separated service names (default: all; see `streamlearn status`)")
    p.add_argument("--metrics-base-port", type=int, default=9100, help="first /metrics port (default 9100)")
    p.set_defaults(func=_up)
    s = sub.add_parser("status", help="show the broker and the workers of a running `streamlearn up`/`demo`")
    s.set_defaults(func=_status)


def prepare(settings: config.Settings) -> None:
    """Topics and schemas exist before any worker starts (idempotent)."""
    from schemas.registry import open_registry
    from streaming.topics import ensure_topics
    from streamlearn.commands.schemas import register_builtin

    ensure_topics(settings)
    register_builtin(open_registry(settings.registry_url, settings.registry_dir), settings)


def _up(args: argparse.Namespace, settings: config.Settings) -> int:
    from streaming.broker import running_broker
    from streamlearn.stack import Supervisor, default_services

    with running_broker(settings) as broker:
        print(broker.describe())
        prepare(settings)
        services = default_services(settings, args.metrics_base_port, gateway=not args.no_gateway,
                                    registry_http=True)
        if args.only:
            wanted = {n.strip() for n in args.only.split(",")}
            services = [s for s in services if s.name in wanted]
        sup = Supervisor(settings, services)
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        sup.start()
        for s in sup.status():
            print(f"  {s['name']:28} pid {s['pid']:<7} metrics :{s['metrics_port']}  {s['command']}")
        print(f"logs in {sup.log_dir}; Ctrl-C or SIGTERM drains and stops")
        try:
            done.wait()
        except KeyboardInterrupt:
            pass
        print("draining: intake, stream workers, trainers and serving, registry ...")
        codes = sup.stop()
        print("stopped: " + ", ".join(f"{k}={v}" for k, v in codes.items()))
    return 0


def _print_quarantine(settings: config.Settings) -> None:
    """Feature batches a stream worker moved aside after a broker crash re-used their offsets."""
    from streaming.divergence import quarantined

    notes = quarantined(settings.feature_store)
    if notes:
        print(f"quarantined feature batches: {len(notes)} (their records vanished from the topic; kept for "
              "inspection, no longer read)")
        for n in notes:
            print(f"  {n['namespace']}/{n['kind']}/{n['batch_id']}: {n.get('reason')} (at {n.get('quarantined_at')}, "
                  f"resumed at offset {n.get('resumed_at_offset')}) in {n['path']}")


def _status(args: argparse.Namespace, settings: config.Settings) -> int:
    from streaming.broker import EmbeddedBroker
    from streaming.fsutil import pid_alive
    from streamlearn.stack import read_state

    print(EmbeddedBroker(settings).status().describe())
    _print_quarantine(settings)
    state = read_state(settings)
    if state is None:
        print("no stack has run under this STREAMLEARN_HOME")
        return 3
    pid = int(state.get("supervisor_pid", 0))
    alive = bool(pid) and not state.get("stopped") and pid_alive(pid)
    print(f"stack supervisor pid {pid}: {'running' if alive else 'not running'}")
    for s in state.get("services", []):
        print(f"  {s['name']:28} {s['state']:12} pid {s['pid'] or '-':<7} restarts {s['restarts']:<3} "
              f"up {s['uptime_s']:>7.1f}s metrics :{s['metrics_port']}")
    return 0 if alive else 3
