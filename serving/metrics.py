"""Prometheus metrics of the serving worker.

Why module-level objects: prometheus_client registers each metric once per process in its default
registry; workers, the HTTP front end and tests in one process share them. Labels are bounded
(model name, version, outcome, source) -- never request ids.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram

from streaming.config import Settings

log = logging.getLogger(__name__)

REQUESTS = Counter("streamlearn_serving_requests_total",
                   "Requests answered (rate() gives requests/s), by outcome ok|error",
                   ["model", "outcome", "source"])
DUPLICATES = Counter("streamlearn_serving_duplicates_total",
                     "Requests skipped because their request id was answered recently (at-least-once mode)",
                     ["model"])
BATCH_SIZE = Histogram("streamlearn_serving_batch_size", "Requests per model call", ["model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
LATENCY = Histogram("streamlearn_serving_latency_seconds",
                    "Request timestamp to prediction produced, seconds", ["model"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
SERVED_VERSION = Gauge("streamlearn_serving_version", "Model version served, by role stable|candidate",
                       ["model", "role"])
LOAD_FAILURES = Counter("streamlearn_serving_load_failures_total",
                        "Model versions that failed verification, loading or warm-up", ["model"])
LOAD_SECONDS = Histogram("streamlearn_serving_load_seconds",
                         "Seconds to verify, load and warm up a version (part of the replica version skew bound)",
                         ["model"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
SWAPS = Counter("streamlearn_serving_swaps_total", "Hot swaps of the served version", ["model"])
CANARY_STATE = Gauge("streamlearn_serving_canary_state",
                     "0 = no canary, 1 = canary routing, 2 = rolled back", ["model"])
ROLLBACKS = Counter("streamlearn_serving_canary_rollbacks_total", "Automatic canary rollbacks", ["model"])


def start_metrics(settings: Settings) -> int | None:
    """Serve /metrics on ``settings.metrics_port`` (0: a free port, -1: off); returns the port.

    Goes through ``streaming.metrics.start_metrics_server`` so every worker of the platform exposes
    metrics the same way (and one process never starts two servers on one port).
    """
    from streaming.metrics import start_metrics_server

    port = start_metrics_server(settings.metrics_port, settings.metrics_host)
    if port < 0:
        return None
    log.info("serving metrics on http://%s:%d/metrics", settings.metrics_host, port)
    return port
