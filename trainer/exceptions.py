"""Errors of the trainer package; all derive from :class:`schemas.exceptions.StreamlearnError`."""

from __future__ import annotations

from schemas.exceptions import StreamlearnError


class TrainerError(StreamlearnError):
    """Base of the trainer's errors."""


class SpecError(TrainerError):
    """A model spec cannot be found, imported or is malformed."""


class SpecCheckError(SpecError):
    """A model spec failed the shared check suite (:func:`trainer.checks.check_spec`)."""


class NotEnoughDataError(TrainerError):
    """There are too few feature batches (or labelled rows) to train and evaluate a candidate."""


class LineageError(TrainerError):
    """A version's lineage cannot be replayed: a batch is gone or its sha256 changed."""


class DamagedBatchError(LineageError):
    """A batch file's bytes no longer hash to its manifest's sha256 (bit rot, a partial restore, an edit).

    ``batch_id`` names it: the trainer sets such a batch aside and trains on the others, instead of failing
    every retrain for as long as the batch stays in its window (``trainer.worker.Trainer.run_once``)."""

    def __init__(self, message: str, batch_id: str) -> None:
        super().__init__(message)
        self.batch_id = batch_id


class BatchesGoneError(LineageError):
    """Batches a run planned on were deleted while it ran (``store gc``): it is planned again without them,
    never published with a lineage that names them (``trainer.worker.Trainer.run_once``)."""

    def __init__(self, message: str, batch_ids: list[str]) -> None:
        super().__init__(message)
        self.batch_ids = batch_ids


class ReproductionError(TrainerError):
    """A reproduced training run did not reach the recorded scores within the stated tolerance."""


class EventPublishError(TrainerError):
    """A ModelUpdate event was not acknowledged; the registry change it announces is already durable."""


class DistributedTrainingError(TrainerError):
    """A ``train --distributed`` run cannot start or lost a worker; nothing was published."""


class ClusterConfigError(DistributedTrainingError):
    """``TF_CONFIG`` is missing or does not describe a worker of a MultiWorkerMirroredStrategy cluster."""
