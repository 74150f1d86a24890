"""read_committed: ignore aborted-transaction entries that ended before the fetch offset (noida-db).

Why this exists (docs/READ_COMMITTED.md). A ``read_committed`` fetch response carries, per partition,
a list of aborted transactions ``(producer_id, first_offset)``. The client walks the returned batches;
once a batch reaches an entry's ``first_offset`` it treats every later data batch of that producer as
aborted, until it meets that producer's abort marker. Apache Kafka therefore lists only aborted
transactions that overlap the fetched range: ``lastOffset >= fetchOffset and firstOffset <
upperBound`` (``TransactionIndex.collectAbortedTxns``). noida-db 0.2.3 lists *every* aborted
transaction of the partition, also those whose abort marker lies before the fetch offset. A consumer
positioned past such a marker (a live subscriber that already read it, or one that started at the
end after it) never sees that marker again, so kafka-python 3.0.12 (exactly like the Java client
would) skips every later *committed* transaction of the same producer: a serving worker that
aborted one batch made all its later answers invisible to live subscribers and to ``streamlearn
predict``, while a reader from the beginning saw them all (tests/test_read_committed_gap.py).

The fix drops, per fetch response, the entries that cannot overlap the fetched range, decided only
from what the response itself holds, so it is correct on Apache Kafka too:

* an entry with ``first_offset >= fetch_offset`` is always kept (it is inside the range);
* an entry with ``first_offset < fetch_offset`` is legitimate only if that aborted transaction was
  still open at ``fetch_offset`` (e.g. the previous response was cut by the size limit in the middle
  of it). A producer has at most one open transaction per partition, so the *first* control marker of
  that producer at or after ``fetch_offset`` ends the transaction open there. If that marker is a
  COMMIT, no aborted transaction of that producer spans ``fetch_offset``: the entry is stale and is
  dropped. If it is an ABORT, or the response holds no marker of that producer, the entry is kept
  (kafka-python's own behaviour).

Only responses with an entry below the fetch offset are scanned (on Apache Kafka: a fetch that
resumes inside an aborted transaction; on noida-db: any fetch past an old abort), and the scan reads
batch headers plus the one record of a control batch. Remaining gap (noida-db only): a response from
past an old abort that holds a producer's data but none of its markers (it ends between a
transaction's records and its commit marker) keeps the stale entry (docs/READ_COMMITTED.md).

:func:`install` replaces ``Fetcher.PartitionRecords`` (which the fetcher instantiates through
``self.PartitionRecords``) with a subclass that filters the entries before kafka-python sees them;
nothing else of kafka-python changes. It is installed by ``streaming.consumer`` for every consumer
of the process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from kafka.consumer.fetcher import Fetcher
from kafka.record import MemoryRecords

log = logging.getLogger(__name__)

_MARK = "_streamlearn_drops_stale_aborts"
#: kafka-python's own class, for diagnostics that compare (benchmarks/probe_read_committed.py).
KAFKA_PYTHON_RECORDS: type = Fetcher.PartitionRecords


class Marker(NamedTuple):
    """One transaction control marker of a fetch response."""

    offset: int
    producer_id: int
    abort: bool


def markers(records: MemoryRecords) -> Iterator[Marker]:
    """The control markers of a fetch response's record set, in offset order.

    Reads a second view of the same bytes, so the fetcher's own iteration over ``records`` is not
    disturbed."""
    scan = MemoryRecords(records._buffer)
    batch = scan.next_batch()
    while batch is not None:
        if batch.magic == 2 and batch.is_control_batch:
            record = next(batch, None)
            if record is not None:
                yield Marker(batch.base_offset, batch.producer_id, bool(record.abort))
        batch = scan.next_batch()


def live_entries(fetch_offset: int, entries: Sequence[Any], found: Iterable[Marker]) -> list[Any]:
    """The aborted-transaction ``entries`` (with ``producer_id``, ``first_offset``) that can overlap a
    fetch from ``fetch_offset``, given the response's control markers ``found`` (see the module
    docstring for the rule). ``found`` is read lazily and only as far as needed."""
    suspects = {e.producer_id for e in entries if e.first_offset < fetch_offset}
    if not suspects:
        return list(entries)
    first_abort: dict[int, bool] = {}  # producer id -> is its first marker at/after fetch_offset an abort
    for marker in found:
        if marker.offset >= fetch_offset and marker.producer_id in suspects:
            first_abort.setdefault(marker.producer_id, marker.abort)
            if len(first_abort) == len(suspects):
                break
    stale = {pid for pid, abort in first_abort.items() if not abort}
    return [e for e in entries if not (e.first_offset < fetch_offset and e.producer_id in stale)]


class _StaleAbortsDropped(Fetcher.PartitionRecords):
    """``Fetcher.PartitionRecords`` that first drops the stale aborted-transaction entries."""

    def __init__(self, fetch_offset: int, tp: Any, records: Any, *args: Any,
                 aborted_transactions: Sequence[Any] | None = None, **kwargs: Any) -> None:
        if aborted_transactions:  # live_entries returns them all at once when none is below fetch_offset
            kept = live_entries(fetch_offset, aborted_transactions, markers(records))
            if len(kept) != len(aborted_transactions):
                log.debug("%s: ignoring %d aborted transaction(s) that ended before fetch offset %d",
                          tp, len(aborted_transactions) - len(kept), fetch_offset)
            aborted_transactions = kept
        super().__init__(fetch_offset, tp, records, *args, aborted_transactions=aborted_transactions, **kwargs)


setattr(_StaleAbortsDropped, _MARK, True)


def install() -> None:
    """Make every kafka-python fetcher of this process drop stale aborted-transaction entries
    (idempotent)."""
    if not getattr(Fetcher.PartitionRecords, _MARK, False):
        Fetcher.PartitionRecords = _StaleAbortsDropped


def installed() -> bool:
    return bool(getattr(Fetcher.PartitionRecords, _MARK, False))


def unfiltered(consumer: Any) -> None:
    """Give one consumer kafka-python's own handling back (diagnostics only: it loses records on
    noida-db; benchmarks/probe_read_committed.py uses it to tell whether this module is still needed)."""
    consumer._fetcher.PartitionRecords = KAFKA_PYTHON_RECORDS
