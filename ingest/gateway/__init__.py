"""HTTP ingest gateway: events over HTTP into the raw topics, answered only after Kafka acked them.

Routes (OpenAPI at ``/openapi.json``, UI at ``/docs``):

* ``POST /ingest/{kind}`` (kind: weblog, sensor, image). Body: one JSON object or a JSON array of
  objects (``application/json``; image ``data`` is base64), or one Confluent-framed Avro record
  (``application/vnd.streamlearn.avro`` or ``application/octet-stream``) whose writer schema's
  record name must match the kind.
* ``POST /ingest/images``: multipart upload of one or more image files (+ optional ``label``).
* ``GET /healthz`` (the producer can fetch Kafka metadata) and ``GET /metrics`` (Prometheus).

Answer: ``{"results": [{"index", "status": accepted|duplicate|rejected, "error"?, "id", "topic",
"partition", "offset"}], "accepted", "duplicates", "rejected"}`` with 200 when nothing was rejected,
207 when some records were, 422 when none was valid, 400 when the body as a whole is unusable.
Rejected records are dead-lettered (original bytes, reason headers, ``dl.stage=gateway``). A record
Kafka did not acknowledge is reported ``rejected`` with ``"retryable": true`` and the whole answer
is 503 + ``Retry-After``: resend it, the idempotency keys make that safe. An answered record is also
in the gateway's journal (``streaming/ackjournal.py``, fsynced before the answer), so a kill -9 of the
gateway together with an embedded broker that loses its last acks loses none of them: the same
command re-sends them at start (docs/RECOVERY.md, "Broker crash").

Order of admission, cheapest first, so a refused request costs almost nothing: body size by
``Content-Length`` and the process-wide budget of body bytes held (413/503, raw ASGI middleware,
before auth) -> key (401/403) -> the key's scope ``ingest.<kind>`` (403) -> rate budget not empty
(429) -> in-flight records under the limit (503) -> body read while counting bytes (413/408) ->
JSON shape scanned without parsing (depth, arrays/objects, top-level elements) -> rate charge for
those elements, also when the body is then refused (429) -> shape limits (400/413) ->
``Idempotency-Key`` replay -> parse -> publish and wait.

Tenants (docs/SECURITY.md): a key of tenant ``acme`` publishes into ``<prefix>acme.<kind>.raw``;
rate limits are per key and, with ``ingest_tenant_rate``, per tenant.

Idempotency window: per key (a key can only ever dedupe its own events, so one key holder cannot
make another's event a "duplicate"), per gateway process, in memory, bounded (``GatewayLimits.idempotency_capacity``
keys, ``idempotency_ttl_s``). By default it is NOT seeded from the topic: a restart, or more distinct
events than the capacity within the TTL, forgets keys, and a resend is then published again
(consumers dedupe by event id downstream). ``Gateway.seed_idempotency(window_s)`` (CLI
``--idempotency-seed-minutes``) re-reads the last minutes of the raw topics at start-up so a restart
keeps the events acked in that window; request-level ``Idempotency-Key`` answers are never seeded.
Those answers are kept as their rendered JSON, bounded by count (``request_key_capacity``) and by bytes
(``request_key_max_bytes``, 64 MiB, oldest evicted first): a request whose answer was evicted runs again
if resent, and its events are still deduplicated by their ids.
Event keys: weblog ``event_id`` (derived from the content when absent), sensor
``event_id`` or ``sensor_id:timestamp``, image ``image_id`` (sha256 of the bytes when absent). A key
is remembered only after its ack; while in flight, a second sender waits for the first outcome.
"""
