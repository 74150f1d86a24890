"""Shared benchmark plumbing: a broker for the run, isolated topics, JSON reports.

Every figure is a ratio against a baseline measured in the same run on the same machine, so
the numbers mean something on a laptop, a 2-core CI box or a server alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from streaming import config
from streaming.broker import EmbeddedBroker, free_port
from streaming.topics import ensure_topics

REPORT_DIR = Path("reports") / "bench"


@contextlib.contextmanager
def bench_settings(**overrides: Any) -> Iterator[config.Settings]:
    """Settings on the configured broker, or on a fresh embedded broker in a temp home."""
    home = Path(tempfile.mkdtemp(prefix="streamlearn-bench-"))
    base = config.load({"home": home})
    broker = None
    if base.embedded:
        base = config.load({"home": home, "broker_port": free_port()})
        broker = EmbeddedBroker(base)
        broker.start(detach=False)
    try:
        yield fresh(base, **overrides)
    finally:
        if broker is not None:
            broker.stop()


def child_env(settings: config.Settings, **extra: str) -> dict[str, str]:
    """The environment of a worker subprocess that sees exactly ``settings``: this process's variables
    without any ``STREAMLEARN_*`` (a developer's own would leak into the run), ``settings`` as
    variables (the one place that reads them, ``streaming.config``, reads them back), then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLEARN_")}
    env.update(config.to_env(settings))
    env.update(extra)
    return env


def fresh(settings: config.Settings, **overrides: Any) -> config.Settings:
    """Same broker, new topic prefix and home: a benchmark never reads another one's data."""
    home = Path(tempfile.mkdtemp(prefix="streamlearn-bench-"))
    s = config.load({"home": home, "kafka_bootstrap": settings.bootstrap,
                     "topic_prefix": f"bench{uuid.uuid4().hex[:8]}.", "metrics_port": -1, **overrides})
    ensure_topics(s)
    return s


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    """Run ``fn`` (which returns the number of items it processed); return (seconds, items)."""
    start = time.perf_counter()
    n = fn()
    return time.perf_counter() - start, n


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def write_report(name: str, data: dict[str, Any]) -> Path:
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    path = REPORT_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path
