"""Predict client: publish PredictionRequests and wait for their answers by correlation id.

The answers are read with ``read_committed`` (only what a worker's transaction committed) from a
position taken *before* the requests are published, so no answer can slip past. Answers are
de-duplicated by request id (the at-least-once mode may deliver one twice); the first one wins.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from serving.exceptions import PredictTimeoutError, RequestDecodeError
from streaming.clock import now_ms
from streaming.config import Settings
from streaming.jsoncodec import to_json
from streaming.limits import InputLimitError, bounded_json, check_id
from streaming.topics import declared_topics, ensure_topics, predictions_topic, requests_topic


def _request_id(value: Any, where: str, after: str = "") -> str:
    """``value`` as a request id, or RequestDecodeError when over MAX_ID_CHARS (``limits.check_id``)."""
    try:
        return check_id(value, f"{where}request_id")
    except InputLimitError as exc:
        raise RequestDecodeError(f"{exc}{after}") from None


def to_request(model: str, obj: Any, *, line: int | None = None) -> dict[str, Any]:
    """One input line -> a PredictionRequest dict.

    Accepted: a full PredictionRequest (has ``request_id`` and ``features``/``event_json``),
    ``{"features": [...]}`` (optionally with ``request_id``), or any other object = a raw event.
    """
    where = f"line {line}: " if line is not None else ""
    if not isinstance(obj, dict):
        raise RequestDecodeError(f"{where}each request must be a JSON object (a raw event, "
                                 f"{{\"features\": [...]}} or a PredictionRequest), got {type(obj).__name__}")
    # Refused here, before any request of the file is sent (the SDK would refuse it at publish,
    # schemas/ids.py, after the lines before it had gone out).
    rid = _request_id(obj.get("request_id") or uuid.uuid4().hex, where)
    if "features" in obj or "event_json" in obj:
        features = obj.get("features")
        if features is not None and not isinstance(features, list):
            raise RequestDecodeError(f"{where}features must be a list of numbers")
        if features is not None and obj.get("event_json") is not None:  # event_json silently won
            raise RequestDecodeError(f"{where}give features or event_json, not both")
        if features is not None and any(isinstance(v, (bool, str)) or v is None for v in features):
            # float() took true as 1.0 and "16" as 16.0; the HTTP API and the Kafka path refuse them
            raise RequestDecodeError(f"{where}features must be numbers (JSON numbers, not strings, booleans "
                                     "or null)")
        event_json = obj.get("event_json")
        if event_json is not None and not isinstance(event_json, str):
            event_json = to_json(event_json)
        try:  # a 4000-digit integer is an OverflowError of float(): a traceback, before this
            values = [float(v) for v in features] if features is not None else None
            stamp = int(obj.get("timestamp") or now_ms())
        except (TypeError, ValueError, OverflowError) as exc:
            raise RequestDecodeError(f"{where}features must be numbers and timestamp an integer of ms "
                                     f"({type(exc).__name__}: {str(exc)[:80]})") from None
        asked = obj.get("model")
        if asked not in (None, "", model):  # the worker of ``model`` would answer it with an error
            raise RequestDecodeError(f"{where}model is {str(asked)[:100]!r}, but these requests go to "
                                     f"{model!r}; drop the field or run `streamlearn predict {str(asked)[:100]}`")
        return {"request_id": rid, "model": model, "timestamp": stamp,
                "event_json": event_json, "features": values, "reply_topic": obj.get("reply_topic")}
    return {"request_id": rid, "model": model, "timestamp": now_ms(), "event_json": to_json(obj),
            "features": None, "reply_topic": None}


def read_requests_file(model: str, lines: Iterable[str | bytes]) -> list[dict[str, Any]]:
    """The requests of a JSON-lines file (``predict --file``); RequestDecodeError names the first bad
    line, before anything is sent. Lines may be bytes: a line that is not UTF-8 is such an error (read
    as text, it ended the command in a UnicodeDecodeError traceback)."""
    out = []
    for n, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            try:
                text = line.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise RequestDecodeError(f"line {n}: not UTF-8 ({exc}); convert the file to UTF-8") from exc
        else:
            text = line
        if not text.strip():
            continue
        try:
            obj = bounded_json(text, f"line {n}")
        except ValueError as exc:  # bounded_json's message already names the line
            raise RequestDecodeError(f"{exc}; one JSON object per line") from exc
        out.append(to_request(model, obj, line=n))
    return out


def ensure_model_topics(settings: Settings, model: str) -> None:
    """Create the request and prediction topics of ``model`` if missing (custom models are not
    declared by default)."""
    names = {requests_topic(settings, model), predictions_topic(settings, model)}
    ensure_topics(settings, [s for s in declared_topics(settings, [model]) if s.name in names])


def predict(settings: Settings, model: str, requests: list[dict[str, Any]], *, timeout_s: float = 30.0,
            reply_topic: str | None = None) -> list[dict[str, Any]]:
    """Publish ``requests`` (PredictionRequest dicts) and return their answers in request order.

    Raises PredictTimeoutError naming how many answers are missing when the deadline passes.
    """
    from streaming.consumer import Subscriber
    from streaming.producer import Publisher

    topic = reply_topic or predictions_topic(settings, model)
    ensure_model_topics(settings, model)
    # Ids are at most MAX_ID_CHARS, so the worker echoes each one whole: answers are matched by the id
    # itself. Checked for every request before any is sent (the SDK would refuse a longer one at
    # publish, schemas/ids.py, after the requests before it had gone out).
    wanted = {r["request_id"] for r in requests}
    for rid in wanted:
        _request_id(rid, "", " (nothing was sent)")
    answers: dict[str, dict[str, Any]] = {}
    with Subscriber(settings, topic, start="end", isolation_level="read_committed") as sub:
        for tp in sub.assignment():  # resolve positions now, before anything is published
            sub.consumer.position(tp)
        with Publisher(settings) as pub:
            for req in requests:
                if reply_topic is not None:
                    req = {**req, "reply_topic": reply_topic}
                pub.publish_to(requests_topic(settings, model), "PredictionRequest", req, key=req["request_id"])
        deadline = time.monotonic() + timeout_s
        while len(answers) < len(wanted):
            if time.monotonic() > deadline:
                missing = sorted(wanted - set(answers))
                raise PredictTimeoutError(
                    f"timeout: {len(missing)} of {len(wanted)} requests got no answer on {topic} within "
                    f"{timeout_s} s (e.g. {missing[:3]}); is `streamlearn serve {model}` running? "
                    "Raise --timeout or check the worker's log", missing)
            for item in sub.poll_batch(timeout_ms=200):
                value = getattr(item, "value", None)
                if not isinstance(value, dict):
                    continue
                rid = str(value.get("request_id"))
                if rid in wanted:
                    answers.setdefault(rid, value)
    return [answers[r["request_id"]] for r in requests]
