"""``streamlearn ingest serve``: run the HTTP ingest gateway, and a background server for tests/benchmarks.

The sources helper's ``streamlearn/commands/ingest.py`` calls :func:`register_serve` with its
``ingest`` subparser group, so this module owns the flags and the handler of ``serve`` only.
"""

from __future__ import annotations

import argparse
import logging
import threading
from types import TracebackType
from typing import Any

from streaming import config
from streaming.config import ConfigError, Settings

log = logging.getLogger(__name__)


def register_serve(ingest_subparsers: Any) -> None:
    """Add ``serve`` to the ``streamlearn ingest`` subcommands."""
    from ingest.gateway.limits import GatewayLimits

    d = GatewayLimits()
    p = ingest_subparsers.add_parser(
        "serve", help="run the HTTP ingest gateway (POST /ingest/{kind}, /ingest/images; /docs)",
        description="HTTP ingest gateway: events in, acked by Kafka, per-record status out. Keys (bearer "
                    "tokens) come from env STREAMLEARN_KEYS or the file named by STREAMLEARN_KEYS_FILE "
                    "(name:token[:scopes[:tenant]], scope ingest or ingest.<kind>), or the legacy "
                    "STREAMLEARN_INGEST_TOKENS (name:token or token); never from the command line. Limits are "
                    "per process; the idempotency window is in memory (see docs/SECURITY.md).")
    p.add_argument("--port", dest="ingest_port", type=int, default=None,
                   help=config.flag_help("ingest_port"))
    p.add_argument("--host", dest="ingest_host", default=None,
                   help=config.flag_help("ingest_host"))
    p.add_argument("--max-body-bytes", dest="ingest_max_body_bytes", type=int, default=None,
                   help=config.flag_help("ingest_max_body_bytes"))
    p.add_argument("--max-records", type=int, default=d.max_records_per_request,
                   help=f"events per request (default {d.max_records_per_request})")
    p.add_argument("--rate", dest="ingest_rate", type=float, default=None,
                   help=config.flag_help("ingest_rate"))
    p.add_argument("--burst", dest="ingest_burst", type=float, default=None,
                   help=config.flag_help("ingest_burst"))
    p.add_argument("--tenant-rate", dest="ingest_tenant_rate", type=float, default=None,
                   help=config.flag_help("ingest_tenant_rate"))
    p.add_argument("--max-in-flight", dest="ingest_max_in_flight", type=int, default=None,
                   help=config.flag_help("ingest_max_in_flight"))
    p.add_argument("--ack-timeout", type=float, default=d.ack_timeout_s,
                   help=f"seconds to wait for Kafka acks (default {d.ack_timeout_s:g})")
    p.add_argument("--idempotency-seed-minutes", type=float, default=0.0,
                   help="at start-up, remember the event ids of the last N minutes of the raw topics so a "
                        "restart does not republish resent events (default 0: off)")
    p.add_argument("--access-log", action="store_true", help="log one line per request (never headers)")
    # Event time (docs/EVENT_TIME.md); spelled as in streamlearn/eventtime_flags.py.
    p.add_argument("--backfill", action="store_const", const=True, default=None,
                   help=config.flag_help("backfill"))
    p.add_argument("--max-age", default=None, metavar="AGE",
                   help=config.flag_help("event_max_age"))
    p.add_argument("--timestamp-unit", dest="ingest_timestamp_unit", default=None,
                   choices=["s", "ms", "us", "ns", "iso"],
                   help=config.flag_help("ingest_timestamp_unit"))
    p.add_argument("--timezone", default=None, metavar="ZONE", help=config.flag_help("timestamp_timezone"))
    p.set_defaults(func=serve)


def limits_from_args(args: argparse.Namespace, settings: Settings) -> Any:
    """Limits from the flags, falling back to the settings (env vars, config file)."""
    from ingest.gateway.limits import GatewayLimits

    def pick(name: str) -> Any:
        value = getattr(args, name, None)
        return getattr(settings, name) if value is None else value

    return GatewayLimits(max_body_bytes=pick("ingest_max_body_bytes"), max_records_per_request=args.max_records,
                         rate_records_per_s=pick("ingest_rate"), burst_records=pick("ingest_burst"),
                         max_in_flight=pick("ingest_max_in_flight"), ack_timeout_s=args.ack_timeout,
                         tenant_rate_records_per_s=pick("ingest_tenant_rate"))


