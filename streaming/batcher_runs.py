"""The stream worker's fast path through :class:`streaming.batcher.Pipeline`: one call per partition's
run of a poll (:func:`process_runs`, behind ``Pipeline.process_many``).

Why a module of its own: it is the per-record hot loop of the worker, written for speed (values decoded
in one call, lookups hoisted, rows handed to the batcher per run), and must store exactly what
``Pipeline.process`` stores one record at a time (``tests/test_stream_process_many.py``); kept apart so
batcher.py stays the readable reference path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from schemas.exceptions import RegistryUnavailableError
from streaming import eventtime
from streaming.ackguard import record_digest
from streaming.exceptions import FeatureValidationError
from streaming.features.base import DeferredRow
from streaming.store import StoredRow

if TYPE_CHECKING:  # batcher.py imports this module; the Pipeline type is only for the checker
    from streaming.batcher import Pipeline

log = logging.getLogger("streaming.batcher")  # its messages are the Pipeline's


def process_runs(p: Pipeline, msgs: Sequence[Any]) -> tuple[int, RegistryUnavailableError | None]:
    """``Pipeline.process_many`` (see there): ``(processed, registry outage or None)``."""
    from streaming.batcher import _NO_X, FEATURIZE_SAMPLE  # lazily: batcher.py imports this module at its top

    try:
        decoded = p.deserializer.decode_many([m.value for m in msgs])  # None: a tombstone, said as such
    except Exception:  # a registry outage or a failure decode_many does not keep in place: the
        return p._process_each(msgs)  # per-record path meets it at its record, with its own error
    featurize = p.featurizer.featurize_event_deferred
    # A featurizer may do the costly, stateless part of a poll's records at once (the image
    # featurizer decodes them on a few threads: Pillow releases the GIL); featurize() then takes
    # each result, or its error, in order, exactly as if it had computed it there.
    p.featurizer.prepare_many([dec.value for dec in decoded if not isinstance(dec, Exception)])
    states, stats, batcher, topic = p.states, p.stats, p.batcher, p.topic
    backfill_run = eventtime.backfill_run
    run: list[tuple[StoredRow, int | None, str | None, DeferredRow | None]] = []
    run_partition = -1
    ok = 0
    try:
        for msg, dec in zip(msgs, decoded, strict=True):
            partition, offset = msg.partition, msg.offset
            if partition != run_partition and run:
                batcher.add_rows(topic, run_partition, run)
                run = []
            run_partition = partition
            if isinstance(dec, Exception):  # SchemaError/FramingError, kept in place by decode_many
                batcher.add_rows(topic, partition, run)
                run = []
                p._failed(msg, msg.value or b"", "decode", dec)  # a tombstone's dead letter: b""
                continue
            state = states.get(partition)
            if state is None:
                state = states[partition] = p.featurizer.new_state()
            sampled = offset % FEATURIZE_SAMPLE == 0
            t0 = time.perf_counter() if sampled else 0.0
            headers = msg.headers
            try:
                row = featurize(dec.value, state, backfill_run(headers) if headers else None)
            except Exception as exc:  # as in process(): dead-lettered with the featurizer's reason
                if not isinstance(exc, FeatureValidationError):
                    log.warning("%s[%d]@%d: featurizer %s raised %s", msg.topic, partition, offset,
                                p.featurizer.version, type(exc).__name__)
                batcher.add_rows(topic, partition, run)
                run = []
                p._failed(msg, msg.value or b"", "featurize", exc)
                continue
            if sampled:
                p._featurize_hist.observe(time.perf_counter() - t0)
            fingerprint = record_digest(msg.key, msg.value, headers)
            if isinstance(row, DeferredRow):
                run.append((StoredRow(_NO_X, row.labels, row.event_time_ms, row.key, msg.topic, partition,
                                      offset), dec.schema_id, fingerprint, row))
            else:
                run.append((StoredRow(row.x, row.labels, row.event_time_ms, row.key, msg.topic, partition,
                                      offset), dec.schema_id, fingerprint, None))
            ok += 1
        if run:
            batcher.add_rows(topic, run_partition, run)
    finally:
        p.featurizer.release_prepared()
        stats.records += ok
        stats.rows += ok
        p._unreported_rows += ok
    return len(msgs), None
