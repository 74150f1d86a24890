"""Errors of the ingest package (web-log parsing, sensor validation, image validation, checkpoints).

Every class derives from :class:`schemas.exceptions.StreamlearnError` so callers can catch one
root. Errors about *input data* carry a short machine-readable ``reason`` next to the human
message: the reason goes to the dead-letter headers and the rejected-file reason files, so an
operator can group rejects without parsing prose.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from schemas.exceptions import StreamlearnError


class IngestError(StreamlearnError):
    """Base of the ingest package's errors."""


class InputRejectedError(IngestError, ValueError):
    """One input item (a log line, a CSV row, an image file) is not acceptable.

    The item is dead-lettered with this message and ingestion continues; ``reason`` is a short
    stable code (e.g. ``"nan"``, ``"bad_magic"``) for grouping.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        #: Every reason when the item has several problems (first = ``reason``).
        self.reasons = [reason]

    @classmethod
    def combine(cls, problems: Sequence[InputRejectedError]) -> Self:
        """One error carrying every problem: the first one's reason, all messages, ``reasons`` in order."""
        if len(problems) == 1 and isinstance(problems[0], cls):
            return problems[0]
        err = cls("; ".join(str(p) for p in problems), problems[0].reason)
        err.reasons = [r for p in problems for r in p.reasons]
        return err


class LogParseError(InputRejectedError):
    """A web-log line is neither a combined/common log line nor a usable JSON log object."""


class SensorValidationError(InputRejectedError):
    """A sensor reading has a NaN/inf/absurd value, an impossible timestamp or a missing field."""


class ImageValidationError(InputRejectedError):
    """An image failed validation (magic bytes, extension, header dimensions, truncation, decode)."""


class CheckpointError(IngestError):
    """A checkpoint file exists but cannot be read or written; fix or remove it as the message says."""


class SourceError(IngestError):
    """A source (log file, CSV file, watched directory) cannot be opened or read."""
