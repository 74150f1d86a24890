"""Sensor CSV as a source: streamed, checkpointed, one dead letter per bad row (with its reasons).

Why its own module: ``ingest/sensors.py`` validates readings wherever they come from (CSV, generator,
``publish --file``); this module is what is specific to a CSV *file*: reading it as a stream of rows
(:class:`CsvReader`, never the whole file at once) and :class:`SensorCsvSource`, the source the one
runner (``ingest/runner.py``) publishes exactly once.

Resume (the contract of ``ingest/source.py``): the snapshot is the file's identity (path, inode, sha1
of the header line, generation) and the byte offset and line number after the last row handed out.
A restart with the same command resumes after the last acknowledged row; rows acked after that are
found on the topics and not sent again. A file that changed while the source was down (other inode or
header, shorter than the offset, or other bytes just before it) is read from its start as a new
generation (new event ids). A run
that finished leaves its checkpoint at the end: the same command again publishes nothing (delete the
checkpoint, printed at start, to publish the file again). The checkpoint is per file *and* per flags
that decide a row's fate (see :func:`default_checkpoint_path`), so ``--backfill`` after a live run
is a run of its own.

A row that does not validate, or that the publisher refuses (schema, size), is dead-lettered with
its reasons and the run goes on: no single row stops it.

Two layouts: *long*, one reading per row (``sensor_id,timestamp,value[,unit,label,event_id,...]``, other
columns into ``values``), and *wide*, one row per time and one column per sensor, as loggers, Grafana/
InfluxDB and spreadsheets export it (``time,temp_1,temp_2,...``; the time column is ``timestamp``,
``time``, ``datetime`` or ``date``). In a wide file every filled cell is a reading of the column's sensor
(an empty cell is none, as is ``NA``, ``#N/A``, ``NaN`` or ``NULL``: :data:`MISSING_CELLS`), a bad cell is a
dead letter of its own (``dl.source_column``), and the column is
part of each reading's event id.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.exceptions import SensorValidationError, SourceError
from ingest.lines import BUSY, SETTLED, LineFile, TailCache, UniversalLines, last_line_state, read_line
from ingest.runner import SourceRunner
from ingest.sensors import LIVE, SensorIngestStats, as_sensor_error, dead_letter_source, now_ms, validate
from ingest.source import (
    FilePosition,
    PositionIds,
    SourceItem,
    SourcePartition,
    compressed,
    file_checkpoint_path,
    policy_flags,
    source_state_dir,
)
from streaming.eventtime import EventTimePolicy, TimestampReader
from streaming.exceptions import EventTimeError

if TYPE_CHECKING:
    from streaming.config import Settings
    from streaming.producer import Publisher

log = logging.getLogger(__name__)

_RESERVED = {"sensor_id", "timestamp", "value", "unit", "label", "event_id"}
#: Names of the time column of a wide CSV (one column per sensor), compared in lower case.
WIDE_TIME_COLUMNS = ("timestamp", "time", "datetime", "date")
#: Bytes of one CSV line held in memory at most. A longer line is one dead letter (``row_too_long``, its
#: head kept) and the rest of it is skipped in bounded reads: a 300 MB line used to be read whole, then
#: decoded and copied, about 2.2 GB of memory for one row.
MAX_ROW_BYTES = 1 << 20
#: Cells that mean "no value" in the exports people bring: empty, R's ``NA``, Excel's ``#N/A``, pandas'
#: ``NaN``, SQL dumps' ``NULL``. In an extra value column of a long file, or a sensor column of a wide one,
#: such a cell is no reading, as an empty one always was; it made the whole row a dead letter before
#: (a weather station with a dead humidity sensor lost every temperature). The main ``value`` of a long
#: row is still required: a reading without it is refused with its reason.
MISSING_CELLS = frozenset({"", "na", "n/a", "#n/a", "nan", "null", "none"})
_DECIMAL_COMMA = re.compile(r"[+-]?[0-9]*,[0-9]+(?:[eE][+-]?[0-9]+)?")
#: German/Excel style with thousands dots and a decimal comma (``1.234,5``): unambiguous, read as 1234.5. A
#: bare ``1.000`` stays 1.0: in a ';' file with decimal points it is a reading with three decimals.
_GROUPED_DECIMAL_COMMA = re.compile(r"[+-]?[0-9]{1,3}(?:\.[0-9]{3})+,[0-9]+")


def _parse_float(text: str) -> float | str:
    """A number cell -> float; 'nan'/'inf' stay floats and anything else stays text, so that
    :func:`validate` reports it (not_a_number) together with the row's other problems."""
    try:
        return float(text)
    except ValueError:
        return text[:40]


