"""The trainer worker: retrain every N new batches or T seconds (or on drift), gate, publish, announce.

One training run (:meth:`Trainer.run_once`):

1. plan the data (new batches since the promoted version + reservoir; newest batch held out);
2. train a candidate warm-started from the promoted model (seeded, fixed epoch budget), logging
   to TensorBoard under a run directory that becomes ``<name>/tensorboard/v<version>``;
3. score candidate and current model on the held-out batch; the gate decides;
4. export into a registry staging directory and publish atomically (the decision, both scores,
   lineage, featurizer and schema ids are in ``metadata.json``);
5. only then: promote (or record the rejection) in ``state.json`` and publish ModelUpdate events
   (CREATED, then PROMOTED or REJECTED) keyed by the model name; apply retention.

A crash at any point leaves the registry consistent: before step 4 nothing is visible; between 4
and 5 the version exists with its decision, and the next run applies a pending decision of the
newest version (:meth:`Trainer.reconcile`) before training again.

With a lease (``lease=``, what ``streamlearn train`` passes) only the holder of the model's lease
trains; every registry write carries its epoch (``fence``), so a trainer that lost the lease
cannot publish or decide a version (streaming/lease.py, docs/LEADER.md).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

from streaming.config import Settings
from streaming.exceptions import FencedError
from streaming.fsutil import pid_alive
from streaming.lease import LeaseKeeper
from streaming.model_registry import ModelRegistry
from streaming.store import BatchInfo, FeatureStore
from trainer.data import plan_data
from trainer.drift import PageHinkley
from trainer.evaluate import Evaluation, fit_and_evaluate
from trainer.exceptions import BatchesGoneError, DamagedBatchError, NotEnoughDataError
from trainer.gate import GateDecision
from trainer.model_cache import ModelCache
from trainer.spec import FeatureInfo, ModelSpec

log = logging.getLogger(__name__)

VERSIONS = Counter("streamlearn_trainer_versions_total", "Model versions created, by gate decision",
                   ["model", "action"])
DRIFT_STAT = Gauge("streamlearn_trainer_drift_statistic", "Page-Hinkley statistic of the live error",
                   ["model"])
DRIFT_ALARMS = Counter("streamlearn_trainer_drift_alarms_total", "Drift alarms that triggered a retrain",
                       ["model"])
DAMAGED = Counter("streamlearn_trainer_damaged_batches_total", "Feature batches set aside because their file no "
                  "longer hashes to their manifest's sha256", ["model"])
KEEP_LAST = 10
#: Damaged batches one run sets aside before it gives up (each costs a re-plan, no training).
MAX_SET_ASIDE_PER_RUN = 50


@dataclass
class RunOutcome:
    version: int
    decision: GateDecision
    path: Path
    metadata: dict[str, Any]


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def _versions_info() -> dict[str, str]:
    import keras
    import tensorflow as tf

    return {"tf_version": tf.__version__, "keras_version": keras.__version__, "numpy_version": np.__version__}


def timer_due(now: float, last_start: float, last_end: float, interval_s: float) -> bool:
    """Whether the retrain timer is due: ``interval_s`` since the last run *started*, and at least half
    an interval of rest since it *ended*.

    Why start-to-start: counted from the end, the cadence was the interval plus a run's length, and
    new data waited on average half of that before a run that could include it (freshness, issue 13).
    Why the rest: a run longer than the interval (a loaded box, a big model) would otherwise be
    followed by the next one at once, and the trainer would take a core for good from the workers
    that share the machine.
    """
    return now - last_start >= interval_s and now - last_end >= interval_s / 2


class Trainer:
    """Trains one model from the feature store into the model registry."""

    def __init__(self, settings: Settings, spec: ModelSpec, *, namespace: str = "live",
                 publisher: Any = None, events: bool = True, keep_last: int = KEEP_LAST,
                 drift: PageHinkley | None = None, lease: LeaseKeeper | None = None) -> None:
        self.settings = settings
        self.spec = spec
        self.name = spec.name
        self.namespace = namespace
        self.registry = ModelRegistry(settings.model_dir)
        self.store = FeatureStore(settings.feature_store)
        self.events = events
        self._publisher = publisher
        self._own_publisher = publisher is None
        self.keep_last = keep_last
        self.drift = drift or PageHinkley(delta=0.05, threshold=20.0, min_instances=50)
        self._drift_checked: set[str] = set()
        #: ids of batches whose file no longer matches its manifest: left out of every plan of this process
        self.set_aside: set[str] = set()
        self._features: FeatureInfo | None = None
        self.lease = lease
        #: the leader epoch this trainer claimed in the registry; every write carries it (None: unfenced)
        self.fence: int | None = None
        #: the compiled model of the previous run, re-used bit-identically (docs/TRAINER_REUSE.md)
        self.model_cache = ModelCache()

    # ------------------------------------------------------------------ helpers
    @property
    def features(self) -> FeatureInfo:
        if self._features is None:
            self._features = self.spec.features()
        return self._features

    def batches(self) -> list[BatchInfo]:
        found = self.store.batches(self.features.kind, self.namespace)
        return [b for b in found if b.batch_id not in self.set_aside] if self.set_aside else found

    def _set_aside(self, exc: DamagedBatchError) -> None:
        """Leave a damaged batch out of this process's plans, loudly. Why: it failed every retrain (and
        every drift check) for as long as it stayed in the training window, a reservoir batch for good."""
        self.set_aside.add(exc.batch_id)
        DAMAGED.labels(self.name).inc()
        log.error("trainer %s: %s. Set aside: training goes on without it (a restarted trainer checks it "
                  "again)", self.name, exc)

    def tensorboard_root(self) -> Path:
        return self.registry.model_dir(self.name) / "tensorboard"

    def publisher(self) -> Any:
        if self._publisher is None:
            from streaming.producer import Publisher

            self._publisher = Publisher(self.settings)
        return self._publisher

    def close(self) -> None:
        if self._own_publisher and self._publisher is not None:
            self._publisher.close()
            self._publisher = None

    def announce(self, version: int, action: str, meta: dict[str, Any]) -> None:
        """Publish a ModelUpdate event (key = model name) and wait for the broker's ack."""
        if not self.events:
            return
        from trainer.events import publish_update, update_record

        gate = meta.get("gate", {})
        reason = gate.get("reason") if action != "CREATED" else f"exported; gate: {gate.get('action')}"
        record = update_record(self.name, version, action, self.registry.model_dir(self.name) / str(version),
                               reason=reason, primary_metric=gate.get("primary_metric"),
                               candidate_score=gate.get("candidate_score"),
                               current_score=gate.get("current_score"))
        publish_update(self.settings, record, self.publisher())

    # ------------------------------------------------------------------ leadership
    def lead(self) -> bool:
        """True when this trainer may train now: it holds the lease and claimed its epoch in the registry.

        Without a lease (library use, tests) always True and unfenced. A newly won epoch is claimed
        before anything is read from the registry, so every later write of the previous leader fails.
        """
        if self.lease is None:
            return True
        epoch = self.lease.epoch()
        if epoch is None:
            if self.fence is not None:
                log.warning("trainer %s: lost the lease (epoch %d); standing by", self.name, self.fence)
            self.fence = None
            return False
        if epoch != self.fence:
            try:
                self.registry.claim_leadership(self.name, epoch)
            except FencedError as exc:
                log.warning("trainer %s: %s", self.name, exc)
                self.fence = None
                return False
            log.info("trainer %s: leader with epoch %d (owner %s)", self.name, epoch, self.lease.lease.owner)
            self.fence = epoch
        return True

    def _check_lead(self) -> None:
        """Fail fast (before a long fit or an export) when the lease was lost; the registry fence is the guard."""
        if self.lease is not None and self.lease.epoch() != self.fence:
            raise FencedError(
                f"fence: trainer {self.name!r} no longer holds the lease of epoch {self.fence}; "
                "it stops this cycle and stands by (docs/LEADER.md)"
            )

    # ------------------------------------------------------------------ one run
    def unseen_batches(self) -> list[BatchInfo]:
        """Batches newer than everything the newest version trained or was evaluated on."""
        latest = self.registry.latest(self.name)
        if latest is None:
            return self.batches()
        state = self.registry.metadata(self.name, latest).get("data_state", {})
        newest = state.get("newest_seen")
        # The store's index answers "after this batch" without listing the whole store (issue 13).
        after = self.store.batches_after(self.features.kind, None if newest is None else str(newest),
                                         int(state.get("newest_seen_created_at_ms", 0) or 0), self.namespace)
        return [b for b in after if b.batch_id not in self.set_aside]

    def require_lead(self) -> None:
        """Raise FencedError unless this trainer leads (see :meth:`lead`): before any registry write,
        :meth:`reconcile` included, which promotes a pending version."""
        if not self.lead():
            holder = self._lease_holder()
            raise FencedError(
                f"lease: trainer {self.name!r} does not hold the model's lease (held by "
                f"{holder.owner if holder else 'nobody'}); only the leader trains. Stop the other trainer or "
                "wait for its lease to expire (docs/LEADER.md)"
            )

    def reconcile(self) -> None:
        """Apply the recorded decision of the newest version if a crash cut it off before step 5.
        The caller leads (:meth:`require_lead`): a pending promotion is a registry write."""
        self.registry.clean_staging(self.name)
        tb_root = self.tensorboard_root()
        if tb_root.is_dir():  # TensorBoard runs of trainers killed mid-training
            for run in tb_root.glob(".run-*"):
                pid = run.name.split("-")[1]
                if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                    shutil.rmtree(run, ignore_errors=True)
        latest = self.registry.latest(self.name)
        if latest is None:
            return
        decided = {e["version"] for e in self.registry.history(self.name)
                   if e.get("action") in ("PROMOTED", "REJECTED", "ROLLED_BACK")}
        if latest in decided:
            return
        meta = self.registry.metadata(self.name, latest)
        gate = meta.get("gate", {})
        if gate.get("promote"):
            self.registry.set_promoted(self.name, latest, str(gate.get("reason")) + " (applied after restart)",
                                       fence=self.fence)
        else:
            self.registry.record(self.name, latest, "REJECTED", str(gate.get("reason")), fence=self.fence,
                                 candidate_score=gate.get("candidate_score"), current_score=gate.get("current_score"))
        log.info("trainer %s: applied pending gate decision of version %s after a restart", self.name, latest)

    def run_once(self, trigger: str = "manual", *, fit: Callable[..., Evaluation] | None = None) -> RunOutcome:
        """Train, gate, publish and announce one candidate; raises NotEnoughDataError when idle.

        ``fit`` replaces :func:`trainer.evaluate.fit_and_evaluate` (same arguments, same result): the
        chief of a distributed run passes its multi-worker fit (trainer.distributed), so it plans,
        publishes and announces through this one path.

        A batch whose file no longer hashes to its manifest's sha256 (:class:`DamagedBatchError`, raised
        while the fit loads its data, before any training or write) is set aside and the run is planned
        again without it; the version's lineage names only the batches it used.
        """
        for _ in range(MAX_SET_ASIDE_PER_RUN):
            try:
                return self._run_once(trigger, fit=fit)
            except DamagedBatchError as exc:
                self._set_aside(exc)
            except BatchesGoneError as exc:  # gc deleted a planned batch: trainer.data raises it per batch
                log.warning("trainer %s: %s; planning again", self.name, exc)
        # one more; a further damaged or deleted batch is this run's error
        return self._run_once(trigger, fit=fit)

    def _run_once(self, trigger: str, *, fit: Callable[..., Evaluation] | None) -> RunOutcome:
        from trainer import model_io
        from trainer.cycle import rejected_repeat, wait_tensorflow, write_marker
        from trainer.training import configure_tensorflow, write_gate_summary

        # Registry and store work first, TensorFlow last: a restarted trainer is at work on its next
        # version while TensorFlow still imports (trainer.cycle).
        self.require_lead()
        self.reconcile()
        features = self.features
        promoted = self.registry.promoted(self.name)
        parent_meta = self.registry.verify(self.name, promoted) if promoted is not None else None
        plan = plan_data(self.spec, self.batches(), parent_meta.get("data_state") if parent_meta else None)
        repeat = rejected_repeat(self.registry, self.name, self.spec.describe(), plan, promoted)
        if repeat is not None:
            raise NotEnoughDataError(f"model {self.name!r}: nothing new since version {repeat} (REJECTED): the same "
                                     "batches, parent and spec would train the same candidate; waiting for new batches")
        parent_dir = self.registry.version_dir(self.name, promoted) if promoted is not None else None
        cycle_started = time.time()
        write_marker(self.settings, self.name, phase="started", trigger=trigger, started_unix_s=cycle_started,
                     train_batches=[b.batch_id for b in plan.train_new],
                     holdout_batches=[b.batch_id for b in plan.holdout],
                     reservoir_batches=[b.batch_id for b in plan.reservoir], parent_version=promoted)
        log.info("trainer %s: cycle started (trigger=%s): %d new batches to train on, %d held out", self.name,
                 trigger, len(plan.train_new), len(plan.holdout))
        wait_tensorflow()
        configure_tensorflow()
        tb_root = self.tensorboard_root()
        run_dir = tb_root / f".run-{os.getpid()}-{secrets.token_hex(4)}"
        started = time.time()
        fit_fn = fit or functools.partial(fit_and_evaluate, cache=self.model_cache)
        ev = fit_fn(self.spec, features, plan, parent_dir=parent_dir, seed=self.spec.seed, log_dir=run_dir)
        staging = self.registry.staging(self.name)
        try:
            model_io.export_saved_model(ev.model, features.n_features, staging)
            meta = self._metadata(ev, plan, promoted, features, trigger, time.time() - started)
            self._check_batches_still_there(plan)
            self._check_lead()
            version = self.registry.publish(self.name, staging, meta, fence=self.fence)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        tb_dir = tb_root / f"v{version}"
        if run_dir.is_dir() and not tb_dir.exists():
            os.rename(run_dir, tb_dir)
        meta = self.registry.metadata(self.name, version)
        decision = ev.decision
        self.announce(version, "CREATED", meta)
        if decision.promote:
            self.registry.set_promoted(self.name, version, decision.reason, fence=self.fence)
        else:
            self.registry.record(self.name, version, "REJECTED", decision.reason, fence=self.fence,
                                 candidate_score=meta["gate"]["candidate_score"],
                                 current_score=meta["gate"]["current_score"])
        self.announce(version, decision.action, meta)
        VERSIONS.labels(self.name, decision.action).inc()
        write_gate_summary(tb_dir, version, meta["gate"])
        deleted = self.registry.apply_retention(self.name, self.keep_last, fence=self.fence)
        for old in deleted:  # TensorBoard runs follow their versions out of the registry
            shutil.rmtree(tb_root / f"v{old}", ignore_errors=True)
        log.info("trainer %s: version %d %s (%s); trigger=%s; retention deleted %s", self.name, version,
                 decision.action, decision.reason, trigger, deleted or "nothing")
        if decision.promote:
            self.drift.reset()
        write_marker(self.settings, self.name, phase="published", trigger=trigger, started_unix_s=cycle_started,
                     version=version, action=decision.action)
        return RunOutcome(version, decision, self.registry.version_dir(self.name, version), meta)

    def _check_batches_still_there(self, plan: Any) -> None:
        """Refuse to publish a version whose lineage names a batch that is gone (``store gc`` ran between
        this cycle's plan and its marker): it could never be reproduced. The run is planned again."""
        gone = [b.batch_id for b in (*plan.train, *plan.holdout) if _gone(b.path)]
        if gone:
            raise BatchesGoneError(f"lineage: {len(gone)} batch(es) this run trained or held out on were deleted "
                                   f"while it ran (e.g. {gone[0]}; `store gc`?); planning again without them",
                                   gone)

    def _metadata(self, ev: Evaluation, plan: Any, parent: int | None, features: FeatureInfo, trigger: str,
                  seconds: float) -> dict[str, Any]:
        from trainer.data import lineage

        spec = self.spec
        lin = lineage(plan, ev.hashes, self.settings.feature_store)
        newest = plan.holdout[-1]
        data_state = dict(plan.data_state)
        data_state.update(newest_seen=newest.batch_id,
                          newest_seen_created_at_ms=int(newest.manifest.get("created_at_ms", 0)))
        gate = ev.decision.to_dict()
        meta: dict[str, Any] = {
            "parent_version": parent,
            "created_at": int(time.time() * 1000),
            "task": spec.task,
            "target": spec.label,  # the label serving's canary judges live errors on
            "class_names": list(spec.class_names) if spec.class_names is not None else None,
            "output_names": list(spec.output_names),
            "primary_metric": spec.primary_metric,
            "direction": spec.direction,
            "featurizer": features.describe(),
            "spec": spec.describe(),
            "seed": spec.seed,
            "trigger": trigger,
            "warm_started": ev.result.warm_started,
            "training": {"rows": ev.train_rows, "eval_rows": ev.eval_rows,
                         "epochs": len(ev.result.history.get("loss", [])) or spec.epochs,
                         "final_loss": ev.result.final_loss, "history": ev.result.history,
                         "seconds": round(seconds, 3)},
            # Everything a report needs per version: candidate, current and baseline on the same
            # held-out rows, the metric, which direction is better, and how many rows decided it.
            "scores": {"metric": spec.primary_metric, "direction": spec.direction, "better": gate["better"],
                       "candidate": gate["candidate_score"], "current": gate["current_score"],
                       "baseline": gate["baseline_score"], "baseline_name": gate["baseline"],
                       "eval_rows": ev.eval_rows, "train_rows": ev.train_rows,
                       "holdout_batches": len(plan.holdout),
                       "margin_vs_current": gate["margin_vs_current"],
                       "margin_vs_baseline": gate["margin_vs_baseline"]},
            "input_range": ev.input_range,
            "gate": gate,
            "reason": gate["reason"],
            "lineage": lin,
            "schema_ids": lin["schema_ids"],
            "data_state": data_state,
            **_versions_info(),
        }
        result: dict[str, Any] = _finite_or_none(meta)
        return result

    # ------------------------------------------------------------------ drift
    def check_drift(self) -> bool:
        """Score the promoted model on batches it has never seen; True when Page-Hinkley alarms."""
        from trainer import model_io
        from trainer.data import labelled, load_batches

        promoted = self.registry.promoted(self.name)
        if promoted is None:
            return False
        unseen = self.unseen_batches()
        # Forget ids that are no longer unseen (trained on since): the set stays bounded by the
        # batches waiting for the next retrain instead of growing with every batch ever written.
        self._drift_checked &= {b.batch_id for b in unseen}
        fresh = [b for b in unseen if b.batch_id not in self._drift_checked]
        if not fresh:
            return False
        meta = self.registry.metadata(self.name, promoted)
        try:
            x, cols, _ = load_batches(self.spec, fresh, self.features.n_features)
        except DamagedBatchError as exc:  # the next poll checks the others again
            self._set_aside(exc)
            return False
        self._drift_checked.update(b.batch_id for b in fresh)
        xs, ys = labelled(self.spec, x, cols)
        if not len(xs):
            return False
        out = model_io.SavedModelPredictor(self.registry.version_dir(self.name, promoted)).predict(xs)
        if self.spec.task == "classification":
            errors = (np.argmax(out, axis=1) != np.argmax(ys, axis=1)).astype(float)
        else:
            ref = meta.get("scores", {}).get("candidate") or float(np.mean(np.abs(ys[:, 0]))) or 1.0
            errors = np.abs(out[:, 0] - ys[:, 0]) / max(float(ref), 1e-9)
        fired = self.drift.update_many(errors.tolist())
        DRIFT_STAT.labels(self.name).set(self.drift.statistic)
        if fired:
            DRIFT_ALARMS.labels(self.name).inc()
            log.warning("trainer %s: drift detected (Page-Hinkley statistic %.3g > %.3g after %d rows); "
                        "retraining now", self.name, self.drift.statistic, self.drift.threshold, self.drift.n)
        return fired

    def _lease_holder(self) -> Any:
        """Who holds the lease now, for the standby's log line; None when unknown or unreadable."""
        if self.lease is None:
            return None
        try:
            return self.lease.lease.current()
        except Exception as exc:  # the lease store unreachable: the line says "another trainer"
            log.debug("trainer %s: cannot read the lease holder: %s", self.name, exc)
            return None

    # ------------------------------------------------------------------ loop
    def run_forever(self, stop: threading.Event, poll_seconds: float = 1.0) -> None:
        """Retrain every ``retrain_every_batches`` new batches, every ``retrain_every_seconds`` or on drift.

        The timer runs from the newest version's creation, not from this process's start, so a restart
        does not wait a fresh interval before training on batches its predecessor left (trainer.cycle).
        """
        from trainer.cycle import prefetch_tensorflow, seconds_since_last_version

        prefetch_tensorflow()
        since = seconds_since_last_version(self.registry, self.name)
        last_attempt = last_end = time.monotonic() - (since if since is not None else 0.0)
        # A run that could not train (no labelled row, too few held-out rows) is not retried on the same
        # batches at every poll: it was, once a second, reloading them and logging "cycle started" each
        # time. ``stuck`` is how many unseen batches it saw; the count trigger waits for more, the timer
        # and drift still fire. A run that failed otherwise backs off (1 s doubling to 60 s).
        stuck: int | None = None
        backoff, not_before = 0.0, 0.0
        said_standby = False
        while not stop.is_set():
            was = self.fence
            try:
                leading = self.lead()
            except Exception as exc:  # the registry unreachable (an S3 outage): was the end of the process
                backoff = min(60.0, max(1.0, backoff * 2))
                log.warning("trainer %s: cannot claim leadership in the model registry (%s); retrying in %.0f s",
                            self.name, exc, backoff)
                stop.wait(backoff)
                continue
            if not leading:  # a standby: the lease keeper takes over when the leader's lease expires
                if not said_standby:  # once per spell: a silent standby could not be told from a hung one
                    said_standby = True
                    holder = self._lease_holder()
                    log.info("trainer %s: standing by; %s leads (epoch %s); this one takes over when its lease "
                             "expires (docs/LEADER.md)", self.name,
                             f"pid {holder.pid} on {holder.host}" if holder else "another trainer",
                             holder.epoch if holder else "?")
                stop.wait(poll_seconds)
                continue
            said_standby = False
            if self.fence != was:  # just took over: continue the predecessor's retrain interval
                try:
                    since = seconds_since_last_version(self.registry, self.name)
                except Exception as exc:
                    log.warning("trainer %s: cannot read the newest version's time (%s); the retrain timer "
                                "starts now", self.name, exc)
                    since = None
                last_attempt = last_end = time.monotonic() - (since if since is not None else 0.0)
            try:
                unseen = self.unseen_batches()
            except Exception:  # e.g. the newest version's metadata.json damaged: was an exit, a crash loop under up
                backoff = min(60.0, max(1.0, backoff * 2))
                log.exception("trainer %s: cannot list the batches not yet trained on; retrying in %.0f s", self.name,
                              backoff)
                stop.wait(backoff)
                continue
            due_count = len(unseen) >= self.settings.retrain_every_batches and (stuck is None or len(unseen) > stuck)
            due_time = bool(unseen) and timer_due(time.monotonic(), last_attempt, last_end,
                                                  self.settings.retrain_every_seconds)
            drift = False
            if not (due_count or due_time):
                try:
                    drift = self.check_drift()
                except Exception:
                    log.exception("trainer %s: drift check failed; continuing on the timer", self.name)
            if (due_count or due_time or drift) and time.monotonic() >= not_before:
                trigger = "drift" if drift else ("batches" if due_count else "timer")
                last_attempt = time.monotonic()
                try:
                    self.run_once(trigger)
                    stuck, backoff = None, 0.0
                except NotEnoughDataError as exc:
                    stuck = len(unseen)
                    log.info("trainer %s: %s (tried again when new batches arrive or on the timer)", self.name, exc)
                except FencedError as exc:  # another trainer took over meanwhile: nothing was published
                    log.warning("trainer %s: %s", self.name, exc)
                    self.fence = None
                except Exception:
                    backoff = min(60.0, max(1.0, backoff * 2))
                    not_before = time.monotonic() + backoff
                    log.exception("trainer %s: training run failed; retrying in %.0f s at the earliest", self.name,
                                  backoff)
                last_end = time.monotonic()
            stop.wait(poll_seconds)


def _gone(path: Any) -> bool:
    """True when a batch file (a local path or an object-storage URL) no longer exists."""
    from streaming.objstore import open_url

    try:
        with open_url(path):
            return False
    except FileNotFoundError:
        return True
