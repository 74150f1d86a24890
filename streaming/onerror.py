"""The error policy of the record pipelines: what happens to a record whose decode or featurize fails.

After quix-streams' ``on_processing_error``: one callable, ``on_error(stage, exc, record)``, replaces
the branches that were hard-coded in the stream pipeline and in serving's request decode. It answers
``"dead_letter"`` (the default: the record goes to the kind's dead-letter topic with the reason, its
offset counts as processed) or ``"raise"`` (the exception propagates and stops the worker: for a
replay or a test that must not tolerate bad input).

There is deliberately no "skip": a bad record is kept with its reason, never silently dropped. Errors
that are not the record's fault (the schema registry unreachable) never reach the policy: the
pipelines retry those records.

Example, a policy that dead-letters featurize errors but stops on undecodable bytes::

    >>> def strict_decode(stage, exc, record):
    ...     return "raise" if stage == "decode" else "dead_letter"
    >>> decide(strict_decode, "featurize", ValueError("nan"), None)
    'dead_letter'
    >>> decide(lambda *a: "skip", "decode", ValueError("x"), None)
    Traceback (most recent call last):
    ...
    streaming.exceptions.ErrorPolicyError: on_error returned 'skip' ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from streaming.exceptions import ErrorPolicyError

Stage = Literal["decode", "featurize"]
Action = Literal["dead_letter", "raise"]
#: ``on_error(stage, exc, record) -> action``; ``record`` is the raw Kafka message.
OnError = Callable[[str, BaseException, Any], str]
ACTIONS: tuple[str, ...] = ("dead_letter", "raise")


def dead_letter(stage: str, exc: BaseException, record: Any) -> Action:
    """The default policy: every failing record becomes a dead letter with its reason."""
    return "dead_letter"


def strict(stage: str, exc: BaseException, record: Any) -> Action:
    """Stop at the first failing record (replays and tests that must see clean input)."""
    return "raise"


def decide(policy: OnError, stage: str, exc: BaseException, record: Any) -> Action:
    """Ask ``policy`` what to do; an answer other than ``ACTIONS`` is a programming error, raised."""
    action = policy(stage, exc, record)
    if action == "dead_letter":
        return "dead_letter"
    if action == "raise":
        return "raise"
    raise ErrorPolicyError(f"on_error returned {action!r} for a {stage} error; return one of {list(ACTIONS)} "
                           "(a bad record is dead-lettered or stops the worker, never skipped)")