def _parse_label(text: str) -> bool | None | str:
    """A label cell -> bool/None; other text is kept for :func:`validate` to report (bad_label)."""
    t = text.strip().lower()
    if t in ("", "null", "none"):
        return None
    if t in ("1", "true", "yes", "anomaly"):
        return True
    if t in ("0", "false", "no", "normal"):
        return False
    return text[:40]


@dataclass(frozen=True)
class CsvRow:
    """One data row of a CSV file: its line number, original bytes, and the parsed reading or error.

    ``start`` is the byte offset of the row's line in the file (its identity for event ids); in a wide
    file ``column`` is the sensor column of this reading (one row holds a reading per sensor column)."""

    line: int
    raw: bytes
    record: dict[str, Any] | None
    error: SensorValidationError | None
    start: int = 0
    column: str | None = None


def _split_line(physical: bytes) -> list[bytes]:
    """One line as :class:`~ingest.source.UniversalLines` reads it -> its one row, without its line end
    (a list: one physical line is one row, with its own offset and so its own event id)."""
    body = physical.rstrip(b"\n")
    return [body[:-1] if body.endswith(b"\r") else body]


def _parse_row(text: str, delimiter: str) -> list[str]:
    """One line's cells; csv.Error for a line that is not one whole CSV record.

    Rows are read a line at a time (a file still being appended to, byte offsets for resume), so a quoted
    cell with a line break in it arrives as two lines. The csv module read them leniently: ``"hall`` became a
    one-cell row and its rest, ``A",2026-...,1.5``, a good-looking reading of sensor ``A"``, published. A line
    whose quotes do not pair up (RFC 4180 doubles a quote inside a quoted cell) is refused instead, as is an
    unterminated quoted cell (``strict``): both halves become dead letters with the reason.
    """
    if text.count('"') % 2:
        raise csv.Error("a quote that does not pair up: a quoted cell with a line break in it (not supported: "
                        "one reading per line) or a stray '\"' (quote such a cell, doubling the quote)")
    return next(csv.reader(io.StringIO(text), delimiter=delimiter, strict=True), [])


