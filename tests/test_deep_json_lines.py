"""A 100k-deep JSON line in a user's file is one refused record, never a RecursionError that stops the run.

The three line-based inputs (``publish --file``, JSON web logs for ``ingest weblog``, ``predict --file``)
parse each line through :func:`streaming.limits.bounded_json`, so a hostile line is refused by its size
and depth before the parser recurses, with the error class each path already turns into a dead letter or
a per-line message.
"""

from __future__ import annotations

import pytest

from ingest.exceptions import LogParseError
from ingest.jsonlines import decide_unit, event_from_line
from ingest.weblog import parse_json
from serving.client import read_requests_file
from serving.exceptions import RequestDecodeError
from streaming.eventtime import EventTimePolicy, TimestampReader

DEEP = "[" * 100_000 + "]" * 100_000
DEEP_OBJECT = '{"sensor_id": ' + DEEP + "}"


def test_publish_refuses_a_deep_line_and_keeps_the_next_one() -> None:
    reader = TimestampReader("auto", source="t")
    texts = [DEEP_OBJECT + "\n", '{"sensor_id": "s1", "timestamp": 315532800000, "value": 21.5, "unit": "celsius"}\n']
    lines = [(n, text.encode(), text) for n, text in enumerate(texts, 1)]  # (number, bytes, text) per line
    # the unit look-ahead reads the deep line too, and must pass over it
    decide_unit(reader, lines)
    assert reader.decided == "ms"
    with pytest.raises(ValueError, match="nested 100001 levels deep"):  # the loop dead-letters ValueErrors
        event_from_line("sensor", texts[0], reader, EventTimePolicy(max_age_ms=None))
    ok = event_from_line("sensor", texts[1], reader, EventTimePolicy(max_age_ms=None))
    assert ok["sensor_id"] == "s1" and ok["timestamp"] == 315532800000  # a 1980 reading is kept as such


def test_a_deep_json_log_line_is_a_parse_error() -> None:
    with pytest.raises(LogParseError, match="nested 100001 levels deep") as err:
        parse_json(DEEP_OBJECT, source="access.json")
    assert err.value.reason == "bad_json"


def test_predict_file_names_the_deep_line() -> None:
    with pytest.raises(RequestDecodeError, match="line 2: JSON nested 100000 levels deep"):
        read_requests_file("m", ['{"features": [1, 2]}', DEEP])
    with pytest.raises(RequestDecodeError) as err:  # the line was named twice: "line 2: ... (line 2: ...)"
        read_requests_file("m", ['{"features": [1, 2]}', '{"features": [1 2]}'])
    assert str(err.value).startswith("line 2: not valid JSON (") and str(err.value).count("line 2") == 1