def serve(args: argparse.Namespace, settings: Settings) -> int:
    """Handler of ``streamlearn ingest serve``: make sure the topics exist, then serve until Ctrl-C."""
    import uvicorn

    from ingest.gateway.auth import gateway_keys
    from ingest.gateway.routes import create_app
    from schemas.httpguard import server_config
    from streaming.topics import KINDS, dead_letter_topic, declared_topics, ensure_topics, raw_topic

    keys = gateway_keys(settings)
    if not keys:
        raise ConfigError("no key for the gateway: set STREAMLEARN_KEYS (or STREAMLEARN_KEYS_FILE, or the legacy "
                          "STREAMLEARN_INGEST_TOKENS) to name:token[:scopes[:tenant]] entries so clients can "
                          "authenticate (the gateway refuses to run open)")
    for tenant in ("", *sorted(keys.tenants)):
        scoped = settings if not tenant else settings.with_(topic_prefix=f"{settings.topic_prefix}{tenant}.")
        wanted = {raw_topic(scoped, k) for k in KINDS} | {dead_letter_topic(scoped, k) for k in KINDS}
        ensure_topics(scoped, [s for s in declared_topics(scoped) if s.name in wanted])
    from ingest.gateway.records import TimeRules

    if args.ingest_timestamp_unit:
        settings = settings.with_(ingest_timestamp_unit=args.ingest_timestamp_unit)
    rules = TimeRules.from_settings(settings, backfill=args.backfill, max_age=args.max_age, timezone=args.timezone)
    log.info("event time: %s, numeric timestamps in %s", rules.policy.describe(), rules.unit)
    app = create_app(settings, limits=limits_from_args(args, settings), time_rules=rules)
    host = args.ingest_host or settings.ingest_host
    _recover_journal(app, settings)
    if args.idempotency_seed_minutes > 0:
        seeded = app.state.gateway.seed_idempotency(args.idempotency_seed_minutes * 60)
        log.info("idempotency window seeded with %d event ids from the last %g min", seeded,
                 args.idempotency_seed_minutes)
    log.info("ingest gateway on http://%s:%d (docs at /docs), %d key(s)", host, settings.ingest_port,
             len(app.state.gateway.tokens))
    threading.Thread(target=_warm, args=(app, settings), name="gateway-warm", daemon=True).start()
    uvicorn.Server(server_config(app, host=host, port=settings.ingest_port, log_level=settings.log_level.lower(),
                                 access_log=args.access_log)).run()
    return 0


def _recover_journal(app: Any, settings: Settings) -> None:
    """Journal every send of this gateway (one journal per port), and first send again what the broker
    lost of an earlier run's acknowledged records (streaming/ackjournal.py). Before the port is bound:
    no request is answered until the records acknowledged by the crashed run are back on the topics."""
    from streaming.ackjournal import attach_and_recover, journal_dir

    done = attach_and_recover(app.state.gateway.publisher, journal_dir(settings.state_dir, settings.ingest_port))
    if done and done["journaled"]:
        log.log(logging.WARNING if done["resent"] else logging.INFO,
                "journal of the last run: %d records, %d sent again (the rest were on the topics%s)",
                done["journaled"], done["resent"], f", {done['gone']} for deleted topics" if done["gone"] else "")


def _warm(app: Any, settings: Settings) -> None:
    """Fetch what the first request of each kind would wait for (schema ids, topic metadata) while uvicorn
    starts: after a restart the first events are answered sooner (benchmarks/bench_restart). Advisory:
    a failure here only leaves the work to the first request, which reports its own errors."""
    from streaming.topics import KINDS, raw_topic

    publisher = app.state.gateway.publisher
    for kind, record_name in KINDS.items():
        topic = raw_topic(settings, kind)
        try:
            publisher.serializer(topic, record_name)
            publisher.producer.partitions_for(topic)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.debug("gateway warm-up of %s: %s", topic, exc)


class BackgroundServer:
    """The app under uvicorn in a daemon thread on a free port (tests, benchmarks, the demo).

    The listening socket is bound before the thread starts, so there is no race for the port,
    and ``url`` is valid as soon as ``__enter__`` returns.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", start_timeout_s: float = 20.0) -> None:
        from schemas.httpguard import ThreadedServer

        self._threaded = ThreadedServer(app, host=host, name="gateway-server", lifespan="on")
        self.host, self.port, self.url = host, self._threaded.port, self._threaded.url
        self._start_timeout_s = start_timeout_s

    def __enter__(self) -> BackgroundServer:
        if not self._threaded.start(self._start_timeout_s):
            raise RuntimeError(f"gateway server did not start within {self._start_timeout_s} s")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._threaded.stop(30)
