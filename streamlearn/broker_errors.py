"""The one message for "the Kafka broker cannot be reached", at the command line's error boundary.

Why: every command that talks to Kafka (``topics create``, ``publish`` (every mode: it makes sure of the
kind's topics first), ``subscribe``, ``replay``,
``offsets``, ``ingest``) builds its client through kafka-python, which after its bootstrap timeout raises
``KafkaTimeoutError("Unable to bootstrap from HOST:PORT")`` (kafka-python 3.0.x). Uncaught, that
was a 40-line traceback, the first thing a user who forgot ``streamlearn broker start`` (or whose broker
crashed) saw. The fix belongs here, once, rather than in each command: the message names the address
and the setting behind it, and says what to do.
"""

from __future__ import annotations

import sys

from streaming.config import Settings


def unreachable_message(exc: BaseException, settings: Settings) -> str | None:
    """The error line for ``exc`` when it means "no broker answered at the bootstrap address", else None."""
    errors = sys.modules.get("kafka.errors")
    if errors is None:  # kafka was never imported: the error cannot be kafka's
        return None
    if not (isinstance(exc, errors.KafkaTimeoutError) and "bootstrap" in str(exc).lower()):
        return None
    if settings.embedded:
        from streaming.broker import START_HINT

        fix = START_HINT
    else:
        fix = "check that Kafka runs there and that --bootstrap / STREAMLEARN_KAFKA_BOOTSTRAP names it"
    return (f"cannot reach the Kafka broker at {settings.bootstrap} ({type(exc).__name__}); {fix}; "
            "then run the same command again")
