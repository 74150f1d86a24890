"""Errors of the control API and its jobs, each with the HTTP status it answers with.

They derive from :class:`schemas.exceptions.StreamlearnError` (one root); the ``streamlearn jobs``
command prints the same messages. Messages name the argument and say what to do.
"""

from __future__ import annotations

from schemas.exceptions import StreamlearnError


class ApiError(StreamlearnError):
    """Base of control-API errors; ``status`` is the HTTP answer."""

    status: int = 400

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequestError(ApiError):
    """A request whose parameters or body cannot be used (400)."""


class JobNotFoundError(ApiError):
    """No job with that id (or not one of the caller's tenant) (404)."""

    status = 404


class JobConflictError(ApiError):
    """The resource (a model, a namespace) has a job running already, or the job is over (409)."""

    status = 409

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        #: The job that holds the resource, for the answer's ``job`` field.
        self.job_id = job_id


class TooManyJobsError(ApiError):
    """``api_max_jobs`` jobs run already (429 with Retry-After)."""

    status = 429


class NotAcceptableError(ApiError):
    """The ``Accept`` header names no format the route can answer in (406)."""

    status = 406


class RetryLaterError(ApiError):
    """What the request reads is being rebuilt right now; the same request succeeds shortly (503)."""

    status = 503


class UnavailableError(ApiError):
    """A part the route needs is missing from this installation (501)."""

    status = 501


class TooLargeError(ApiError):
    """A query over one of the query limits; the message names the setting (413)."""

    status = 413
