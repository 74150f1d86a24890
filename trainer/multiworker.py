"""One candidate trained by several processes under ``tf.distribute.MultiWorkerMirroredStrategy``.

``streamlearn train MODEL --once --distributed`` runs this on every host of a ``TF_CONFIG`` cluster
(docs/DISTRIBUTED.md). Roles (:mod:`trainer.distributed` has the cluster, shard and agreement rules):

* **chief (worker 0)** applies a pending gate decision, then runs the normal
  :meth:`trainer.worker.Trainer.run_once` with :meth:`MultiWorkerFit.fit` as its fit: the same plan,
  gate, export, publish, promote and announce as a single-process trainer (and whatever guards that
  path, such as a trainer lease). It reads the whole training window once (lineage sha256s, the
  cold-start ``adapt``, the input range and the gate's baseline need every row) but computes the
  gradients of its shard only.
* **other workers** plan the same window read-only, train on their shard, and exit. They never
  write to the model registry, the cycle marker or Kafka.

Why a custom loop instead of ``model.fit``: Keras 3 (3.15 with TF 2.21 here) fails in ``fit`` under
this strategy (it reduces the first input batch, a tuple of PerReplica values, and raises
"unsupported type PerReplica"; keras-team/keras#20585). The loop below is the documented TF
pattern: ``distribute_datasets_from_function`` + ``strategy.run`` of a step whose loss is divided
by the number of replicas, with the Keras optimizer summing the gradients across workers.

Every worker runs the same number of steps (the largest shard sets it; smaller shards repeat
their rows), because a worker that stopped early would leave the others blocked in an all-reduce.

A dead or stuck worker: TensorFlow's coordination service aborts the collectives when a peer
misses its heartbeats for ``tfcluster.HEARTBEAT_TIMEOUT_S`` (older TensorFlow: the strategy's own health
check, every ``tfcluster.HEALTH_INTERVAL_S``), every collective is bounded by ``distributed_timeout_s``, and so
is the first rendezvous (:class:`trainer.tfcluster.Watchdog`). Each surviving worker raises
DistributedTrainingError. The chief publishes only after training finished, so no version is
half-published; the user restarts the same command on every host.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streaming.config import Settings
from streaming.lease import LeaseKeeper
from trainer.data import DataPlan, check_batches, labelled, load_batches, plan_data
from trainer.distributed import Cluster, fingerprint_number, plan_fingerprint, shard
from trainer.evaluate import Evaluation, evaluate_candidate
from trainer.exceptions import DamagedBatchError, DistributedTrainingError, NotEnoughDataError
from trainer.spec import FeatureInfo, ModelSpec
from trainer.tfcluster import RENDEZVOUS_GRACE_S, Watchdog, cause, configure_coordination, tune_health_check
from trainer.training import TrainResult, configure_tensorflow, epoch_budget

log = logging.getLogger(__name__)



@dataclass
class _Rows:
    """What a worker loaded: its shard's labelled rows, and (chief only) every training row."""

    xs: np.ndarray
    ys: np.ndarray
    x_all: np.ndarray | None = None
    cols_all: dict[str, np.ndarray] | None = None
    hashes: dict[str, str] | None = None


