"""`streamlearn train <model> [--once]` and `streamlearn retrain --reproduce <model>/<version>`."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from streaming import config
from streamlearn.argtypes import finite, whole
from streamlearn.modelref import versioned_ref

if TYPE_CHECKING:
    from streaming.lease import LeaseKeeper

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="retrain a model from the feature store every N batches or T seconds "
                                     "(or on drift); gate, publish to the registry, announce on Kafka")
    p.add_argument("model", help="model name (built-in, entry point 'streamlearn.models' or [models] in config)")
    p.add_argument("--once", action="store_true", help="train one candidate now and exit")
    p.add_argument("--distributed", action="store_true",
                   help="with --once: train as one worker of a tf.distribute.MultiWorkerMirroredStrategy cluster "
                        "described by env TF_CONFIG (worker 0 publishes; others only train their shard of the batch "
                        "files); waits at most env STREAMLEARN_DISTRIBUTED_TIMEOUT_S for the others "
                        "(docs/DISTRIBUTED.md)")
    p.add_argument("--namespace", default="live", help="feature store namespace (default live)")
    p.add_argument("--every-batches", dest="retrain_every_batches", type=int,
                   help=config.flag_help("retrain_every_batches"))
    p.add_argument("--every-seconds", dest="retrain_every_seconds", type=float,
                   help=config.flag_help("retrain_every_seconds"))
    p.add_argument("--keep", type=whole(1), default=10,
                   help="versions kept (default 10), besides the promoted one and the N promoted before it "
                        "(the rollback depth)")
    p.add_argument("--no-events", action="store_true", help="do not publish ModelUpdate events")
    p.add_argument("--lease-seconds", dest="leader_lease_s", type=float,
                   help=config.flag_help("leader_lease_s", "one trainer per model leads, the others stand by"))
    p.set_defaults(func=_train)
    r = sub.add_parser("retrain", help="retrain a version from its recorded lineage and compare the scores")
    r.add_argument("--reproduce", required=True, type=versioned_ref, metavar="MODEL/VERSION", help="e.g. digits_cnn/3")
    r.add_argument("--tolerance", type=finite(0.0, 1e9), default=None,
                   help="largest accepted |recorded - reproduced| primary metric (default 1e-6)")
    r.add_argument("--from-offsets", action="store_true",
                   help="re-read the raw topic at the recorded offsets and re-featurize (true replay) "
                        "instead of re-reading the recorded batch files")
    r.set_defaults(func=_reproduce)


def _train(args: argparse.Namespace, settings: config.Settings) -> int:
    from streaming.exceptions import FencedError
    from trainer.exceptions import NotEnoughDataError
    from trainer.spec import load_spec
    from trainer.worker import Trainer

    changes = {k: getattr(args, k) for k in ("retrain_every_batches", "retrain_every_seconds", "leader_lease_s")
               if getattr(args, k) is not None}
    if changes:
        settings = settings.with_(**changes)
    spec = load_spec(args.model, settings)
    if args.distributed:
        return _train_distributed(args, settings, spec)
    keeper = _lease_keeper(settings, spec.name)
    trainer = Trainer(settings, spec, namespace=args.namespace, events=not args.no_events, keep_last=args.keep,
                      lease=keeper)
    try:
        if args.once:
            try:
                outcome = trainer.run_once("once")
            except NotEnoughDataError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 3
            except FencedError as exc:  # another trainer leads this model
                print(f"error: {exc}", file=sys.stderr)
                return 4
            print(json.dumps({"model": spec.name, "version": outcome.version, **outcome.decision.to_dict()}))
            return 0
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        if settings.metrics_port >= 0:
            from streaming.metrics import start_metrics_server

            start_metrics_server(settings.metrics_port, settings.metrics_host)
        log.info("trainer %s: retraining every %d batches or %.0f s", spec.name, settings.retrain_every_batches,
                 settings.retrain_every_seconds)
        trainer.run_forever(stop)
        return 0
    finally:
        trainer.close()
        keeper.stop()  # hands the lease over at once instead of after its expiry


def _lease_keeper(settings: config.Settings, name: str) -> LeaseKeeper:
    """The lease of model ``name``; its floor is the registry's claimed epoch (docs/LEADER.md)."""
    from streaming.lease import Lease, LeaseKeeper, lease_store
    from streaming.model_registry import ModelRegistry

    registry = ModelRegistry(settings.model_dir)
    lease = Lease(lease_store(registry, name), name, ttl_s=settings.leader_lease_s)
    return LeaseKeeper(lease, floor=lambda: int(registry.state(name).get("leader_epoch") or 0)).start()


def _train_distributed(args: argparse.Namespace, settings: config.Settings, spec: Any) -> int:
    """One worker of `train MODEL --once --distributed` (trainer/multiworker.py); exit 3 idle, 4 cluster error."""
    from streaming.exceptions import FencedError
    from trainer.distributed import parse_tf_config
    from trainer.exceptions import DistributedTrainingError, NotEnoughDataError
    from trainer.multiworker import run_distributed

    if not args.once:
        print("error: --distributed trains one candidate per cluster run; add --once (run it again, e.g. from a "
              "scheduler, for the next version)", file=sys.stderr)
        return 2
    keeper = None
    try:
        cluster = parse_tf_config(config.tf_config())
        # The chief publishes through the normal run_once path, so it leads like any trainer: it holds
        # the model's lease and fences its registry writes (docs/LEADER.md); the other workers never write.
        keeper = _lease_keeper(settings, spec.name) if cluster.is_chief else None
        summary = run_distributed(settings, spec, cluster, namespace=args.namespace, events=not args.no_events,
                                  keep_last=args.keep, hard_exit=True, lease=keeper)
    except NotEnoughDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (DistributedTrainingError, FencedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    finally:
        if keeper is not None:
            keeper.stop()
    print(json.dumps(summary))
    return 0


def _reproduce(args: argparse.Namespace, settings: config.Settings) -> int:
    from trainer.exceptions import LineageError, ReproductionError
    from trainer.reproduce import DEFAULT_TOLERANCE, reproduce

    name, version = args.reproduce
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    try:
        report = reproduce(settings, name, int(version), tolerance=tolerance, from_offsets=args.from_offsets)
    except (LineageError, ReproductionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0
