"""`streamlearn up` (the whole platform, supervised) and `streamlearn status` (what runs)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable

from streaming import config
from streamlearn.argtypes import whole


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start broker (unless a bootstrap is configured), registry and every worker, "
                                  "supervised; Ctrl-C/SIGTERM drains in order")
    p.add_argument("--no-gateway", action="store_true", help="do not start the HTTP ingest gateway")
    p.add_argument("--only", help="comma-separated service names (default: all; see `streamlearn status`)")
    p.add_argument("--broker-port", dest="broker_port", type=int,
                   help=config.flag_help("broker_port"))
    p.add_argument("--workers", help=config.flag_help(
        "workers", "GROUP=N with GROUP stream.<kind> or serve.<model>; each group's topic needs at least N "
                   "partitions (STREAMLEARN_PARTITIONS)"))
    p.add_argument("--no-standby", dest="up_standby", action="store_false", default=None,
                   help=config.flag_help("up_standby", "this flag starts no standby"))
    p.add_argument("--metrics-base-port", type=whole(1, 65_000, "a port number"), default=9100,
                   help="first /metrics port (default 9100)")
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
    from streaming.broker import kept_broker
    from streamlearn import preflight, scaling
    from streamlearn.stack import StackBusyError, Supervisor, default_services, hold_stack, stop_orphans

    if getattr(args, "up_standby", None) is not None:
        settings = settings.with_(up_standby=args.up_standby)
    services = default_services(settings, args.metrics_base_port, gateway=not args.no_gateway, registry_http=True,
                                standby=settings.up_standby)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        unknown = wanted - {s.name for s in services}
        if unknown:
            print(f"error: --only: unknown service(s) {sorted(unknown)}; known: {[s.name for s in services]}",
                  file=sys.stderr)
            return 2
        # a server's standby twin comes with it (--only serve-M starts the pair)
        services = [s for s in services if s.name in wanted or scaling.base_name(s.name) in wanted]
    try:  # N processes per group, and never more than the topic has partitions (checked again below)
        workers = scaling.parse_workers(args.workers if args.workers is not None else settings.workers)
        scaling.check_partitions(workers, lambda group: None, settings)
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    services = scaling.expand(services, workers)
    try:
        hold_stack(settings)
    except StackBusyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # A previous stack's workers, left running by a supervisor killed with -9, hold its ports: stopped
    # before the port checks, or the same command left the gateway and registry out as "port in use".
    stop_orphans(settings, {s.name: s.group for s in services})
    checked = preflight.check(settings, services)
    if checked.errors:  # one line per problem, nothing started
        for line in checked.errors:
            print(f"error: {line}", file=sys.stderr)
        print("up: refusing to start; fix the settings above (flags, STREAMLEARN_* variables or the config file)",
              file=sys.stderr)
        return 2
    for line in checked.notes:
        print(f"up: {line}", flush=True)
    services = checked.services
    with kept_broker(settings) as broker:
        print(broker.status.describe())
        prepare(settings)
        try:  # topics made earlier keep their partition count: hold the plan to what exists
            scaling.check_partitions(workers, _partition_counts(settings, workers), settings)
        except config.ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        sup = Supervisor(settings, services)
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        sup.start()
        for s in sup.status():
            print(f"  {s['name']:28} pid {s['pid']:<7} metrics :{s['metrics_port']}  {s['command']}")
        print(f"logs in {sup.log_dir}; Ctrl-C or SIGTERM drains and stops")
        try:  # the broker `up` started is supervised too: restarted should it die (KeptBroker)
            while not done.wait(1.0):
                note = broker.revive()
                if note:
                    print(f"up: {note}", flush=True)
        except KeyboardInterrupt:
            pass
        print("draining: intake, stream workers, trainers and serving, registry ...")
        codes = sup.stop()
        print("stopped: " + ", ".join(f"{k}={v}" for k, v in codes.items()))
    return 0


def _partition_counts(settings: config.Settings, workers: dict[str, int]) -> Callable[[str], int | None]:
    """``group -> partitions of its topic`` as the broker has it now (None where it does not exist)."""
    from streaming.topics import describe
    from streamlearn.scaling import topic_of

    if not workers:
        return lambda group: None
    found = {t["name"]: t["partitions"] or None for t in describe(settings, [topic_of(settings, g) for g in workers])}
    return lambda group: found.get(topic_of(settings, group))


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
    from streaming.broker import EmbeddedBroker, probe
    from streaming.fsutil import pid_alive
    from streamlearn.stack import read_state
    from streamlearn.status import render, tcp_reachable, worker_rows

    print(EmbeddedBroker(settings).status().describe())
    _print_members(settings)
    _print_quarantine(settings)
    state = read_state(settings)
    if state is None:
        print("no stack has run under this STREAMLEARN_HOME")
        return 3
    pid = int(state.get("supervisor_pid", 0))
    alive = bool(pid) and not state.get("stopped") and pid_alive(pid)
    print(f"stack supervisor pid {pid}: {'running' if alive else 'not running'}")
    kafka = tcp_reachable(settings.bootstrap) and probe(settings.bootstrap, timeout_s=2.0) is not None
    if not kafka:
        print(f"  (no Kafka broker answers at {settings.bootstrap}: partitions and lag unknown)")
    print("\n".join(render(worker_rows(settings, state, alive, kafka=kafka))))
    for s in state.get("services", []):
        if s.get("gave_up"):
            print(f"  {s['name']}: not restarted: {s['gave_up']}")
    return 0 if alive else 3


def _print_members(settings: config.Settings) -> None:
    """Group members started on this host (streaming.members), alive or not, and any stuck warning."""
    from streaming.members import local_entries

    entries = local_entries(settings)
    if not entries:
        return
    print("group members started on this host:")
    for e in entries:
        state = "running" if e.get("alive") else "DEAD (killed; its next start takes the slot back)"
        if e.get("state") == "standby":  # a warm standby has no member: it waits for the slot's active process
            if not e.get("alive"):
                continue
            warm = f"warm v{e.get('version')}" if e.get("ready") else "loading the model"
            print(f"  {e.get('role', '?'):28} pid {e.get('pid', '-'):<7} standby    ({warm}) takes over "
                  f"member {e.get('standby_for')} when its process dies")
            continue
        # a dead member's partitions are the last it held: another member may own them now
        held = "partitions" if e.get("alive") else "last held partitions"
        print(f"  {e.get('role', '?'):28} pid {e.get('pid', '-'):<7} {state:10} {held} {e.get('partitions')} "
              f"member {e.get('instance_id')}")
        if e.get("alive") and e.get("warning"):
            print(f"    WARNING: {e['warning']}")
