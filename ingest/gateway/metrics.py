"""Prometheus metrics of the ingest gateway and the ASGI middleware that counts requests.

Why a registry per app instead of the global one: tests and benchmarks build several gateways in one
process, and the global registry refuses a second metric of the same name. Labels are bounded
(route templates, status codes, kinds, outcomes) and never carry tokens or principal names.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ingest.gateway.errors import PayloadTooLargeError
from schemas.httpguard import GuardError, StatusCounting


class GatewayMetrics:
    """Prometheus metrics of one app (own registry, so several apps can live in one process).

    Labels are bounded: route templates, status codes, kinds. Never tokens or principal names.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("streamlearn_gateway_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.records = Counter("streamlearn_gateway_records", "Records by kind and outcome",
                               ["kind", "status"], registry=self.registry)
        self.tenant_records = Counter("streamlearn_gateway_tenant_records",
                                      "Records by tenant (bounded: configured tenants, else 'other'), kind "
                                      "and outcome", ["tenant", "kind", "status"], registry=self.registry)
        self.in_flight = Gauge("streamlearn_gateway_in_flight_records",
                               "Records sent to Kafka and not yet acknowledged", registry=self.registry)
        self.ack_latency = Histogram("streamlearn_gateway_ack_latency_seconds",
                                     "Seconds from send to Kafka acknowledgement, per record", ["kind"],
                                     buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 30),
                                     registry=self.registry)


class RequestMetrics(StatusCounting):
    """Requests counted by route template and status (bounded labels), in the gateway's registry."""

    def __init__(self, app: Any, metrics: GatewayMetrics) -> None:
        super().__init__(app, lambda route, status: metrics.requests.labels(route=route, status=str(status)).inc(),
                         (PayloadTooLargeError, GuardError))
