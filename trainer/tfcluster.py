"""TensorFlow cluster plumbing of a distributed run: bounded rendezvous, peer checks, readable causes.

Split from :mod:`trainer.multiworker` because it touches TensorFlow internals (guarded: on a
TensorFlow without them the run still works, with TensorFlow's defaults) and a watcher process,
neither of which is about training.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

from trainer.distributed import Cluster

log = logging.getLogger(__name__)

#: seconds between TensorFlow's peer health checks (its default, 30 s, lets a dead peer block longer).
HEALTH_INTERVAL_S = 5
#: a worker that sent no heartbeat for this long is dead: the others abort (TensorFlow's default is 10 s).
HEARTBEAT_TIMEOUT_S = 10
#: the rendezvous watchdog fires this long after distributed_timeout_s (TensorFlow's own checks go first).
RENDEZVOUS_GRACE_S = 2.0


_WATCHER = """
import os, select, signal, sys
parent, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ready, _, _ = select.select([sys.stdin], [], [], seconds)
if not ready:
    sys.stderr.write("error: " + message + "\\n")
    sys.stderr.flush()
    os.kill(parent, signal.SIGKILL)
"""


class Watchdog:
    """Kill this process with ``message`` unless :meth:`set` is called within ``seconds``.

    Why a separate process: TensorFlow 2.21 waits for every worker to register inside a C++ call
    that holds the GIL, and neither the coordination service's registration timeout nor a Python
    thread or signal handler ends it, so a worker whose peer never started would block for good.
    A tiny watcher process (no imports) waits on a pipe; :meth:`set` closes it; when the time is up
    it prints the message and sends SIGKILL (exit status 137). Only a command-line worker arms it;
    nothing has been written by then (the chief publishes after training).
    """

    def __init__(self, seconds: float, message: str, armed: bool) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        if armed:
            self._proc = subprocess.Popen([sys.executable, "-S", "-c", _WATCHER, str(os.getpid()), str(seconds),
                                           message], stdin=subprocess.PIPE)

    def set(self) -> None:
        if self._proc is not None and self._proc.stdin is not None:
            self._proc.stdin.close()
            self._proc.wait(timeout=30)
            self._proc = None


def configure_coordination(cluster: Cluster, timeout_s: float) -> None:
    """Bound how long the coordination service waits for every worker to register (TF >= 2.13 uses it).

    The strategy configures TensorFlow's coordination service itself when none is configured, with a
    registration timeout of "TensorFlow's default" (an hour or more): a worker that never started kept
    the others waiting that long. This configures the same service (same leader, same jobs) with
    ``distributed_timeout_s``, before the strategy, through the eager context (TensorFlow-internal,
    guarded: without it the run works with TensorFlow's defaults).
    """
    try:
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        from tensorflow.python.eager import context
    except ImportError:  # pragma: no cover - layout of another TensorFlow version
        log.warning("cannot bound the cluster registration: TensorFlow's coordination service module moved")
        return
    ctx = context.context()
    if getattr(ctx, "coordination_service", None) is not None:
        return
    ctx.configure_coordination_service(
        service_type="standalone", service_leader="/job:worker/replica:0/task:0",
        cluster_register_timeout_in_ms=int(timeout_s * 1000),
        heartbeat_timeout_in_ms=HEARTBEAT_TIMEOUT_S * 1000,
        coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name="worker", num_tasks=cluster.size)])


_CAUSE = re.compile(r"unhealthy|unavailable|deadline|timed out|timeout|abort|crash|connect|refused", re.I)


def cause(exc: BaseException) -> str:
    """The line of a TensorFlow error that says what happened (its first line is often "Graph execution error")."""
    lines = [ln.strip() for ln in (getattr(exc, "message", None) or str(exc)).splitlines() if ln.strip()]
    line = next((ln for ln in lines if _CAUSE.search(ln)), lines[0] if lines else "")
    return f"{type(exc).__name__}: {line[:300]}"


def tune_health_check(initial_timeout_s: int) -> None:
    """Bound the strategy's first rendezvous and check peers more often (TensorFlow's class attributes).

    These are private knobs of ``CollectiveAllReduceExtended`` (TF 2.x; TensorFlow's own multi-worker
    tests set them the same way). The initial timeout defaults to 0 = wait forever, which turned a
    worker that never started into a chief blocked for good. When a TensorFlow version drops them
    the run still works, with TensorFlow's defaults.
    """
    try:
        from tensorflow.python.distribute import collective_all_reduce_strategy as car
    except ImportError:  # pragma: no cover - layout of another TensorFlow version
        log.warning("cannot bound the cluster rendezvous: TensorFlow's collective strategy module moved")
        return
    ext = car.CollectiveAllReduceExtended
    for name, value in (("_check_health_initial_timeout", initial_timeout_s),
                        ("_check_health_interval", HEALTH_INTERVAL_S)):
        if hasattr(ext, name):
            setattr(ext, name, value)
        else:  # pragma: no cover
            log.warning("TensorFlow's CollectiveAllReduceExtended has no %s; keeping its default", name)