class CsvReader:
    """The rows of one sensor CSV read as a stream from a byte offset (the file is never read whole).

    Timestamps are read with one :class:`~streaming.eventtime.TimestampReader` for the whole file: with
    ``auto`` it decides from the first data rows (read ahead once, also when resuming mid-file, so a
    resumed run reads them the same way) and raises SourceError, before any row, when it cannot.
    """

    def __init__(self, path: Path, *, unit: str = "unit", now: int | None = None,
                 policy: EventTimePolicy | None = None, reader: TimestampReader,
                 offset: int = 0, line: int = 1) -> None:
        self.path = Path(path)
        self.unit, self.policy, self.reader = unit, policy, reader
        self.ref = now_ms() if now is None else now
        try:
            # Lines end in "\n", "\r\n" or a lone "\r" (classic Mac), even mixed in one file.
            self._fh: LineFile = UniversalLines(open(self.path, "rb"))  # noqa: SIM115 (closed by close())
        except OSError as exc:
            raise SourceError(f"--csv {path}: cannot read ({exc})") from exc
        first, size = read_line(self._fh, MAX_ROW_BYTES, skip=False)
        self.header_line = first
        self._after_header = size
        self._tail = TailCache()
        self.eof = not first
        self.offset, self.line = max(offset, size), max(line, 1)
        if self.eof:
            return
        packed = compressed(first[:8], path)
        if packed is not None:
            self.close()
            raise SourceError(f"--csv {packed}")
        if first.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in first[:256]:
            self.close()  # was "header lacks ['sensor_id', 'timestamp', 'value']", which says nothing of why
            raise SourceError(f"--csv {path}: the file is UTF-16 text (Excel's \"Unicode Text\"), not UTF-8; save "
                              f"it as \"CSV UTF-8\" or convert it: iconv -f UTF-16 -t UTF-8 {path} > out.csv")
        if size > len(first):
            self.close()
            raise SourceError(f"--csv {path}: the header line is over the {MAX_ROW_BYTES}-byte limit of a "
                              "line; is this a CSV file?")
        # "utf-8-sig": a byte-order mark (Excel's "CSV UTF-8", other Windows tools) is not part of the
        # first column's name; read as part of it, "\ufeffsensor_id" refused the whole file.
        text = _split_line(first)[0].decode("utf-8-sig", "replace")
        # Excel writes ';' (and decimal commas) where ',' is the decimal mark; '\t' is the other common
        # export. Decided once from the header: a header without ',' but with one of them uses it. Quoted
        # names do not count: `time;"Temperatur, Mittel (°C)"` (German Excel) was read as ','-separated
        # and refused as lacking its columns.
        unquoted = re.sub(r'"[^"]*"', "", text)
        self.delimiter = next((d for d in (",", ";", "\t") if d in unquoted), ",")
        try:
            header = [h.strip() for h in next(csv.reader([text], delimiter=self.delimiter))]
        except csv.Error as exc:  # a header cell over the csv module's 128 KiB field limit: was a traceback
            self.close()
            raise SourceError(f"--csv {path}: the header line is not CSV ({exc}); is this a CSV file?") from exc
        twice = sorted(h for h, n in Counter(header).items() if h and n > 1)
        if twice:  # a row would keep only the last cell of each: the other values silently lost
            self.close()
            raise SourceError(f"--csv {path}: header names {twice} more than once; rename the columns so "
                              "each is named once")
        self.header = header
        self.time_column = "timestamp"
        #: Wide layout (one row per time, one column per sensor): the sensor columns; None: long layout.
        self.sensors: list[str] | None = None
        #: Wide layout: the sensor columns with at least one reading in the rows read so far (a column
        #: with none, a misspelt or unplugged sensor, is reported rather than silently yielding nothing).
        self.filled: set[str] = set()
        missing = {"sensor_id", "timestamp", "value"} - set(header)
        if missing and not ({"sensor_id", "value"} <= missing and self._wide(path, header)):
            self.close()
            raise SourceError(
                f"--csv {path}: header lacks {sorted(missing)}; required columns (lower case): "
                "sensor_id,timestamp,value "
                f"(or, one column per sensor: {'|'.join(WIDE_TIME_COLUMNS)},<sensor>,<sensor>,...)")
        try:
            if reader.unit == "auto":
                reader.decide(self._timestamp_cells(header.index(self.time_column), reader.sample))
        except EventTimeError as exc:
            self.close()
            raise SourceError(str(exc)) from exc
        self._fh.seek(self.offset)

    def _wide(self, path: Path, header: list[str]) -> bool:
        """Take a header without ``sensor_id`` and ``value`` as the wide layout that loggers, Grafana/InfluxDB
        and spreadsheet exports write (``time,temp_1,temp_2,...``) when it has a time column and a sensor
        column; False when it is not one. Every other named column is a sensor (``unit``/``label``/
        ``event_id`` keep their meaning for the row)."""
        if any(h.lower() == "sensor_id" for h in header):
            # "Sensor_ID,Timestamp,Value" is the long layout in other letters, not sensors: read wide, its ids
            # became readings of a sensor "Sensor_ID" and every reading one sensor "Value" (exit 0). A lone
            # "Value" column stays a sensor: "Time,Value" is how Grafana exports one series.
            return False
        time_col = next((h for h in header if h.lower() in WIDE_TIME_COLUMNS), None)
        sensors = [h for h in header if h and h != time_col and h not in _RESERVED]
        if time_col is None or not sensors:
            return False
        texts = self._text_columns(header, sensors)
        if texts:
            # "Timestamp,Device,Value,Unit" is a long file under other names: read wide, its device names
            # were dead letters and every reading of every device one sensor "Value" (°C and bar mixed)
            self.close()
            raise SourceError(
                f"--csv {path}: column(s) {texts} hold text, not readings, so this is no file with one column "
                "per sensor; a file with one reading per row needs the columns sensor_id,timestamp,value "
                "(and unit, label): rename its columns to those names")
        self.time_column, self.sensors = time_col, sensors
        log.info("--csv %s: one column per sensor (%d: %s), times in column %r", path, len(sensors),
                 ", ".join(sensors[:5]) + (", ..." if len(sensors) > 5 else ""), time_col)
        return True

    def _text_columns(self, header: list[str], columns: list[str], limit: int = 50) -> list[str]:
        """Those of ``columns`` whose cells in the first ``limit`` rows are all text (no number, no
        missing-value mark among them, at least one cell): names, units, ids, not a sensor's readings."""
        index = {name: header.index(name) for name in columns}
        numbers = dict.fromkeys(columns, 0)
        texts = dict.fromkeys(columns, 0)
        try:
            for cells in self._sample_cells(limit):
                for name, at in index.items():
                    cell = cells[at].strip() if len(cells) > at else ""
                    if cell.lower() in MISSING_CELLS:
                        continue
                    if isinstance(self._number(cell), float):
                        numbers[name] += 1
                    else:
                        texts[name] += 1
        finally:
            self._fh.seek(self._after_header)  # the time unit's sample reads these rows again
        return [name for name in columns if texts[name] and not numbers[name]]

    def _sample_cells(self, limit: int) -> Iterator[list[str]]:
        """The cells of the first ``limit`` readable data rows."""
        seen = 0
        while seen < limit:
            physical, size = read_line(self._fh, MAX_ROW_BYTES)
            if not physical:
                return
            if size > len(physical):
                continue
            for raw in _split_line(physical):
                try:
                    cells = _parse_row(raw.decode("utf-8"), self.delimiter)
                except (UnicodeDecodeError, csv.Error):
                    continue
                if cells:
                    seen += 1
                    yield cells

    def _timestamp_cells(self, column: int, limit: int) -> Iterator[str]:
        """The timestamp cells of the first data rows (for ``auto``'s one decision per file)."""
        seen = 0
        while True:
            physical, size = read_line(self._fh, MAX_ROW_BYTES)
            if not physical:
                return
            if size > len(physical):
                continue  # over-long: a dead letter of its own later, no vote
            for raw in _split_line(physical):
                if seen >= limit:
                    return
                try:
                    cells = _parse_row(raw.decode("utf-8"), self.delimiter)
                except (UnicodeDecodeError, csv.Error):
                    continue
                if len(cells) > column:
                    seen += 1
                    yield cells[column]

    def rows(self, limit: int) -> list[CsvRow]:
        """Up to ``limit`` rows (blank lines are counted, not returned); ``eof`` is set at the end."""
        out: list[CsvRow] = []
        while len(out) < limit and not self.eof:
            physical, size = read_line(self._fh, MAX_ROW_BYTES)
            if not physical:
                self.eof = True
                break
            if size == len(physical) and not physical.endswith(b"\n") and not self._last_line_ready(physical):
                continue
            start = self.offset
            self.offset += size
            if size > len(physical):
                self.line += 1
                out.append(CsvRow(self.line, physical, None, SensorValidationError(
                    f"row is {size} bytes, over the {MAX_ROW_BYTES}-byte limit of a CSV line; its head is kept",
                    "row_too_long"), start))
                continue
            for raw in _split_line(physical):
                self.line += 1
                if not raw.strip():
                    continue
                if self.sensors:
                    out.extend(self._wide_row(self.line, raw, start))
                else:
                    out.append(self._row(self.line, raw, start))
        return out

    def _last_line_ready(self, physical: bytes) -> bool:
        """An unterminated last line: True to take it as the file's last row; False after seeking back to
        read it again (the file grew) or, still being written, leaving it for the next run (``eof``)."""
        self.tail()  # before the wait: the bytes as they were read (a rewrite during it must not be taken for them)
        state = last_line_state(self._fh.fileno(), self.offset + len(physical), physical)
        if state == SETTLED:
            return True
        self._fh.seek(self.offset)
        if state == BUSY:
            log.warning("--csv %s: its last line (line %d) is still being written (or the file changed); it is left "
                        "for the next run",
                        self.path, self.line + 1)
            self.eof = True
        return False

    def tail(self) -> str | None:
        """The hash of the bytes before :attr:`offset` as they were read (:class:`~ingest.lines.TailCache`)."""
        return self._tail.at(self._fh.fileno(), self.offset)

    def _cells(self, raw: bytes) -> dict[str, str]:
        """A data row's cells by column name; SensorValidationError when it is not UTF-8, not CSV or has
        another number of cells than the header."""
        try:
            cells = _parse_row(raw.decode("utf-8"), self.delimiter)
        except UnicodeDecodeError as exc:
            raise SensorValidationError(f"row is not UTF-8 ({exc})", "bad_encoding") from exc
        except csv.Error as exc:
            raise SensorValidationError(f"row is not CSV ({exc})", "bad_csv") from exc
        if len(cells) != len(self.header):
            raise SensorValidationError(f"row has {len(cells)} cells, header has {len(self.header)}",
                                        "wrong_cell_count")
        return dict(zip(self.header, (c.strip() for c in cells), strict=True))

    def _wide_row(self, n: int, raw: bytes, start: int) -> list[CsvRow]:
        """One reading per sensor column with a value (an empty cell is no reading: exports are sparse);
        a row that cannot be read at all is one dead letter, a bad cell a dead letter of its own."""
        assert self.sensors is not None
        try:
            row = self._cells(raw)
        except SensorValidationError as exc:
            return [CsvRow(n, raw, None, exc, start)]
        stamp: int | SensorValidationError
        try:
            stamp = self.reader(row[self.time_column])
        except EventTimeError as exc:
            stamp = as_sensor_error(exc)
        unit, label = row.get("unit") or self.unit, _parse_label(row.get("label", ""))
        out = []
        for name in self.sensors:
            if row[name].strip().lower() in MISSING_CELLS:
                continue
            self.filled.add(name)
            record: dict[str, Any] = {"sensor_id": name, "value": self._number(row[name]), "values": {},
                                      "unit": unit, "label": label, "event_id": None}
            found: list[SensorValidationError] = []
            if isinstance(stamp, int):
                record["timestamp"] = stamp
            else:
                found.append(stamp)
            try:
                out.append(CsvRow(n, raw, validate(record, now=self.ref, policy=self.policy, problems=found), None,
                                  start, name))
            except SensorValidationError as exc:
                out.append(CsvRow(n, raw, None, exc, start, name))
        return out

    def _row(self, n: int, raw: bytes, start: int) -> CsvRow:
        try:
            row = self._cells(raw)
            record: dict[str, Any] = {
                "sensor_id": row["sensor_id"],
                "value": self._number(row["value"]),
                "values": {k: self._number(v) for k, v in row.items()
                           if k not in _RESERVED and v.strip().lower() not in MISSING_CELLS},
                "unit": row.get("unit") or self.unit,
                "label": _parse_label(row.get("label", "")),
                "event_id": row.get("event_id") or None,
            }
            found: list[SensorValidationError] = []
            try:
                record["timestamp"] = self.reader(row["timestamp"])
            except EventTimeError as exc:
                found.append(as_sensor_error(exc))
            return CsvRow(n, raw, validate(record, now=self.ref, policy=self.policy, problems=found), None, start)
        except SensorValidationError as exc:
            return CsvRow(n, raw, None, exc, start)

    def _number(self, text: str) -> float | str:
        """A number cell; in a ';'-separated file a decimal comma ('1,5') is the decimal mark."""
        if self.delimiter == ";" and _DECIMAL_COMMA.fullmatch(text):
            text = text.replace(",", ".")
        elif self.delimiter == ";" and _GROUPED_DECIMAL_COMMA.fullmatch(text):
            text = text.replace(".", "").replace(",", ".")
        return _parse_float(text)

    def close(self) -> None:
        self._fh.close()


