"""Background compaction: new feature batches and predictions become queryable without a command.

Every ``api_compact_interval_s`` the control API calls ``streaming.query.compact_all`` for the
platform's store and for each configured tenant's (``requests.tenant_settings``). It is advisory
work: an error is logged and counted (``streamlearn_api_compactions_total{outcome="error"}``) and
the next round tries again; it never stops the API from serving. Without the query engine installed
it logs that once and stops.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter

from streaming.config import Settings
from streamlearn.api.requests import tenant_settings

log = logging.getLogger(__name__)


class Compactor:
    """A daemon thread that compacts every ``interval_s`` until :meth:`stop`."""

    def __init__(self, settings: Settings, tenants: Iterable[str], interval_s: float,
                 registry: CollectorRegistry) -> None:
        self.settings, self.tenants, self.interval_s = settings, ("", *sorted(tenants)), interval_s
        self.rounds = Counter("streamlearn_api_compactions_total",
                              "Compactions of the columnar store by the control API, by outcome",
                              ["outcome"], registry=registry)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-compact", daemon=True)

    def start(self) -> Compactor:
        if self.interval_s > 0:
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def run_once(self) -> bool:
        """One round over every tenant; False when the query engine is not installed."""
        try:
            engine = importlib.import_module("streaming.query")
        except ImportError as exc:
            log.info("no columnar query engine (%s): background compaction is off", exc)
            return False
        for tenant in self.tenants:
            if self._stop.is_set():
                break
            try:
                report = engine.compact_all(tenant_settings(self.settings, tenant))
            except Exception as exc:  # noqa: BLE001 - advisory work: log, count, try again next round
                self.rounds.labels("error").inc()
                log.warning("compaction for tenant %r failed: %s: %s", tenant or "default", type(exc).__name__, exc)
                continue
            self.rounds.labels("ok").inc()
            log.debug("compaction for tenant %r: %s", tenant or "default", report)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.run_once() or self._stop.wait(self.interval_s):
                return
