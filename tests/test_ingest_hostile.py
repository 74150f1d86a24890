"""Hostile and real-world input at every ingest entry, found by an audit run of the README's commands.

Each test failed before its fix: a lone UTF-16 surrogate in gateway JSON (a 500 after the dead letter),
a UTF-8 byte-order mark (Excel's "CSV UTF-8", Windows tools) that refused a whole CSV or dead-lettered
a JSON line, a non-UTF-8 line that crashed ``publish --file``, and a log line over the tailer's limit that
became several dead letters with wrong reasons and shifted every later line number.
All over the real session broker; no sleeps.
"""

from __future__ import annotations

import json

from streaming.config import Settings
from streaming.producer import header_dict
from tests.test_gateway_http import AUTH, client, dead_letters, raw_records, sensor

CLF = '10.0.0.{i} - - [17/May/2015:10:05:03 +0000] "GET /p{i} HTTP/1.1" 200 5 "-" "ua"\n'


def test_gateway_lone_surrogate_is_rejected_and_dead_lettered_not_a_500(settings: Settings) -> None:
    """JSON may spell a lone surrogate (``"\\ud800"``); UTF-8, and so Avro, cannot hold it."""
    good = sensor(1)
    body = json.dumps([{**sensor(0), "sensor_id": "s\ud800"}, good])  # ensure_ascii: "s\\ud800"
    with client(settings) as tc:
        answer = tc.post("/ingest/sensor", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert answer.status_code == 207, answer.text
    results = answer.json()["results"]
    assert [r["status"] for r in results] == ["rejected", "accepted"]
    assert results[0]["reason"] == "schema" and "sensor_id" in results[0]["error"], results[0]
    assert [r.value["sensor_id"] for r in raw_records(settings, "sensor", expect=1)] == [good["sensor_id"]]
    (letter,) = dead_letters(settings, "sensor", expect=1)
    headers = header_dict(letter.headers)
    assert headers["dl.source_index"] == "0" and headers["dl.source_reason"] == "schema", headers

