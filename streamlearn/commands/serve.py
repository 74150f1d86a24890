"""`streamlearn serve <model>` (the serving worker) and `streamlearn predict <model> --file F`.

TensorFlow is imported inside the handlers only, so `streamlearn --help` stays fast. This is the
one command line of the serving worker (the former ``python -m serving.worker`` is gone):
:func:`run_serving_worker` owns what belongs to a process (signals, /metrics, the HTTP front end,
the summary line on stdout), :class:`serving.worker.ServingWorker` the consume-predict-produce loop.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import Any

from streaming import config
from streamlearn.argtypes import port_arg, seconds, whole


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="answer a model's prediction-request topic (and optionally HTTP) with hot-swapped versions",
        description="Consume <model>.requests, batch dynamically, predict with the promoted version and "
                    "produce answers to <model>.predictions, exactly once (Kafka transactions) unless "
                    "transactions are off. Follows models.updates and the model registry for new versions.")
    p.add_argument("model", help="model name in the model registry, e.g. weblog_classifier")
    p.add_argument("--http-port", type=port_arg, metavar="P",
                   help="also serve the TensorFlow Serving REST API on this port (0 picks a free one); keys "
                        "with the predict scope come from env STREAMLEARN_KEYS or STREAMLEARN_KEYS_FILE (never "
                        "argv); without a key it binds 127.0.0.1 only")
    p.add_argument("--http-host", dest="serve_http_host", metavar="ADDR",
                   help=config.flag_help("serve_http_host"))
    p.add_argument("--score-stream", metavar="KIND", choices=["weblog", "sensor", "image"],
                   help="instead of requests, score every raw event of KIND (request_id = topic/partition/offset)")
    p.add_argument("--policy", default="latest", metavar="POLICY",
                   help="latest (promoted version; default) | pinned:V | canary:V:SHARE (e.g. canary:4:0.1)")
    p.add_argument("--slot", type=whole(0), default=None, metavar="N",
                   help="worker slot: stable group member and transactional id (default: the lowest slot no live "
                        "process of this host holds, so a restart with the same command takes its old one)")
    p.add_argument("--standby", dest="serve_standby", action="store_true", default=None,
                   help=config.flag_help("serve_standby", "run the same command twice for an active + standby pair; "
                                                          "a restarted process takes whichever role is free"))
    p.add_argument("--max-batch", type=int, dest="serve_max_batch", metavar="N",
                   help=config.flag_help("serve_max_batch"))
    p.add_argument("--max-wait-ms", type=float, dest="serve_max_wait_ms", metavar="MS",
                   help=config.flag_help("serve_max_wait_ms"))
    p.add_argument("--poll-seconds", type=float, dest="serve_poll_s", metavar="S",
                   help=config.flag_help("serve_poll_s"))
    p.add_argument("--watchdog-s", type=float, dest="watchdog_s", metavar="S", help=config.flag_help("watchdog_s"))
    p.add_argument("--metrics-port", type=int, metavar="P",
                   help=config.flag_help("metrics_port"))
    p.add_argument("--at-least-once", action="store_true",
                   help=config.flag_help("transactions", "this flag turns them off and de-duplicates by request "
                                                         "id instead"))
    p.set_defaults(func=_serve)

    q = sub.add_parser("predict", help="publish prediction requests from a file and print their answers",
                       description="Each line of --file is a raw event object, {\"features\": [...]} or a full "
                                   "PredictionRequest. Answers (read_committed from <model>.predictions, matched "
                                   "by request id) are printed as JSON lines in request order.")
    q.add_argument("model")
    q.add_argument("--file", required=True, metavar="PATH", help="JSON-lines requests file ('-' for stdin)")
    q.add_argument("--timeout", type=seconds(0.0, above=True), default=30.0, metavar="S",
                   help="seconds to wait for every answer (default 30)")
    q.set_defaults(func=_predict)


def _serve(args: argparse.Namespace, settings: config.Settings) -> int:
    from serving.tfimport import start_background_import

    start_background_import()  # overlaps the worker's imports and Kafka setup (restart-to-answer time)
    from serving.policy import Policy

    Policy.parse(args.policy)  # a bad policy fails before anything starts
    changes = {k: getattr(args, k) for k in ("serve_max_batch", "serve_max_wait_ms", "serve_http_host", "serve_poll_s",
                                             "serve_standby", "watchdog_s")
               if getattr(args, k) is not None}
    if args.at_least_once:
        changes["transactions"] = False
    if changes:
        settings = settings.with_(**changes)
    return run_serving_worker(settings, args.model, policy=args.policy, score_stream=args.score_stream,
                              slot=args.slot, http_port=args.http_port)


def run_serving_worker(settings: config.Settings, model: str, *, policy: str = "latest",
                       score_stream: str | None = None, slot: int | None = None, http_port: int | None = None) -> int:
    """Run a worker (and the HTTP front end when ``http_port`` is set) until SIGTERM or Ctrl-C."""
    import signal

    from serving import metrics
    from serving.policy import Policy
    from serving.worker import ServingWorker
    from streaming.watchdog import from_settings

    servers: list[Any] = []

    def on_active() -> None:
        """/metrics and HTTP start once this process holds its slot: a warm standby binds no port, so an
        active + standby pair can run the same command (same ports) on one host."""
        metrics.start_metrics(settings)
        if http_port is not None:
            from serving.http_api import start_http

            servers.append(start_http(worker.manager, worker.featurization, model, http_port,
                                      host=settings.serve_http_host, settings=settings))

    worker = ServingWorker(settings, model, policy=Policy.parse(policy), score_stream=score_stream, slot=slot,
                           on_active=on_active)
    worker.watchdog = from_settings(settings.watchdog_s, f"serve {model}")  # armed when the batch loop starts
    if threading.current_thread() is threading.main_thread():  # SIGTERM: finish the batch, then stop
        signal.signal(signal.SIGTERM, lambda *_: worker.stop_event.set())
    try:
        worker.run()
    except KeyboardInterrupt:
        pass
    finally:
        for server in servers:
            server.should_exit = True
    print(json.dumps({"model": model, "answered": worker.answered, "batches": worker.batches}))
    return 0


def _predict(args: argparse.Namespace, settings: config.Settings) -> int:
    from serving.client import predict, read_requests_file

    if args.file == "-":
        requests = read_requests_file(args.model, sys.stdin.buffer)
    else:
        try:
            fh = open(args.file, "rb")  # noqa: SIM115 - bytes: a line that is not UTF-8 is named, not a traceback
        except OSError as exc:
            print(f"error: --file {args.file}: cannot read ({exc.strerror or exc})", file=sys.stderr)
            return 2
        with fh:
            requests = read_requests_file(args.model, fh)
    if not requests:
        print(f"error: --file {args.file} holds no requests", file=sys.stderr)
        return 2
    for answer in predict(settings, args.model, requests, timeout_s=args.timeout):
        print(json.dumps(answer))
    return 0
