"""Errors of the streaming package (Kafka I/O, consumers, featurizers, micro-batches)."""

from __future__ import annotations

from schemas.exceptions import StreamlearnError


class StreamingError(StreamlearnError):
    """Base of the streaming package's errors."""


class UnknownKindError(StreamingError, ValueError):
    """An event kind that is not one of streaming.topics.KINDS."""


class BrokerError(StreamingError):
    """The embedded broker could not be started, stopped or reached."""


class BrokerAlreadyRunningError(BrokerError):
    """A broker already runs on this data directory."""


class RecordTooLargeError(StreamingError):
    """An encoded record is over the producer's size limit; refused before sending."""


class PublishError(StreamingError):
    """Kafka did not acknowledge a record."""


class OffsetOutOfRangeError(StreamingError):
    """A requested position (offset or timestamp) is outside what the topic still holds."""


class AfterLastRecordError(OffsetOutOfRangeError):
    """A start time after the newest record of the topic (a relative ``-2h`` can drift there)."""


class FeatureValidationError(StreamingError):
    """A decoded record failed feature validation (NaN/inf, impossible timestamp, bad image)."""


class UnknownFeaturizerError(StreamingError, LookupError):
    """No featurizer is registered for the asked kind/version."""


class FeatureStateError(StreamingError, ValueError):
    """Checkpointed featurizer state cannot be restored (corrupt JSON, other featurizer or settings)."""


class BackpressureError(StreamingError):
    """A sink cannot take more data right now (disk full, permission denied).

    The worker pauses the partitions involved and retries; it never commits past the data
    that could not be written.
    """


class SinkBackpressureError(BackpressureError):
    """The feature sink could not make a batch durable; retry after ``retry_after`` seconds.

    After quix-streams' ``SinkBackpressureError``: the caller pauses its partitions instead of
    failing. The batches are kept by the sink (in order) and written by a later ``flush()``.
    """

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GroupActiveError(StreamingError):
    """Offsets of a consumer group can only be reset while it has no active members."""


class StoreError(StreamingError):
    """The feature store is inconsistent or was asked for something impossible."""


class BatchOverlapError(StoreError):
    """A new batch's offset range overlaps a batch already persisted for the same partition."""


class ReplayError(StreamingError):
    """A replay was asked for something it cannot do (live namespace, overlapping batches)."""


class BatcherError(StreamingError, ValueError):
    """Bad batcher arguments or an offset going backwards within a partition."""


class ModelRegistryError(StreamingError):
    """Base of the model registry's errors."""


class ModelNotFoundError(ModelRegistryError):
    """A model name or version is not in the registry."""


class ModelIntegrityError(ModelRegistryError):
    """A version's files do not match its manifest, or a SavedModel part is missing.

    Serving must refuse to load such a version; the trainer must not promote it.
    """


class FencedError(ModelRegistryError):
    """A registry write carried a leader epoch older than the model's: another trainer took over.

    Raised by :class:`streaming.model_registry.ModelRegistry` writes given ``fence=<epoch>`` after a
    newer leader claimed the model (docs/LEADER.md). The writer must stop and rejoin as a standby.
    """


class LeaseError(StreamingError):
    """The leader lease of a model cannot be read or written (bad record, unreachable store)."""


class PromoteError(StreamingError):
    """A rebuilt namespace cannot be made live (incomplete replay, active group, half-done promotion)."""


class EventTimeError(StreamingError, ValueError):
    """A record's event time is unreadable, in an unknown unit, or outside the acceptance window.

    ``reason`` is a short stable code for dead-letter headers (``timestamp_too_old``,
    ``timestamp_in_future``, ``timestamp_unit_mismatch``, ...); the message names the flag that
    changes the decision (``--backfill``, ``--max-age``, ``--timestamp-unit``).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class MemberSlotBusyError(StreamingError):
    """A worker asked for a group member slot (``--slot``, ``--instance-id``) that a live process holds."""


class GroupStuckError(StreamingError):
    """A worker owns no partition of a topic that has lag (a stuck group or a phantom member)."""


class TenantScopeError(StreamingError, PermissionError):
    """A tenant-scoped client (``STREAMLEARN_TENANT``) named a topic, group or transactional id outside
    its tenant's prefix; refused before any network call (streaming/tenancy.py)."""


class ImageProbeError(StreamingError, ValueError):
    """An image's header is unusable or over the limits (``streaming/image_probe.py``); ``reason`` is a short
    code (``empty``, ``too_large``, ``bad_magic``, ``bad_header``, ``truncated``, ``bad_dimensions``,
    ``too_many_pixels``) that ingestion puts in the dead letter and the featurizer in its message."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ErrorPolicyError(StreamingError, ValueError):
    """An ``on_error`` policy (streaming/onerror.py) answered something other than "dead_letter" or "raise"."""


class ReplicationError(StreamingError, ValueError):
    """Topic replication settings the cluster cannot honour (too few brokers, min ISR above RF)."""


class ObjectStoreError(StreamingError):
    """An object-storage operation failed or the backend lacks it (streaming/objstore.py)."""


class ObjectNotFoundError(ObjectStoreError, FileNotFoundError):
    """A key does not exist; also a FileNotFoundError so callers' ``except`` clauses keep working."""


class ObjectStoreUnavailableError(ObjectStoreError, OSError):
    """The object store could not be reached or failed an operation (connection refused, timeout, 5xx,
    access denied). Also an OSError: every caller written for a local disk's failures (the lease
    keeper, the stream worker's backpressure, cleanup that may fail) treats a remote store's the same
    way, where the S3 client's own exceptions (botocore's EndpointConnectionError is no OSError) used
    to escape them and end the process."""


class ColumnarError(StreamingError):
    """The columnar (Parquet) copy cannot be built or read: a corrupt source batch, a busy lock, a bad name."""


class ColumnarChangedError(ColumnarError):
    """The copy a query was reading was rebuilt under it (``store promote``, a replay): repeat the query.
    The control API answers 503 with Retry-After."""


class QueryError(StreamingError, ValueError):
    """A query argument is wrong (a bad name, time range, limit or cursor); the message names it.
    The control API answers 400."""


class QueryTooLargeError(QueryError):
    """A query would go over a configured bound; ``limit`` is the setting's name (e.g. ``query_max_rows``).
    The control API answers 413; the message says what to narrow."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit
