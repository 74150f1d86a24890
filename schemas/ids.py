"""Bounds on the id fields of the platform's records: the fields that become Kafka keys or ids.

Why here, in the bottom layer: an id is checked where every record is checked, in the compiled
validator (:mod:`schemas.validate`) that runs before every encode. Every entry that publishes (the
SDK's ``publish``/``publish_to``/``publish_many``, ``encode`` as the HTTP gateway uses it, the ingest
runner behind the tailer, sensor CSV and image watcher, ``streamlearn publish --file``) already turns
:class:`schemas.exceptions.RecordValidationError` into that record's dead letter with its reason and
goes on, so an over-long id needs no new error path anywhere. A 300 KB ``event_id`` used to be
stored and carried (as a key, an idempotency-window entry, a dead-letter key) until the ~1 MB
record limit stopped it.

Which fields: the key field of each record people publish (``streaming.producer.KEY_FIELDS``) and
the idempotency id (``event_id``, ``streaming.topics.event_key``). Not ``Prediction.request_id``: only
the serving worker writes answers, under an id it has already cut (``serving.replies.cut_id``), and
an answer it cannot encode would be its own failure, not the request's. The limit is the one the workers apply to what
they read (``streaming.limits.MAX_ID_CHARS`` is this constant), so the SDK refuses exactly what a
stream or serving worker would dead-letter anyway. At most 4 UTF-8 bytes per character, an id that
passes is at most ``4 * MAX_ID_CHARS`` = 1,024 bytes as a key (``streaming.limits.MAX_KEY_BYTES``).

Records written by someone else's producer are not checked here (nothing of ours runs there); the
workers bound what they read (docs/SECURITY.md, "Hostile input").
"""

from __future__ import annotations

#: Longest id (event_id, client_ip, sensor_id, image_id, request_id, model) in characters.
MAX_ID_CHARS = 256

#: Record name -> its id fields (string or optional string), each capped at MAX_ID_CHARS on encode.
ID_FIELDS: dict[str, tuple[str, ...]] = {
    "WebLogEvent": ("event_id", "client_ip"),
    "SensorReading": ("sensor_id", "event_id"),
    "ImageEvent": ("image_id",),
    "PredictionRequest": ("request_id",),
    "ModelUpdate": ("model",),
}
