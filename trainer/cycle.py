"""What a restarted periodic trainer needs to be working again at once: TensorFlow imported in the
background, the retrain timer carried over from the registry, and a cycle marker others can read.

Why: importing TensorFlow takes 10-20 s on a small shared box, more than the whole 5 s restart goal
(docs/RECOVERY.md). A cycle does not need TensorFlow until it fits the candidate: reconciling the
registry, reading the store and planning the data (which batches it trains and holds out on) are
plain numpy and file work. So the import starts in a background thread when the worker starts, the
cycle does its own work meanwhile, and only the fit waits for the import.

The timer ("retrain every T seconds") used to start with the process, so a worker restarted with
unseen batches waited a whole interval before training again. It now runs from the newest version's
``created_at`` in the registry: a restart continues the interval its predecessor was in.

The cycle marker (``STATE_DIR/trainer/<model>.json``, replaced atomically) records the pid, the
trigger, the batches the cycle trains and holds out on, and its phase (``started`` -> ``published``
with the version). ``benchmarks/bench_restart`` reads it as the trainer's "processing again" signal,
and it tells an operator what a trainer that has not published for a while is doing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from streaming.config import Settings
from streaming.model_registry import ModelRegistry

log = logging.getLogger(__name__)

_IMPORT_LOCK = threading.Lock()
_IMPORT_THREAD: threading.Thread | None = None


def prefetch_tensorflow() -> None:
    """Start importing and configuring TensorFlow in a daemon thread (once per process)."""
    global _IMPORT_THREAD

    def _run() -> None:
        started = time.monotonic()
        try:
            from trainer.training import configure_tensorflow

            configure_tensorflow()
        except Exception as exc:  # the fit imports it again in the caller's thread and raises there
            log.warning("background TensorFlow import failed: %s", exc)
            return
        log.info("TensorFlow ready after %.1f s (imported in the background)", time.monotonic() - started)

    with _IMPORT_LOCK:
        if _IMPORT_THREAD is None:
            _IMPORT_THREAD = threading.Thread(target=_run, name="tensorflow-import", daemon=True)
            _IMPORT_THREAD.start()


def wait_tensorflow() -> None:
    """Wait for a background import started by :func:`prefetch_tensorflow` (no-op when none runs).

    Why join instead of importing right away: two threads importing the same large package at once
    only serialize on its module lock, but waiting here keeps the import in one thread, which is
    simpler to reason about.
    """
    thread = _IMPORT_THREAD
    if thread is not None and thread is not threading.current_thread():
        thread.join()


def seconds_since_last_version(registry: ModelRegistry, name: str) -> float | None:
    """Wall-clock seconds since the newest version of ``name`` was created; None when there is none."""
    try:
        latest = registry.latest(name)
        if latest is None:
            return None
        created = registry.metadata(name, latest).get("created_at")
    except Exception as exc:  # a registry being written: the timer starts with the process instead
        log.debug("no last version time for %s: %s", name, exc)
        return None
    if not isinstance(created, (int, float)):
        return None
    return max(0.0, time.time() - float(created) / 1000.0)


def marker_path(settings: Settings, name: str) -> Path:
    return settings.state_dir / "trainer" / f"{name}.json"


def write_marker(settings: Settings, name: str, **fields: Any) -> None:
    """Replace the cycle marker of ``name`` (advisory: a write failure is logged, never raised)."""
    path = marker_path(settings, name)
    data = {"model": name, "pid": os.getpid(), "updated_unix_s": time.time(), **fields}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("trainer cycle marker %s not written: %s", path, exc)


def read_marker(settings: Settings, name: str) -> dict[str, Any] | None:
    """The last cycle marker of ``name``; None when there is none or it cannot be read."""
    try:
        data = json.loads(marker_path(settings, name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def rejected_repeat(registry: ModelRegistry, name: str, spec_doc: dict[str, Any], plan: Any,
                    promoted: int | None) -> int | None:
    """The newest version when this run would only repeat it: REJECTED, trained from the same parent
    with the same spec on exactly the same batches (ids, roles and bytes). Training is deterministic, so
    the run would publish a copy of that candidate and reject it again. ``train --once`` from cron did
    that on every run, and the copies pushed real history out of the kept versions; the periodic loop
    never did (it waits for batches newer than the newest version)."""
    latest = registry.latest(name)
    if latest is None or latest == promoted:
        return None
    if not any(e.get("version") == latest and e.get("action") == "REJECTED" for e in registry.history(name)):
        return None
    meta = registry.metadata(name, latest)
    if meta.get("parent_version") != promoted or meta.get("spec") != json.loads(json.dumps(spec_doc)):
        return None
    planned = sorted((b.batch_id, role, str(b.manifest.get("sha256"))) for role, group in
                     (("reservoir", plan.reservoir), ("train", plan.train_new), ("holdout", plan.holdout))
                     for b in group)
    recorded = sorted((str(e.get("batch_id")), str(e.get("role")), str(e.get("sha256")))
                      for e in meta.get("lineage", {}).get("batches", []))
    return latest if planned and planned == recorded else None