def read_csv(path: Path, *, unit: str = "unit", now: int | None = None, policy: EventTimePolicy | None = None,
             timestamp_unit: str = "auto", reader: TimestampReader | None = None) -> Iterator[CsvRow]:
    """Parse and validate every data row of ``path``; bad rows come back with their error.

    Streamed (:class:`CsvReader`); with ``timestamp_unit="auto"`` the unit is decided from the first
    rows before any row is yielded, and SourceError is raised (nothing yielded yet) when it cannot.
    """
    rows = CsvReader(path, unit=unit, now=now, policy=policy,
                     reader=reader or (policy or LIVE).reader(timestamp_unit, source=f"--csv {path}"))
    try:
        while not rows.eof:
            yield from rows.rows(1000)
    finally:
        rows.close()


def default_checkpoint_path(settings: Settings, path: Path, *, unit: str = "unit",
                            policy: EventTimePolicy | None = None, timestamp_unit: str = "auto") -> Path:
    """Checkpoint of one CSV read with one set of flags, under ``settings.state_dir / "sensor"``.

    The flags that decide what becomes of a row (unit, timestamp unit, the event-time window, live or
    backfill) are part of the key: the same command resumes (or, finished, publishes nothing), while
    the same file with other flags - typically ``--backfill`` after a live run refused the history -
    is a run of its own. A backfill's run id is not part of it (it is new per invocation).
    """
    return file_checkpoint_path(source_state_dir(settings, "sensor"), path,
                                {"unit": unit, **policy_flags(policy or LIVE, timestamp_unit)})


