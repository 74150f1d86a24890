"""Prometheus metrics of the streaming layer and the one helper that serves ``/metrics``.

Label sets are bounded on purpose (a label value per partition, per kind, per error class of a
fixed list): an unbounded label such as a key or a message would grow memory without limit.
Error classes outside :data:`DEAD_LETTER_REASONS` are reported as ``other``.
"""

from __future__ import annotations

import errno
import logging
import threading
from typing import Any

from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

#: Dead-letter reasons that get their own label value; everything else is "other".
DEAD_LETTER_REASONS: frozenset[str] = frozenset({
    "BadMagicByteError", "ShortPayloadError", "UnknownSchemaIdError", "TruncatedRecordError",
    "FramingError", "SchemaError", "SchemaNotFoundError", "RecordValidationError",
    "FeatureValidationError", "RecordTooLargeError",
})
#: Partition label values above this are folded into "other" (bounded cardinality).
MAX_PARTITION_LABELS = 256

_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000)
_AGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_LATENCY_BUCKETS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.05, 0.1, 0.5)

RECORDS = Counter("streamlearn_stream_records_total",
                  "Records consumed by stream workers (rate() gives records/s)", ["kind", "outcome"])
LAG = Gauge("streamlearn_stream_lag_records",
            "Records between a partition's end offset and the worker's position", ["kind", "partition"])
BATCH_SIZE = Histogram("streamlearn_stream_batch_records", "Records per persisted micro-batch", ["kind"],
                       buckets=_SIZE_BUCKETS)
BATCH_AGE = Histogram("streamlearn_stream_batch_age_seconds",
                      "Time from a batch's first record to its persistence", ["kind"], buckets=_AGE_BUCKETS)
DEAD_LETTERS = Counter("streamlearn_stream_dead_letters_total", "Records sent to the dead-letter topic",
                       ["kind", "reason"])
FEATURIZE_SECONDS = Histogram("streamlearn_stream_featurize_seconds", "Featurize latency per record",
                              ["kind"], buckets=_LATENCY_BUCKETS)
BACKPRESSURE = Gauge("streamlearn_stream_backpressure", "1 while the worker is paused because the store "
                     "cannot be written", ["kind"])
BATCHES = Counter("streamlearn_stream_batches_total", "Micro-batches persisted", ["kind"])
LOOP_BEAT_AGE = Gauge("streamlearn_loop_beat_age_seconds", "Seconds since the worker's loop last came round "
                      "(0 while it waits for the broker); the watchdog ends the process past its limit",
                      ["worker"])

_lock = threading.Lock()
_servers: dict[int, Any] = {}
log = logging.getLogger(__name__)


def reason_label(error_class: str) -> str:
    """The bounded label value of a dead-letter reason."""
    return error_class if error_class in DEAD_LETTER_REASONS else "other"


def partition_label(partition: int) -> str:
    return str(partition) if 0 <= partition < MAX_PARTITION_LABELS else "other"


def start_metrics_server(port: int, addr: str = "127.0.0.1",
                         registry: CollectorRegistry = DEFAULT_REGISTRY) -> int:
    """Serve ``/metrics``; returns the bound port. ``0`` picks a free port, ``-1`` disables (returns -1).

    Binds loopback unless ``addr`` (``settings.metrics_host``, env STREAMLEARN_METRICS_HOST) says
    otherwise: metrics name topics, models and tenants, which is more than an outsider should see.

    Idempotent per requested non-zero port within a process (several components may ask).

    A requested port that another process holds (a second ``up`` on the same host, a race with
    ``up``'s own free-port check) does not stop the worker: metrics are an aid, the stream is the
    job. The server then binds a free port and a WARNING names both ports and the setting, so a
    Prometheus scrape config can be fixed; the bound port is what this returns.
    """
    if port < 0:
        return -1
    with _lock:
        if port and port in _servers:
            return port
        taken = False
        try:
            result = start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            if not port or exc.errno != errno.EADDRINUSE:
                raise
            taken, result = True, start_http_server(0, addr=addr, registry=registry)
        bound = int(result[0].server_port) if isinstance(result, tuple) else port
        if taken:
            log.warning("metrics port %d on %s is in use by another process; /metrics is served on port %d "
                        "instead. Give this worker a free port (STREAMLEARN_METRICS_PORT, or `up "
                        "--metrics-base-port`) if Prometheus scrapes a fixed one", port, addr, bound)
        _servers[bound] = result
        return bound