class MultiWorkerFit:
    """The strategy of one process and the distributed fit; ``fit`` has the signature of fit_and_evaluate."""

    def __init__(self, settings: Settings, cluster: Cluster, *, hard_exit: bool = False) -> None:
        self.settings = settings
        self.cluster = cluster
        #: a command-line worker is killed (with a clear message) when the rendezvous outlives the timeout.
        self.hard_exit = hard_exit
        self._strategy: Any = None
        self.parent_version: int | None = None
        self.history: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ cluster
    def _where(self) -> str:
        return f"worker {self.cluster.index} of {self.cluster.size} ({self.cluster.workers[self.cluster.index]})"

    def _lost(self, what: str, exc: BaseException) -> DistributedTrainingError:
        return DistributedTrainingError(
            f"{self._where()}: {what} failed: {cause(exc)}. A worker stopped, "
            f"could not be reached, or one step took longer than distributed_timeout_s="
            f"{self.settings.distributed_timeout_s:g} s (env STREAMLEARN_DISTRIBUTED_TIMEOUT_S). Nothing was "
            "published (only the chief publishes, after every worker finished). Restart the same "
            "`streamlearn train MODEL --once --distributed` on every host of TF_CONFIG (the same MODEL and the "
            "same TF_CONFIG cluster list on each: a \"group size\" error means the lists differ)")

    def strategy(self) -> Any:
        """Create the strategy once; its constructor waits (bounded) until every worker has joined."""
        if self._strategy is not None:
            return self._strategy
        tf = configure_tensorflow()
        timeout = float(self.settings.distributed_timeout_s)
        tune_health_check(math.ceil(timeout))
        configure_coordination(self.cluster, timeout)
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({"worker": list(self.cluster.workers)}), task_type="worker",
            task_id=self.cluster.index, rpc_layer="grpc")
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING, timeout_seconds=timeout)
        started = time.monotonic()
        log.info("%s: waiting up to %.0f s for the cluster %s", self._where(), timeout, list(self.cluster.workers))
        missing = (f"{self._where()}: the other workers did not all join within distributed_timeout_s={timeout:g} s "
                   "(env STREAMLEARN_DISTRIBUTED_TIMEOUT_S); start `streamlearn train MODEL --once --distributed` on "
                   "every host of TF_CONFIG, each with its own task.index, and check that the listed ports are "
                   "reachable. Nothing was published")
        joined = Watchdog(timeout + RENDEZVOUS_GRACE_S, missing, self.hard_exit)
        try:
            self._strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver,
                                                                       communication_options=options)
        except RuntimeError as exc:  # "Timeout waiting for the cluster" (the pre-coordination-service check)
            raise DistributedTrainingError(f"{missing} ({exc})") from exc
        except tf.errors.OpError as exc:  # e.g. "Could not start gRPC server": the port is taken
            raise DistributedTrainingError(
                f"{self._where()}: cannot start this worker's server ({exc.message}); is the port in TF_CONFIG "
                "free on this host?") from exc
        finally:
            joined.set()
        log.info("%s: cluster ready after %.1f s (%d replicas)", self._where(), time.monotonic() - started,
                 self._strategy.num_replicas_in_sync)
        return self._strategy

    def exchange(self, local: np.ndarray) -> np.ndarray:
        """Every worker's ``local`` float64 vector, as rows of an (n_workers, k) array (one all-reduce).

        tf.distribute only sums and averages; each worker writes its vector into its own row of zeros,
        so the sum is every worker's vector, exactly.
        """
        import tensorflow as tf

        table = np.zeros((self.cluster.size, len(local)), np.float64)
        table[self.cluster.index] = local
        try:
            out = self.all_sum(table)
        except tf.errors.OpError as exc:
            raise self._lost("exchanging the plan with the other workers", exc) from exc
        return out

    def all_sum(self, array: np.ndarray) -> np.ndarray:
        """The element-wise sum of ``array`` over all workers (a collective: every worker must call it)."""
        import tensorflow as tf

        strategy = self.strategy()
        # The value is made on this worker's replica device (a plain constant lives on /job:localhost,
        # which the collective cannot place).
        value = strategy.experimental_distribute_values_from_function(lambda _ctx: tf.constant(array))
        return np.asarray(strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None))

    def stop_health_check(self) -> None:
        """After the last collective: a worker that finished and exits must not abort the chief's export."""
        stop = getattr(getattr(self._strategy, "extended", None), "_stop_check_health_thread", None)
        if callable(stop):
            stop()

    # ------------------------------------------------------------------ fit
    def fit(self, spec: ModelSpec, features: FeatureInfo, plan: DataPlan, *, parent_dir: Path | None,
            seed: int, log_dir: Path | None = None, expected_sha: dict[str, str] | None = None) -> Evaluation:
        """Train on this worker's shard of ``plan.train`` together with the others; the chief also gates.

        The whole plan's files are checked first (:func:`trainer.data.check_batches`): a damaged batch
        raises before any collective step, the chief's :meth:`Trainer.run_once` sets it aside and plans
        again, and the other workers, which check the same plan the same way (:func:`worker_plan`), have
        left out the same batch, so the plan fingerprints agree."""
        check_batches([*plan.train, *plan.holdout], expected_sha)
        self.strategy()
        ev = self._fit(spec, features, plan, parent_dir=parent_dir, seed=seed, log_dir=log_dir,
                       expected_sha=expected_sha)
        if ev is None:
            raise RuntimeError("only the chief evaluates; call train_shard on the other workers")
        return ev

    def train_shard(self, spec: ModelSpec, features: FeatureInfo, plan: DataPlan, *, parent_dir: Path | None,
                    seed: int) -> None:
        """A non-chief worker's whole part: train its shard in step with the others."""
        self._fit(spec, features, plan, parent_dir=parent_dir, seed=seed, log_dir=None, expected_sha=None)

    def _load(self, spec: ModelSpec, features: FeatureInfo, plan: DataPlan,
              expected_sha: dict[str, str] | None) -> _Rows:
        mine = {b.batch_id for b in shard(plan.train, self.cluster.index, self.cluster.size)}
        wanted = plan.train if self.cluster.is_chief else [b for b in plan.train if b.batch_id in mine]
        xs_parts: list[np.ndarray] = []
        cols_parts: dict[str, list[np.ndarray]] = {}
        all_x: list[np.ndarray] = []
        all_cols: dict[str, list[np.ndarray]] = {}
        hashes: dict[str, str] = {}
        for b in wanted:  # one batch at a time: the chief splits its own shard out of the whole window
            x, cols, (digest,) = load_batches(spec, [b], features.n_features, expected_sha)
            hashes[b.batch_id] = digest
            all_x.append(x)
            for k, v in cols.items():
                all_cols.setdefault(k, []).append(v)
            if b.batch_id in mine:
                xs_parts.append(x)
                for k, v in cols.items():
                    cols_parts.setdefault(k, []).append(v)
        empty = np.zeros((0, features.n_features), np.float32)
        x_shard = np.concatenate(xs_parts) if xs_parts else empty
        cols_shard = {k: np.concatenate(v) for k, v in cols_parts.items()} if cols_parts else \
            {k: np.zeros(0) for k in (spec.label, *spec.aux_labels)}
        xs, ys = labelled(spec, x_shard, cols_shard) if len(x_shard) else (empty, np.zeros((0, len(spec.output_names)),
                                                                                         np.float32))
        if not self.cluster.is_chief:
            return _Rows(xs, ys)
        x_all = np.concatenate(all_x) if all_x else empty
        cols_all = {k: np.concatenate(v) for k, v in all_cols.items()}
        return _Rows(xs, ys, x_all, cols_all, hashes)

    def _fit(self, spec: ModelSpec, features: FeatureInfo, plan: DataPlan, *, parent_dir: Path | None,
             seed: int, log_dir: Path | None, expected_sha: dict[str, str] | None) -> Evaluation | None:
        parent = parent_dir.name if parent_dir is not None else None
        fingerprint = plan_fingerprint(plan, int(parent) if parent and parent.isdigit() else None,
                                       model=spec.name, workers=self.cluster.workers)
        rows = self._load(spec, features, plan, expected_sha)
        n_classes = len(spec.output_names) if spec.balance_classes and spec.task == "classification" else 0
        class_counts = (np.bincount(np.argmax(rows.ys, axis=1), minlength=n_classes) if n_classes and len(rows.ys)
                        else np.zeros(n_classes))
        # Two exchanges: first one of the same length on every worker (whatever its model), so a
        # mismatch is told by the fingerprint, not by TensorFlow's "shape mismatch in the collective".
        table = self.exchange(np.asarray([fingerprint_number(fingerprint), float(len(rows.xs))], np.float64))
        if len(set(table[:, 0].tolist())) != 1:
            raise DistributedTrainingError(
                f"{self._where()}: the workers planned different training runs (plan fingerprints "
                f"{[f'{int(v):012x}' for v in table[:, 0]]}, this one {fingerprint[:12]}); every worker must run "
                "the same MODEL with the same TF_CONFIG cluster list and see the same feature store and model "
                "registry (shared storage, same namespace); nothing was published. Rerun when they agree")
        counts = table[:, 1].astype(np.int64)
        if n_classes:
            table = np.concatenate([table, self.exchange(class_counts.astype(np.float64))], axis=1)
        if int(counts.sum()) == 0:
            raise NotEnoughDataError(
                f"model {spec.name!r}: the {len(plan.train)} training batch file(s) hold no row with label "
                f"{spec.label!r} on any of the {self.cluster.size} workers; labelled events are needed to train")
        if int(counts.min()) == 0:
            raise NotEnoughDataError(
                f"model {spec.name!r}: worker(s) {np.flatnonzero(counts == 0).tolist()} of {self.cluster.size} got no "
                f"labelled training row: the window has {len(plan.train)} training batch file(s), split round-robin "
                "over the workers. Run with fewer workers or let the stream worker write more batches")
        weights = None
        if n_classes:
            global_counts = table[:, 2:].sum(axis=0)
            ids = np.argmax(rows.ys, axis=1)
            present = int(np.count_nonzero(global_counts))
            weights = (counts.sum() / (present * global_counts[ids])).astype(np.float32)
        result = self._train(spec, features, rows, weights, parent_dir=parent_dir, seed=seed,
                             total_rows=int(counts.sum()), max_rows=int(counts.max()), log_dir=log_dir)
        self.stop_health_check()
        if not self.cluster.is_chief:
            return None
        assert rows.x_all is not None and rows.cols_all is not None and rows.hashes is not None
        xt, yt = labelled(spec, rows.x_all, rows.cols_all)
        x_ev, cols_ev, h_ev = load_batches(spec, plan.holdout, features.n_features, expected_sha)
        hashes = dict(rows.hashes)
        hashes.update(zip([b.batch_id for b in plan.holdout], h_ev, strict=True))
        xe, ye = labelled(spec, x_ev, cols_ev)
        return evaluate_candidate(spec, result, xt, yt, xe, ye, parent_dir=parent_dir, hashes=hashes)

    def _train(self, spec: ModelSpec, features: FeatureInfo, rows: _Rows, weights: np.ndarray | None, *,
               parent_dir: Path | None, seed: int, total_rows: int, max_rows: int,
               log_dir: Path | None) -> TrainResult:
        tf = configure_tensorflow()
        import keras

        from trainer import model_io
        from trainer.specs.common import make_optimizer

        strategy = self.strategy()
        n = self.cluster.size
        per_replica = max(1, spec.batch_size // n)
        steps = max(1, math.ceil(max_rows / per_replica))
        epochs = epoch_budget(spec, total_rows)
        keras.utils.set_random_seed(seed)
        with strategy.scope():
            model = spec.build(features, seed)
            optimizer = make_optimizer(spec.learning_rate)
            optimizer.build(model.trainable_variables)
        warm = False
        if self.cluster.is_chief:
            init = parent_dir / model_io.WEIGHTS_FILE if parent_dir is not None else None
            warm = model_io.load_weights(model, init) if init is not None else False
            if not warm and spec.adapt is not None:
                assert rows.x_all is not None and rows.cols_all is not None
                spec.adapt(model, labelled(spec, rows.x_all, rows.cols_all)[0])
        self._broadcast_weights(model)
        loss_obj = spec.loss()

        def loss_of(y: Any, pred: Any, w: Any) -> Any:
            """The batch loss as compile() would reduce it: mean over the batch of (weighted) row losses."""
            if isinstance(loss_obj, keras.losses.Loss):
                return loss_obj(y, pred, sample_weight=w)
            per_row = tf.cast(loss_obj(y, pred), tf.float32)
            return tf.reduce_mean(per_row if w is None else per_row * w)
        tensors: tuple[np.ndarray, ...] = (rows.xs.astype(np.float32), rows.ys.astype(np.float32))
        if weights is not None:
            tensors = (*tensors, weights)
        shuffle_seed = seed + 7919 * self.cluster.index  # each worker its own order, reproducibly

        def dataset(_ctx: Any) -> Any:
            return (tf.data.Dataset.from_tensor_slices(tensors)
                    .shuffle(max(1, len(rows.xs)), seed=shuffle_seed, reshuffle_each_iteration=True)
                    .repeat().batch(per_replica, drop_remainder=True))

        data = iter(strategy.distribute_datasets_from_function(dataset))

        def step(x: Any, y: Any, w: Any = None) -> Any:
            with tf.GradientTape() as tape:
                pred = model(x, training=True)
                loss = loss_of(y, pred, w)
                if model.losses:
                    loss = loss + tf.add_n(model.losses)
                scaled = loss / float(strategy.num_replicas_in_sync)
            grads = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss

        @tf.function
        def train_step(iterator: Any) -> Any:
            per_replica_loss = strategy.run(step, args=next(iterator))
            return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica_loss, axis=None)

        losses: list[float] = []
        log.info("%s: training %s on %d of %d rows, %d epochs x %d steps of %d rows per worker", self._where(),
                 spec.name, len(rows.xs), total_rows, epochs, steps, per_replica)
        try:
            for epoch in range(epochs):
                total = 0.0
                for _ in range(steps):
                    total += float(train_step(data))
                epoch_loss = total / steps
                losses.append(epoch_loss)
                if log_dir is not None:
                    from trainer.tensorboard import write_scalars

                    write_scalars(log_dir / "train", epoch, {"epoch_loss": epoch_loss})
                if not math.isfinite(epoch_loss):  # every worker sees the same reduced loss: all stop here
                    log.warning("%s: loss is %s after epoch %d; stopping", self._where(), epoch_loss, epoch + 1)
                    break
        except tf.errors.OpError as exc:
            raise self._lost(f"training {spec.name!r}", exc) from exc
        self.history = {"loss": losses}
        local = model
        if self.cluster.is_chief:  # a plain copy outside the strategy: predict/export need no other worker
            keras.utils.set_random_seed(seed)
            local = spec.build(features, seed)
            local.set_weights(model.get_weights())
        final = losses[-1] if losses else float("nan")
        return TrainResult(local, warm, final if math.isfinite(final) else float("nan"), dict(self.history),
                           total_rows)

    def _broadcast_weights(self, model: Any) -> None:
        """Give every worker the chief's weights (warm start or adapted statistics): one sum per dtype."""
        import tensorflow as tf

        arrays = [np.asarray(w) for w in model.get_weights()]
        by_dtype: dict[str, list[int]] = {}
        for i, a in enumerate(arrays):
            by_dtype.setdefault(a.dtype.str, []).append(i)

        out = list(arrays)
        try:
            for idx in by_dtype.values():
                flat = np.concatenate([arrays[i].ravel() for i in idx])
                if not self.cluster.is_chief:
                    flat = np.zeros_like(flat)
                summed = self.all_sum(flat)
                pos = 0
                for i in idx:
                    size = arrays[i].size
                    out[i] = summed[pos:pos + size].reshape(arrays[i].shape).astype(arrays[i].dtype)
                    pos += size
        except tf.errors.OpError as exc:
            raise self._lost("receiving the chief's initial weights", exc) from exc
        model.set_weights(out)


