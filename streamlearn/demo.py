"""`streamlearn demo`: the whole loop on one machine, watched live, summarized with plots.

= ``streamlearn up`` (broker unless configured, registry, gateway, a stream worker per kind, a
trainer and a server per model, supervised) + the demo generators of all three kinds + one
prediction requester per model, with a live terminal dashboard. At the end the workers are drained
in order and ``reports/<timestamp>/`` receives ``summary.json`` and PNG plots.

Generators publish at a steady pace with event times close to the wall clock (never ahead of
it: see ``_events``), so windows, retrain timers and latency figures mean what they say.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming.broker import free_port, running_broker
from streaming.config import Settings
from streaming.jsoncodec import to_json
from streaming.polling import poll_until
from streaming.producer import Publisher
from streaming.topics import MODELS, requests_topic
from streamlearn.commands.up import prepare
from streamlearn.observe import Observer

log = logging.getLogger(__name__)


@dataclass
class Rates:
    weblog: float = 120.0
    sensor: float = 60.0
    image: float = 15.0
    requests: float = 8.0  # per model


def _events(kind: str, seed: int, start_ms: int) -> Iterator[dict[str, Any]]:
    """Endless deterministic events of one kind; event time keeps moving forward across rounds."""
    from ingest.generators import digits, web_traffic
    from ingest.sensors import generate

    round_ = 0
    next_ms = start_ms
    while True:
        s = seed + 1000 * round_
        if kind == "weblog":
            source = web_traffic(5000, seed=s, start_ms=next_ms)
        elif kind == "sensor":
            source = generate(5000, n_sensors=20, seed=s, start_ms=next_ms, interval_ms=1000)
        else:
            source = digits(seed=s, start_ms=next_ms)
        last = next_ms
        for event in source:
            if kind == "image":
                event["image_id"] = f"{event['image_id']}-{round_}"
            last = max(last, int(event["timestamp"]))
            # The generators' own spacing runs ahead of the pace the demo publishes at (sensor 3x,
            # weblog 6x, image 15x); an event time is never later than the wall clock, so every
            # featurizer accepts it whenever it runs (the shared 5-minute future window).
            event["timestamp"] = min(int(event["timestamp"]), time.time_ns() // 1_000_000)
            yield event
        next_ms = last + 1000
        round_ += 1


class Paced(threading.Thread):
    """Publish from an iterator at ``rate`` records/s until stopped; counts what Kafka acked."""

    def __init__(self, name: str, rate: float, send: Any, source: Iterator[dict[str, Any]]) -> None:
        super().__init__(name=name, daemon=True)
        self.rate, self.send, self.source = rate, send, source
        self.stop_event = threading.Event()
        self.sent = 0
        self.errors = 0

    def run(self) -> None:
        wait_ready = getattr(self.send, "wait_ready", None)
        if wait_ready is not None and not wait_ready(self.stop_event):
            return
        started = time.monotonic()
        for record in self.source:
            if self.stop_event.is_set():
                return
            try:
                self.send(record)
                self.sent += 1
            except Exception as exc:  # noqa: BLE001 - keep the demo running; the reason is logged
                self.errors += 1
                log.warning("%s: %s", self.name, exc)
            ahead = self.sent / self.rate - (time.monotonic() - started)
            if ahead > 0:
                self.stop_event.wait(ahead)  # pacing, not waiting for an event


class GatewayPoster:
    """Sends events through the HTTP ingest gateway, as an outside service would."""

    def __init__(self, port: int, token: str, kind: str) -> None:
        import httpx

        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0,
                                   headers={"Authorization": f"Bearer {token}"})
        self.kind = kind
        self.port = port

    def wait_ready(self, stop: threading.Event, timeout_s: float = 120.0) -> bool:
        """Wait for the gateway to answer /healthz: an expected start-up wait, logged once at INFO.

        Without it every paced event failed with "not reachable yet" until the gateway started.
        """
        import httpx

        def healthy() -> bool:
            try:
                return self.client.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        if healthy():
            return True
        log.info("waiting for the ingest gateway on port %d to start (up to %.0f s)", self.port, timeout_s)
        t0 = time.monotonic()
        ok = bool(poll_until(healthy, timeout_s, interval_s=0.2, stop=stop))
        if ok:
            log.info("ingest gateway answered after %.1f s", time.monotonic() - t0)
        elif not stop.is_set():
            log.warning("ingest gateway on port %d did not answer within %.0f s; sending anyway", self.port,
                        timeout_s)
            return True
        return ok

    def __call__(self, record: dict[str, Any]) -> None:
        import httpx

        try:
            resp = self.client.post(f"/ingest/{self.kind}", content=to_json(record),
                                    headers={"Content-Type": "application/json"})
        except httpx.TransportError as exc:  # the gateway is still starting (or restarting)
            raise ConnectionError(f"gateway not reachable yet: {exc}") from exc
        if resp.status_code >= 300:
            raise RuntimeError(f"gateway answered {resp.status_code}: {resp.text[:200]}")


def _request_source(model: str, kind: str, seed: int) -> Iterator[dict[str, Any]]:
    """Prediction requests carrying raw events the models never trained on (another seed)."""
    for event in _events(kind, seed, int(time.time() * 1000)):
        yield {"request_id": uuid.uuid4().hex, "model": model, "timestamp": int(time.time() * 1000),
               "event_json": to_json(event), "features": None, "reply_topic": None}


def run_demo(settings: Settings, duration: float, rates: Rates | None = None, report_root: Path = Path("reports"),
             live: bool | None = None) -> Path:
    """Run the demo for ``duration`` seconds; returns the report directory."""
    from streamlearn.dashboard import Dashboard
    from streamlearn.report import write_report
    from streamlearn.stack import Supervisor, default_services

    rates = rates or Rates()
    started_wall = time.time()
    with running_broker(settings) as broker:
        log.info("%s", broker.describe())
        prepare(settings)  # topics and schemas before any worker starts
        services = default_services(settings, base_metrics_port=free_port(), gateway=True)
        token = secrets.token_hex(16)
        gateway_port = free_port()
        for svc in services:  # free ports: the demo must not collide with anything running
            svc.metrics_port = free_port() if svc.metrics_port is not None else None
            if svc.name == "gateway":
                svc.metrics_port = gateway_port  # /metrics is served on the gateway's own port
                svc.env["STREAMLEARN_INGEST_PORT"] = str(gateway_port)
                svc.env["STREAMLEARN_INGEST_TOKENS"] = f"demo:{token}"
        sup = Supervisor(settings, services)
        observer = Observer(settings)
        publisher = Publisher(settings)
        now_ms = int(time.time() * 1000)
        generators = [
            Paced("weblog", rates.weblog, lambda r: publisher.publish("weblog", r), _events("weblog", 1, now_ms)),
            Paced("sensor", rates.sensor, lambda r: publisher.publish("sensor", r),
                  _events("sensor", 2, now_ms - 3_600_000)),
            Paced("image", rates.image, lambda r: publisher.publish("image", r), _events("image", 3, now_ms)),
            Paced("gateway-weblog", 5.0, GatewayPoster(gateway_port, token, "weblog"), _events("weblog", 4, now_ms)),
        ]
        requesters = [
            Paced(f"requests-{model}", rates.requests,
                  lambda r, m=model: publisher.publish_to(requests_topic(settings, m), "PredictionRequest", r),
                  _request_source(model, kind, 100 + i))
            for i, (model, kind) in enumerate(MODELS.items())
        ]
        sup.start()
        observer.follow_predictions()
        for g in generators + requesters:
            g.start()
        dashboard = Dashboard(observer, sup, generators, requesters, duration, live=live)
        try:
            dashboard.run(until=time.monotonic() + duration)
        except KeyboardInterrupt:
            log.warning("interrupted: draining and writing the report")
        traffic_stopped = time.time()
        for g in generators + requesters:
            g.stop_event.set()
        for g in generators + requesters:
            g.join(timeout=10)
        publisher.flush(timeout=30)
        observer.sample()
        codes = sup.stop()
        observer.sample()
        report = write_report(settings, observer, sup, generators, requesters, codes, started_wall, report_root,
                              traffic_stopped=traffic_stopped)
        observer.close()
        publisher.close()
        dashboard.print_summary(report)
    return report