class SensorCsvSource(SourcePartition):
    """The rows of one sensor CSV file as source items (see the module docstring for resume)."""

    kind = "sensor"

    def __init__(self, path: Path, *, resume_state: dict[str, Any] | None = None, unit: str = "unit",
                 policy: EventTimePolicy | None = None, timestamp_unit: str = "auto", batch_rows: int = 1000,
                 now: int | None = None) -> None:
        self.given = str(path)  # the file as the user named it: dl.source_file
        self.path = Path(path).absolute()
        self.name = str(self.path)
        self.batch_rows = batch_rows
        self.on_read: Callable[[int], None] | None = None
        self._ids = PositionIds()
        self.pos = FilePosition.resume(self.path, resume_state, f"--csv {path}", head_bytes=MAX_ROW_BYTES)
        pos = self.pos
        policy = policy or LIVE
        saved_run = (resume_state or {}).get("backfill_run")
        if policy.backfill and isinstance(saved_run, str) and saved_run and \
                pos.generation == (resume_state or {}).get("generation"):
            # The same run resumed: its records keep the run id they had. A new id per invocation split one
            # backfill into two runs at the kill, and the featurizers keep runs' windows apart: each sensor
            # lost a training row and had 16 partial windows more than an uninterrupted run.
            policy = replace(policy, run_id=saved_run)
        self.run_id = policy.run_id
        self._headers = policy.headers()
        self.reader = (policy or LIVE).reader(timestamp_unit, source=f"--csv {path}")
        self.csv = CsvReader(self.path, unit=unit, now=now, policy=policy, reader=self.reader,
                             offset=pos.offset, line=pos.line)
        pos.offset, pos.line = self.csv.offset, self.csv.line

    def next_batch(self) -> list[SourceItem]:
        if self.csv.eof:
            raise StopIteration
        rows = self.csv.rows(self.batch_rows)
        if self.on_read is not None and self.csv.offset > self.pos.offset:
            self.on_read(self.csv.offset - self.pos.offset)  # bytes read: the progress bar or line
        self.pos.offset, self.pos.line = self.csv.offset, self.csv.line
        if not rows and self.csv.eof:
            raise StopIteration
        return [self._item(row) for row in rows]

    def _item(self, row: CsvRow) -> SourceItem:
        # A wide row holds a reading per sensor column: the column is part of each one's id.
        identity = self.pos.identity if row.column is None else f"{self.pos.identity}#{row.column}"
        item = SourceItem(self._ids.at(identity, row.start), row.raw, record=row.record, error=row.error,
                          source={"file": self.given, "line": str(row.line)}, headers=self._headers)
        if row.error is not None:
            item.source = dead_letter_source(self.given, row.line, row.error)
        if row.column is not None:
            item.source["column"] = row.column
        return item

    def snapshot(self) -> dict[str, Any]:
        state = self.pos.snapshot(self.csv.tail())
        if self.run_id:
            state["backfill_run"] = self.run_id
        return state

    def close(self) -> None:
        self.csv.close()