def run_distributed(settings: Settings, spec: ModelSpec, cluster: Cluster, *, namespace: str = "live",
                    events: bool = True, keep_last: int = 10, hard_exit: bool = False,
                    lease: LeaseKeeper | None = None) -> dict[str, Any]:
    """This process's part of one distributed training run; returns a JSON-able summary.

    ``lease``: the chief's trainer lease (streaming/lease.py); its registry writes are fenced by it.

    ``hard_exit`` (the command line): a cluster that does not form within distributed_timeout_s
    ends the process (status 137, with a message; see :class:`_Watchdog`).

    Raises NotEnoughDataError (idle: same answer on every worker) or DistributedTrainingError.
    """
    from trainer.worker import Trainer

    started = time.monotonic()
    session = MultiWorkerFit(settings, cluster, hard_exit=hard_exit)
    summary: dict[str, Any] = {"model": spec.name, "worker": cluster.index, "workers": cluster.size,
                               "role": "chief" if cluster.is_chief else "worker"}
    if cluster.is_chief:
        trainer = Trainer(settings, spec, namespace=namespace, events=events, keep_last=keep_last, lease=lease)
        try:
            # A pending gate decision is applied before the rendezvous, so the workers (who plan after
            # it) read the same promoted version as the chief; and only by the lease holder: the chief
            # reconciled before it led, and promoted a version while another trainer held the lease.
            trainer.require_lead()
            trainer.reconcile()
            session.strategy()
            outcome = trainer.run_once("distributed", fit=session.fit)
        finally:
            trainer.close()
        summary.update(version=outcome.version, **outcome.decision.to_dict())
    else:
        from streaming.model_registry import ModelRegistry
        from streaming.store import FeatureStore

        session.strategy()  # after the chief's reconcile: plan from the registry it settled
        registry = ModelRegistry(settings.model_dir)
        features = spec.features()
        promoted = registry.promoted(spec.name)
        parent_meta = registry.verify(spec.name, promoted) if promoted is not None else None
        batches = FeatureStore(settings.feature_store).batches(features.kind, namespace)
        plan = worker_plan(spec, batches, parent_meta.get("data_state") if parent_meta else None)
        parent_dir = registry.version_dir(spec.name, promoted) if promoted is not None else None
        session.train_shard(spec, features, plan, parent_dir=parent_dir, seed=spec.seed)
        losses = session.history.get("loss") or []
        summary.update(trained_batches=len(shard(plan.train, cluster.index, cluster.size)),
                       final_loss=losses[-1] if losses else None)
    summary["seconds"] = round(time.monotonic() - started, 3)
    return summary


def worker_plan(spec: ModelSpec, batches: list[Any], data_state: dict[str, Any] | None) -> DataPlan:
    """A non-chief worker's plan: the chief's, damaged batches left out the way the chief leaves them out.

    The chief's :meth:`Trainer.run_once` sets aside each batch :meth:`MultiWorkerFit.fit` finds damaged
    and plans again over the others; this does the same over the same store, so both end at the same
    window (a damaged batch's place is taken by the batch the planner picks next, not just removed)."""
    from trainer.worker import MAX_SET_ASIDE_PER_RUN

    left_out: set[str] = set()
    for _ in range(MAX_SET_ASIDE_PER_RUN + 1):
        plan = plan_data(spec, [b for b in batches if b.batch_id not in left_out], data_state)
        try:
            check_batches([*plan.train, *plan.holdout])
            return plan
        except DamagedBatchError as exc:
            left_out.add(exc.batch_id)
            log.error("distributed worker: %s. Set aside, as the chief does", exc)
    raise DistributedTrainingError(f"more than {MAX_SET_ASIDE_PER_RUN} damaged batches in the window; restore "
                                   "the feature store or replay it into a fresh one")
