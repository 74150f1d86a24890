"""Errors of the serving package (model loading, request decoding, version policy, clients).

Every class derives from :class:`schemas.exceptions.StreamlearnError` so callers can catch one
root; messages name the argument at fault and say what to do.
"""

from __future__ import annotations

from schemas.exceptions import StreamlearnError


class ServingError(StreamlearnError):
    """Base of the serving package's errors."""


class ModelLoadError(ServingError):
    """A model version failed verification, loading or warm-up; it is never served."""


class NoModelVersionError(ServingError, LookupError):
    """No version of the model is loaded (yet), or the asked-for version/label is not served."""


class RequestDecodeError(ServingError, ValueError):
    """A prediction request (or raw event) could not be decoded or featurized.

    The worker answers it with a Prediction whose ``error`` is set and dead-letters the original
    bytes; it never drops it.
    """


class PolicyError(ServingError, ValueError):
    """A ``--policy`` value that is not ``latest``, ``pinned:V`` or ``canary:V:SHARE``."""


class PredictTimeoutError(ServingError, TimeoutError):
    """The predict client did not see answers to every request before its deadline."""

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing
