"""One progress reporter for every long job (ingest, publish --generate, replay, training, reproduce).

Why one module: a user watching a 20 s ingest or a 77 s first training must see that work is moving,
in the same shape everywhere, and ``--quiet`` must silence all of it with one switch. On a terminal
(stderr is a TTY) a rich bar shows count, rate and, when the total is known, the ETA. Off a terminal
(logs, CI, a pipe) one plain line is logged every ``interval`` seconds plus a closing line, so log files
stay short. Usage::

    from streaming.progress import progress

    with progress(total=len(lines), desc="ingest access.log") as bar:
        for chunk in chunks:
            ...
            bar.advance(len(chunk))

``quiet=None`` (the default) follows the process-wide setting made once by the CLI through
:func:`configure` (``--quiet``); pass ``quiet=True/False`` to override it for one job.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import IO, Any

log = logging.getLogger("streamlearn.progress")

_DEFAULTS: dict[str, Any] = {"quiet": False, "interval": 10.0, "tty": None}


def configure(*, quiet: bool | None = None, interval: float | None = None, tty: bool | None = None) -> None:
    """Set the process-wide defaults (the CLI calls this once from ``--quiet``).

    ``tty`` forces the terminal (True) or line (False) mode; None detects it from stderr.
    """
    if quiet is not None:
        _DEFAULTS["quiet"] = quiet
    if interval is not None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        _DEFAULTS["interval"] = interval
    _DEFAULTS["tty"] = tty


def is_quiet() -> bool:
    """Whether ``--quiet`` is in force (other chatty output, e.g. summaries on stderr, may follow it)."""
    return bool(_DEFAULTS["quiet"])


def _fmt_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Counts work done; renders it as a bar (TTY), periodic log lines (no TTY) or not at all (quiet).

    ``advance`` is thread-safe and cheap: line mode only formats when an interval has passed.
    """

    def __init__(self, total: int | None, desc: str, *, quiet: bool, interval: float, tty: bool,
                 unit: str = "items", stream: IO[str] | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.quiet, self.interval, self.tty = quiet, interval, tty
        self.done = 0
        self.started = time.monotonic()
        self._last_line = self.started
        self._lock = threading.Lock()
        self._bar: Any = None
        self._task: Any = None
        self._stream = stream

    # ---- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> Progress:
        self.started = self._last_line = time.monotonic()
        if self.quiet or not self.tty:
            return self
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        columns: list[Any] = [TextColumn("[bold]{task.description}")]
        if self.total is not None:
            columns += [BarColumn(), MofNCompleteColumn()]
        else:
            columns += [TextColumn("{task.completed:,.0f}")]
        columns += [TextColumn(f"{{task.fields[rate]}} {self.unit}/s"), TimeElapsedColumn()]
        if self.total is not None:
            columns += [TextColumn("ETA"), TimeRemainingColumn()]
        console = Console(file=self._stream or sys.stderr, force_terminal=True)
        self._bar = RichProgress(*columns, console=console, transient=False, refresh_per_second=4)
        self._bar.start()
        self._task = self._bar.add_task(self.desc, total=self.total, rate="0")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, rate=self._rate_text())
            self._bar.stop()
            self._bar = None
        elif not self.quiet:
            outcome = "failed" if exc_type is not None and exc_type is not GeneratorExit else "done"
            self._emit(f"{self.desc}: {outcome}, {self.done:,} {self.unit} in "
                       f"{_fmt_duration(time.monotonic() - self.started)} ({self._rate_text()} {self.unit}/s)")

    # ---- counting --------------------------------------------------------------------------------
    def advance(self, n: int = 1) -> None:
        """Record ``n`` more units of work done."""
        with self._lock:
            self.done += n
            if self.quiet:
                return
            if self._bar is not None:
                self._bar.update(self._task, advance=n, rate=self._rate_text())
                return
            now = time.monotonic()
            if now - self._last_line < self.interval:
                return
            self._last_line = now
        self._emit(self.line())

    def set_total(self, total: int | None) -> None:
        """The total became known (or changed), e.g. after a count of end offsets."""
        with self._lock:
            self.total = total
            if self._bar is not None:
                self._bar.update(self._task, total=total)

    def set_description(self, desc: str) -> None:
        with self._lock:
            self.desc = desc
            if self._bar is not None:
                self._bar.update(self._task, description=desc)

    # ---- rendering -------------------------------------------------------------------------------
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def _rate_text(self) -> str:
        rate = self.rate()
        return f"{rate:,.0f}" if rate >= 10 else f"{rate:.1f}"

    def line(self) -> str:
        """The off-terminal line: ``desc: 1,200/30,000 (4%) 812 items/s, 12s elapsed, ETA 35s``."""
        elapsed = _fmt_duration(time.monotonic() - self.started)
        rate = self.rate()
        if self.total:
            pct = 100.0 * self.done / self.total
            eta = _fmt_duration((self.total - self.done) / rate) if rate > 0 else "?"
            return (f"{self.desc}: {self.done:,}/{self.total:,} ({pct:.0f}%) {self._rate_text()} {self.unit}/s, "
                    f"{elapsed} elapsed, ETA {eta}")
        return f"{self.desc}: {self.done:,} {self.unit}, {self._rate_text()} {self.unit}/s, {elapsed} elapsed"

    def _emit(self, text: str) -> None:
        if self._stream is not None:
            print(text, file=self._stream, flush=True)
        else:
            log.info("%s", text)


@contextmanager
def progress(total: int | None, desc: str, quiet: bool | None = None, *, unit: str = "items",
             interval: float | None = None, tty: bool | None = None,
             stream: IO[str] | None = None) -> Iterator[Progress]:
    """A context manager yielding a :class:`Progress`; see the module docstring.

    ``stream``: where lines (or the bar) go; by default the bar draws on stderr and lines go to the
    ``streamlearn.progress`` logger at INFO (so they carry the log's timestamps).
    """
    q = _DEFAULTS["quiet"] if quiet is None else quiet
    iv = float(_DEFAULTS["interval"] if interval is None else interval)
    t = tty if tty is not None else _DEFAULTS["tty"]
    if t is None:
        target = stream or sys.stderr
        t = bool(getattr(target, "isatty", lambda: False)())
    with Progress(total, desc, quiet=bool(q), interval=iv, tty=bool(t), unit=unit, stream=stream) as bar:
        yield bar
