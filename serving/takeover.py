"""A serving worker in standby mode: wait warm for its slot, then take it over (docs/STANDBY.md).

Kept apart from the worker's main loop (serving/worker.py): the worker calls :func:`await_slot` before
it makes any Kafka client, and goes on exactly as a restarted worker of that slot once it returns True.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


def await_slot(worker: Any, stop: threading.Event, models: threading.Thread) -> bool:
    """Hold ``worker``'s slot at once when no live process is active in it, else wait as that slot's standby.

    While it waits the model loads and warms up (the worker's models thread: TensorFlow's import, the
    promoted version's load and one checked predict), and the version manager keeps polling the
    registry's files, so a version promoted meanwhile is loaded before the takeover. No consumer or
    producer exists until the lock is held: the standby is no group member, takes no partition,
    fences nobody and runs no fetch loop. The lock can come before the model is warm (the active one
    died early); the worker then waits for the model as a plain restart does. False when ``stop`` is
    set first; a failure of the models thread is raised.
    """
    import kafka  # noqa: F401 - imported now, so the takeover does not wait for it

    from streaming import consumer, producer  # noqa: F401
    from streaming.standby import Standby, claim_or_standby

    claimed = claim_or_standby(worker.settings, worker.group, f"serve-{worker.model}", slot=worker.slot)
    if not isinstance(claimed, Standby):
        worker.lease = claimed
        worker.manager.follow()
        return True
    worker.waiting, worker.role = claimed, "standby"
    log.info("standby for %s slot %d (active pid %s): loading the model, then waiting to take over", worker.model,
             claimed.slot, claimed.active_pid())
    halt = threading.Event()

    def tick() -> None:
        if stop.is_set() or worker._models_error is not None:
            halt.set()
            return
        if models.is_alive() or not worker.manager.wait_ready(0):
            return
        stable = worker.manager.current().stable
        version = stable.version if stable is not None else None
        if claimed.info.get("version") != version or not claimed.info.get("ready"):
            if not claimed.info.get("ready"):
                log.info("standby for %s slot %d is warm (v%s)", worker.model, claimed.slot, version)
            claimed.set_status(ready=True, version=version)

    lease = claimed.wait_active(halt, tick, tick_s=0.5)
    worker.waiting = None
    if lease is None:
        claimed.release()
        if worker._models_error is not None:
            raise worker._models_error
        return False
    if stop.is_set():  # stopping together with the active one (e.g. `up` draining): do not take over
        lease.release(leave=False)
        return False
    worker.lease, worker.slot, worker.role = lease, int(claimed.slot), "active"
    worker.took_over_at = time.monotonic()
    log.info("took over %s slot %d as %s (the active process is gone; model %s)", worker.model, claimed.slot,
             lease.instance_id, "warm" if claimed.info.get("ready") else "still loading")
    worker.manager.check_now()  # a version promoted in the last poll interval is loaded now
    worker.manager.follow()
    return True
