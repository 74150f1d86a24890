"""The cluster of a distributed training run and how its workers split the training window.

No TensorFlow here (the strategy and the training loop are in :mod:`trainer.multiworker`), so the
rules below are cheap to test and to read:

* **Cluster** (:func:`parse_tf_config`): TensorFlow's ``TF_CONFIG``, the variable
  ``tf.distribute.MultiWorkerMirroredStrategy`` reads itself, e.g.
  ``{"cluster": {"worker": ["host-a:12345", "host-b:12345"]}, "task": {"type": "worker", "index": 0}}``.
  Only ``worker`` jobs: worker 0 is the chief, the one process that writes to the model registry.
  A separate ``chief`` job is refused, because then the chief would train on no shard.
* **Shard** (:func:`shard`): every worker plans the same window (the same
  :func:`trainer.data.plan_data` on the same store and registry), then takes the batch files at
  positions ``index, index + n, index + 2n, ...`` of the plan's training order (reservoir first, then
  new batches, oldest first). Round-robin over one agreed, sorted list, not a hash of the batch id:
  the shards differ by at most one file, and no process-seeded ``hash()`` is involved, so every
  worker computes the same split without talking to the others.
* **Agreement** (:func:`plan_fingerprint`): the sha256 of the plan (roles, batch ids, manifest
  sha256s, the parent version). Workers all-reduce it before training and refuse to train when
  they disagree (e.g. a host whose shared storage lags behind), instead of training on a window the
  lineage would not describe.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from trainer.exceptions import ClusterConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Cluster:
    """This process's place in a MultiWorkerMirroredStrategy cluster."""

    workers: tuple[str, ...]
    index: int

    @property
    def size(self) -> int:
        return len(self.workers)

    @property
    def is_chief(self) -> bool:
        """Worker 0 is the chief: it gates, exports and publishes; the others only train."""
        return self.index == 0

    def describe(self) -> dict[str, Any]:
        return {"workers": list(self.workers), "index": self.index, "chief": self.workers[0]}


def parse_tf_config(text: str) -> Cluster:
    """The cluster and this worker's index from a ``TF_CONFIG`` JSON text; ClusterConfigError if unusable."""
    if not text.strip():
        raise ClusterConfigError(
            "TF_CONFIG: not set; `train --distributed` needs TensorFlow's cluster description, e.g. "
            'TF_CONFIG=\'{"cluster": {"worker": ["host-a:12345", "host-b:12345"]}, "task": {"type": "worker", '
            '"index": 0}}\' on host-a and index 1 on host-b (docs/DISTRIBUTED.md)')
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ClusterConfigError(f"TF_CONFIG: not valid JSON ({exc}); see docs/DISTRIBUTED.md") from exc
    if not isinstance(data, dict) or not isinstance(data.get("cluster"), dict):
        raise ClusterConfigError("TF_CONFIG: needs a 'cluster' object with a 'worker' list of host:port")
    jobs = data["cluster"]
    extra = sorted(set(jobs) - {"worker"})
    if extra:
        raise ClusterConfigError(
            f"TF_CONFIG: cluster jobs {extra} are not supported; list every host under 'worker' (worker 0 is "
            "the chief and publishes; a separate chief or parameter server is not used by this strategy)")
    workers = jobs.get("worker")
    if (not isinstance(workers, list) or not workers
            or not all(isinstance(w, str) and w.rpartition(":")[2].isdigit() for w in workers)):
        raise ClusterConfigError(f"TF_CONFIG: cluster.worker must be a non-empty list of 'host:port', got {workers!r}")
    if len(set(workers)) != len(workers):
        raise ClusterConfigError(f"TF_CONFIG: cluster.worker lists an address twice: {workers}")
    task = data.get("task")
    if not isinstance(task, dict) or task.get("type") != "worker":
        raise ClusterConfigError(f"TF_CONFIG: task must be {{'type': 'worker', 'index': N}}, got {task!r}")
    index = task.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(workers):
        raise ClusterConfigError(
            f"TF_CONFIG: task.index must be an integer in [0, {len(workers)}) (one per cluster.worker entry), "
            f"got {index!r}")
    return Cluster(tuple(workers), index)


def shard(items: Sequence[T], index: int, size: int) -> list[T]:
    """Worker ``index`` of ``size``: the items at positions ``index, index + size, ...`` (round-robin)."""
    if size < 1 or not 0 <= index < size:
        raise ValueError(f"index/size: need 0 <= index < size, got index={index}, size={size}")
    return list(items[index::size])


def plan_fingerprint(plan: Any, parent_version: int | None, *, model: str | None = None,
                     workers: Sequence[str] | None = None) -> str:
    """sha256 (hex) of a :class:`trainer.data.DataPlan`: what every worker must agree on before training.

    ``model`` and ``workers`` (the TF_CONFIG cluster list) are in it too: workers started with another
    model or another cluster list failed later with an unrelated TensorFlow shape or group-size error
    whose advice ("restart the same command") could only fail again."""
    roles = {"reservoir": plan.reservoir, "train": plan.train_new, "holdout": plan.holdout}
    doc = {
        "parent": parent_version,
        "batches": {role: [[b.batch_id, b.manifest.get("sha256")] for b in group] for role, group in roles.items()},
        "data_state": plan.data_state,
    }
    if model is not None:
        doc["model"] = model
    if workers is not None:
        doc["workers"] = list(workers)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint_number(fingerprint: str) -> float:
    """The first 48 bits of a hex fingerprint as a float64 (exact: 48 < 53 mantissa bits), for all-reduce."""
    return float(int(fingerprint[:12], 16))
