"""Errors of the HTTP ingest gateway, each carrying the HTTP status it maps to.

Why a separate module: the gateway's errors are about HTTP admission (auth, size, rate, load),
not about parsing sources, so they live beside the gateway rather than in ``ingest/exceptions.py``.
They still derive from :class:`schemas.exceptions.StreamlearnError` so callers can catch one root.

None of these ever carries a bearer token: messages are built from constants and numbers only,
and ``__repr__`` is the class name plus that message, so a logged or re-raised error is safe.
"""

from __future__ import annotations

from schemas.exceptions import StreamlearnError


class GatewayError(StreamlearnError):
    """Base of gateway errors. ``status`` is the HTTP status code the gateway answers with."""

    status: int = 400

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: Seconds a client should wait before retrying (sent as ``Retry-After``); None when retrying
        #: the same request cannot help.
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class AuthenticationError(GatewayError):
    """No usable ``Authorization: Bearer <token>`` header (401, with ``WWW-Authenticate``)."""

    status = 401


class ForbiddenError(GatewayError):
    """A well-formed bearer token that is not one of ``settings.ingest_tokens`` (403)."""

    status = 403


class PayloadTooLargeError(GatewayError):
    """The request body is over the gateway's byte limit (413). Raised before the body is kept."""

    status = 413


class UnsupportedMediaTypeError(GatewayError):
    """The Content-Type is not one the route accepts (415)."""

    status = 415


class BadRequestError(GatewayError):
    """The body as a whole cannot be used: not JSON, empty batch, no files (400)."""

    status = 400


class IdempotencyConflictError(GatewayError):
    """An ``Idempotency-Key`` was reused with a different request body (409)."""

    status = 409


class RateLimitedError(GatewayError):
    """The token's record budget (token bucket) is spent (429 with ``Retry-After``)."""

    status = 429


class OverloadedError(GatewayError):
    """Too many records wait for Kafka acks, or Kafka did not ack in time (503 with ``Retry-After``)."""

    status = 503


class RecordRejectedError(GatewayError):
    """One record of a request is invalid; reported per record and dead-lettered, not raised to HTTP."""

    status = 422
