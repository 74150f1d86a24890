"""Which model versions are served, and hot swapping between them.

A background thread follows the model-updates topic (and polls the registry as a fallback),
loads a new version off the serving path (verify sha256 manifest, load, warm up on recorded real
inputs) and then swaps an immutable :class:`Snapshot` reference. The Kafka loop reads the reference
once per batch, so a batch is computed entirely by the version(s) of one snapshot, and the old
version answers until the new one is ready. A version that fails to load is never served; it is
retried with exponential backoff a bounded number of times, then given up on (until the registry
names a different version).

One writer at a time: the loader thread (swaps), the Kafka loop and the label joiner (canary
rollbacks) all replace the snapshot, so every replacement happens under ``_swap_lock`` and only if
the snapshot is still the one the change was computed from. A swap computed before a concurrent
rollback is recomputed on the rolled-back snapshot, so a rollback can never be undone.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from serving import metrics
from serving.exceptions import ModelLoadError, NoModelVersionError
from serving.model import LoadedVersion, load_version
from serving.policy import CanaryJudge, Policy, canary_bucket
from streaming.config import Settings
from streaming.kafka_security import kafka_security
from streaming.model_registry import STATE_FILE, ModelRegistry

log = logging.getLogger(__name__)

CANARY_NONE, CANARY_ROUTING, CANARY_ROLLED_BACK = 0, 1, 2
#: an unchanged registry is still reconciled in full every this many polls (a stat that missed a write)
FULL_CHECK_EVERY = 10


@dataclass(frozen=True)
class Snapshot:
    """What answers right now. Never mutated: a swap replaces the whole object."""

    stable: LoadedVersion | None = None
    candidate: LoadedVersion | None = None
    share: float = 0.0
    canary_state: int = CANARY_NONE

    def route(self, request_id: str) -> LoadedVersion:
        """The version that answers ``request_id`` (stable hash decides the canary share)."""
        if self.candidate is not None and self.canary_state == CANARY_ROUTING \
                and canary_bucket(request_id) < self.share:
            return self.candidate
        if self.stable is None:
            raise NoModelVersionError("no model version is loaded yet; publish and promote one")
        return self.stable

    def versions(self) -> list[LoadedVersion]:
        return [v for v in (self.stable, self.candidate) if v is not None]


@dataclass
class _Attempts:
    count: int = 0
    next_at: float = 0.0
    last_error: str = ""
    given_up: bool = False


@dataclass
class LoadStats:
    """Counts for tests and benchmarks (the same numbers go to Prometheus)."""

    loads: int = 0
    failures: int = 0
    swaps: int = 0
    failed_versions: set[int] = field(default_factory=set)
    ready_versions: list[int] = field(default_factory=list)
    fallbacks: int = 0
    polls: int = 0  # wake-ups of the loader thread
    reconciles: int = 0  # of them, those that read the registry (the others found state.json unchanged)


class VersionManager:
    """Loads versions in the background per the policy and swaps them in atomically."""

    def __init__(self, settings: Settings, model: str, policy: Policy | None = None, *,
                 registry: ModelRegistry | None = None, poll_interval_s: float = 1.0,
                 max_attempts: int = 3, backoff_s: float = 0.5, follow_updates: bool = True,
                 judge: CanaryJudge | None = None, recent_inputs: int = 32) -> None:
        self.settings = settings
        self.model = model
        self.policy = policy or Policy()
        self.registry = registry or ModelRegistry(settings.model_dir)
        self.poll_interval_s = poll_interval_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.follow_updates = follow_updates
        self.judge = judge or CanaryJudge()
        self.stats = LoadStats()
        self._snapshot = Snapshot()
        self._attempts: dict[int, _Attempts] = {}
        self._recent: deque[np.ndarray] = deque(maxlen=recent_inputs)
        self._recent_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._updates_thread: threading.Thread | None = None
        self._rolled_back: set[int] = set()
        self._swap_lock = threading.Lock()  # every write of _snapshot holds it (see module doc)

    # -- reading ------------------------------------------------------------------------------
    def current(self) -> Snapshot:
        """The snapshot to use for one whole batch (an atomic reference read)."""
        return self._snapshot

    def by_version(self, version: int) -> LoadedVersion:
        for lv in self._snapshot.versions():
            if lv.version == version:
                return lv
        raise NoModelVersionError(
            f"version: {self.model} version {version} is not loaded here; loaded: "
            f"{[v.version for v in self._snapshot.versions()]}")

    def by_label(self, label: str) -> LoadedVersion:
        snap = self._snapshot
        canary = snap.candidate if snap.canary_state == CANARY_ROUTING else None
        lv = {"stable": snap.stable, "canary": canary}.get(label)
        if lv is None:
            raise NoModelVersionError(
                f"label: {label!r} names no loaded version of {self.model}; use 'stable' or 'canary' "
                "(canary only while a canary policy routes)")
        return lv

    def load_failure(self, version: int) -> tuple[int, bool, str]:
        """(failed attempts, given up, last error) of a version; (0, False, "") if it never failed."""
        att = self._attempts.get(version)
        return (att.count, att.given_up, att.last_error) if att else (0, False, "")

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until a stable version answers (True) or the timeout passes (False)."""
        return self._ready.wait(timeout_s)

    def remember_input(self, x: np.ndarray) -> None:
        """Keep a real input for warming up the next version (ring buffer)."""
        with self._recent_lock:
            self._recent.append(x)

    def recent_inputs(self) -> list[np.ndarray]:
        with self._recent_lock:
            return list(self._recent)

    # -- canary -------------------------------------------------------------------------------
    def record_error(self, version: int, error: float) -> None:
        """Feed a live error (prediction joined with its label); may roll the canary back."""
        self.judge.record(version, error)
        snap = self._snapshot
        if snap.canary_state != CANARY_ROUTING or snap.stable is None or snap.candidate is None:
            return
        if version not in (snap.stable.version, snap.candidate.version):
            return
        reason = self.judge.verdict(snap.stable.version, snap.candidate.version)
        if reason is not None:
            self._rollback(snap, reason)

    def _rollback(self, snap: Snapshot, reason: str) -> None:
        assert snap.candidate is not None
        with self._swap_lock:
            cur = self._snapshot
            if cur.canary_state != CANARY_ROUTING or cur.candidate is None \
                    or cur.candidate.version != snap.candidate.version:
                return  # already rolled back, or another candidate routes now
            self._rolled_back.add(cur.candidate.version)
            self._snapshot = snap = replace(cur, canary_state=CANARY_ROLLED_BACK)
        metrics.ROLLBACKS.labels(self.model).inc()
        metrics.CANARY_STATE.labels(self.model).set(CANARY_ROLLED_BACK)
        metrics.SERVED_VERSION.labels(self.model, "candidate").set(-1)
        log.warning("canary rollback of %s: %s; all requests go to v%s", self.model, reason,
                    snap.stable.version if snap.stable else None)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> VersionManager:
        self._thread = threading.Thread(target=self._run, name=f"versions-{self.model}", daemon=True)
        self._thread.start()
        if self.follow_updates and self._updates_thread is None:
            self._updates_thread = threading.Thread(target=self._follow_updates, daemon=True,
                                                    name=f"model-updates-{self.model}")
            self._updates_thread.start()
        return self

    def follow(self) -> None:
        """Start following models.updates now (a warm standby taking over: it polled the registry only)."""
        if self._updates_thread is None and not self._stop.is_set():
            self.follow_updates = True
            self._updates_thread = threading.Thread(target=self._follow_updates, daemon=True,
                                                    name=f"model-updates-{self.model}")
            self._updates_thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in (self._thread, self._updates_thread):
            if t is not None:
                t.join(timeout=10)

    def check_now(self) -> None:
        """Ask the loader thread to look at the registry now (e.g. a ModelUpdate arrived)."""
        self._wake.set()

    # -- loader thread -------------------------------------------------------------------------
    def _targets(self) -> tuple[int | None, int | None]:
        """(stable version wanted, candidate version wanted) per the policy and the registry."""
        if self.policy.mode == "pinned":
            return self.policy.version, None
        promoted = self.registry.promoted(self.model)
        if self.policy.mode == "canary":
            cand = self.policy.version
            if cand == promoted or cand in self._rolled_back:
                cand = None
            return promoted, cand
        return promoted, None

    def _registry_mark(self) -> tuple[int, int, int] | None:
        """(inode, size, mtime) of the model's state.json, which every promotion and rollback rewrites."""
        try:
            st = os.stat(self.registry.model_dir(self.model) / STATE_FILE)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _run(self) -> None:
        """Reconcile on every wake-up (a ModelUpdate, a rollback) and, between them, once per poll
        interval only when the registry's state file changed.

        Why: an idle serving worker used to parse the whole state.json (its history grows with every
        version) once a second to learn that nothing changed; one ``stat`` says the same (docs/IDLE.md).
        A full reconcile still runs every ``FULL_CHECK_EVERY`` polls, while a load is being retried,
        while nothing serves yet, and after any change of the snapshot, so a write the stat missed (a
        coarse mtime on a network file system) costs at most that many intervals, never a version.
        """
        woken, mark, snap, skipped = True, None, None, 0
        while not self._stop.is_set():
            self.stats.polls += 1
            now_mark = self._registry_mark()
            unchanged = (not woken and now_mark is not None and now_mark == mark and self._snapshot is snap
                         and snap is not None and snap.stable is not None and not self._retrying())
            if unchanged and skipped < FULL_CHECK_EVERY - 1:
                skipped += 1
            else:
                skipped = 0
                self.stats.reconciles += 1
                try:
                    self._reconcile()
                    mark, snap = now_mark, self._snapshot  # the mark read before: a write meanwhile shows next time
                except Exception:  # never let the loader thread die; the old version keeps serving
                    log.exception("version reconcile of %s failed; retrying", self.model)
                    mark = None
            woken = self._wake.wait(self._next_wait())
            self._wake.clear()

    def _retrying(self) -> bool:
        return any(not a.given_up and a.count for a in self._attempts.values())

    def _next_wait(self) -> float:
        now = time.monotonic()
        pending = [a.next_at - now for a in self._attempts.values() if not a.given_up and a.count]
        return max(0.01, min([self.poll_interval_s, *pending]))

    def _reconcile(self) -> None:
        loaded: dict[int, LoadedVersion | None] = {}
        for _ in range(5):  # recompute when a rollback replaced the snapshot while versions loaded
            if self._reconcile_once(loaded):
                return

    def _load_once(self, version: int, loaded: dict[int, LoadedVersion | None]) -> LoadedVersion | None:
        if version not in loaded:
            loaded[version] = self._try_load(version)
        return loaded[version]

    def _reconcile_once(self, loaded: dict[int, LoadedVersion | None]) -> bool:
        """One attempt; False when the snapshot changed under it (the caller recomputes)."""
        want_stable, want_cand = self._targets()
        snap = self._snapshot
        stable = snap.stable
        if want_stable is not None and (stable is None or stable.version != want_stable):
            stable = self._load_once(want_stable, loaded) or stable
            if stable is None and self.policy.mode != "pinned" and self._given_up(want_stable):
                stable = self._fallback(want_stable, loaded)
        cand = snap.candidate
        if want_cand is None:
            cand = None if snap.canary_state != CANARY_ROLLED_BACK else cand
        elif cand is None or cand.version != want_cand:
            cand = self._load_once(want_cand, loaded)
        if stable is snap.stable and cand is snap.candidate:
            return True
        state = snap.canary_state
        if cand is not None and cand is not snap.candidate:
            state = CANARY_ROUTING
        elif cand is None:
            state = CANARY_NONE
        new = Snapshot(stable, cand, self.policy.share, state)
        swapped = stable is not snap.stable
        with self._swap_lock:
            if self._snapshot is not snap:
                return False  # a rollback (or another writer) came first: recompute on its snapshot
            self._snapshot = new  # the atomic swap: the next batch uses it
        if swapped and stable is not None:
            self.stats.swaps += 1
            self.stats.ready_versions.append(stable.version)
            if snap.stable is not None:
                metrics.SWAPS.labels(self.model).inc()
            metrics.SERVED_VERSION.labels(self.model, "stable").set(stable.version)
            log.info("%s now serves v%d (was %s)", self.model, stable.version,
                     snap.stable.version if snap.stable else None)
        if cand is not None:
            self.stats.ready_versions.append(cand.version)
        metrics.SERVED_VERSION.labels(self.model, "candidate").set(
            cand.version if cand is not None and state == CANARY_ROUTING else -1)
        metrics.CANARY_STATE.labels(self.model).set(state)
        if new.stable is not None:
            self._ready.set()
        return True

    def _given_up(self, version: int) -> bool:
        att = self._attempts.get(version)
        return att is not None and att.given_up

    def _fallback(self, failed: int, loaded: dict[int, LoadedVersion | None]) -> LoadedVersion | None:
        """Nothing serves yet and the promoted version cannot be loaded (a worker started after a
        damaged version was promoted): serve the newest *previously promoted* version that loads.

        Why previously promoted and not simply older: those passed the gate or an operator's choice;
        a rejected candidate never answers. It serves until a loadable version is promoted (the
        reconcile keeps the promoted one as its target and swaps when it can).
        """
        stack = [int(v) for v in self.registry.state(self.model).get("promoted_stack", [])]
        for version in reversed(stack):
            if version == failed:
                continue
            lv = self._load_once(version, loaded)
            if lv is not None:
                log.warning("%s: the promoted v%d cannot be loaded; serving the previously promoted v%d until a "
                            "loadable version is promoted (`streamlearn models promote` or a retrain)",
                            self.model, failed, version)
                self.stats.fallbacks += 1
                return lv
        return None

    def _try_load(self, version: int) -> LoadedVersion | None:
        att = self._attempts.setdefault(version, _Attempts())
        if att.given_up or time.monotonic() < att.next_at:
            return None
        started = time.monotonic()
        try:
            lv = load_version(self.registry, self.model, version, self.recent_inputs())
        except ModelLoadError as exc:
            att.count += 1
            att.last_error = str(exc)
            att.next_at = time.monotonic() + self.backoff_s * 2 ** (att.count - 1)
            att.given_up = att.count >= self.max_attempts
            self.stats.failures += 1
            self.stats.failed_versions.add(version)
            metrics.LOAD_FAILURES.labels(self.model).inc()
            log.error("%s (attempt %d/%d%s)", exc, att.count, self.max_attempts,
                      "; giving up on this version" if att.given_up else "")
            return None
        self.stats.loads += 1
        self._attempts.pop(version, None)
        seconds = time.monotonic() - started
        metrics.LOAD_SECONDS.labels(self.model).observe(seconds)
        log.info("%s v%d verified, loaded and warmed up in %.3f s", self.model, version, seconds)
        return lv

    # -- model updates follower -----------------------------------------------------------------
    def _follow_updates(self) -> None:
        """Wake the loader when a ModelUpdate for our model arrives (the registry poll is the fallback).

        Only the key (the model name) is read, so an update in a schema this worker does not know
        still triggers a registry check instead of an error.
        """
        from kafka import KafkaConsumer, TopicPartition

        from streaming.consumer import IdlePoller
        from streaming.topics import model_updates_topic

        topic = model_updates_topic(self.settings)
        consumer = None
        poller = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = KafkaConsumer(bootstrap_servers=self.settings.bootstrap, enable_auto_commit=False,
                                             isolation_level="read_committed", **kafka_security(self.settings))
                    parts = consumer.partitions_for_topic(topic)
                    if not parts:
                        consumer.close()
                        consumer = None
                        self._stop.wait(self.poll_interval_s)
                        continue
                    tps = [TopicPartition(topic, p) for p in sorted(parts)]
                    consumer.assign(tps)
                    consumer.seek_to_end(*tps)
                    poller = IdlePoller(consumer, max_idle_s=0.5)  # registry polling backs this up anyway
                assert poller is not None
                batch = poller.poll(timeout_ms=500)
                if any(r.key == self.model.encode() for recs in batch.values() for r in recs):
                    self.check_now()
            except Exception as exc:
                log.warning("model-updates follower: %s; relying on registry polling", exc)
                if consumer is not None:
                    consumer.close()
                if poller is not None:
                    poller.close()
                consumer = poller = None
                self._stop.wait(self.poll_interval_s)
        if consumer is not None:
            consumer.close()
        if poller is not None:
            poller.close()