def publish_csv(settings: Settings, publisher: Publisher, path: Path, *, unit: str = "unit",
                policy: EventTimePolicy | None = None, timestamp_unit: str = "auto",
                checkpoint_path: Path | None = None, batch_rows: int = 1000,
                on_start: Callable[[int, Path], None] | None = None,
                stop: threading.Event | None = None,
                on_read: Callable[[int], None] | None = None) -> SensorIngestStats:
    """Publish the valid rows of a CSV file exactly once; dead-letter the others (original row bytes +
    reasons). Resumes after the last acknowledged row of an earlier run of the same file.

    Rows of a backfill (``policy.backfill``) carry the backfill header naming the run. Waits for
    every ack before returning, so a zero exit status means everything is in Kafka. ``on_start`` is
    called with the first line this run reads and the checkpoint file, before anything is sent.
    ``stop`` ends the run early, checkpointed (the same call resumes). ``on_read(n)`` is called with the
    bytes of each batch read (``ingest sensors``' progress).
    """
    cp_path = checkpoint_path or default_checkpoint_path(settings, path, unit=unit, policy=policy,
                                                         timestamp_unit=timestamp_unit)

    def build(state: dict[str, Any] | None) -> SensorCsvSource:
        return SensorCsvSource(path, resume_state=state, unit=unit, policy=policy, timestamp_unit=timestamp_unit,
                               batch_rows=batch_rows)

    resumed = cp_path.exists()
    runner = SourceRunner(settings, publisher, build, kind="sensor", checkpoint_path=cp_path)
    assert isinstance(runner.source, SensorCsvSource)
    source = runner.source
    source.on_read = on_read
    from_line = source.pos.line + 1
    if on_start is not None:
        on_start(from_line, cp_path)
    if (source.csv.eof or source.pos.at_end()) and not resumed:
        log.warning("--csv %s has no rows%s: nothing to publish", path,
                    "" if source.csv.header_line else " (the file is empty)")
    elif source.csv.eof or source.pos.at_end():
        log.warning("--csv %s was published to its end by an earlier run with these flags (checkpoint %s); "
                    "delete the checkpoint to publish it again", path, cp_path)
    stats = runner.run(stop)
    read_rows = source.pos.line + 1 > from_line
    empty = [s for s in source.csv.sensors or () if s not in source.csv.filled] if read_rows else []
    if empty:
        log.warning("--csv %s: sensor column(s) %s had no reading in the rows this run read (every cell empty "
                    "or a missing-value marker); check the column names", path, empty)
    return SensorIngestStats(stats.published, stats.dead_lettered, dict(stats.reasons) or None,
                             timestamp_unit=source.reader.decided, skipped_duplicates=stats.skipped_duplicates,
                             from_line=from_line, checkpoint=str(cp_path), empty_columns=empty or None,
                             backfill_run=source.run_id or None)
