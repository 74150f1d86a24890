"""streaming.logs: repeats of one reason are counted, not printed; TensorFlow kept quiet."""

from __future__ import annotations

import io
import logging

import pytest

from streaming.logs import AggregatingHandler, reason_of, setup_logging


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _logger(handler: logging.Handler, name: str = "t.agg") -> logging.Logger:
    lg = logging.getLogger(name)
    lg.handlers[:] = [handler]
    lg.propagate = False
    lg.setLevel(logging.DEBUG)
    return lg


def test_a_flood_of_one_reason_prints_one_line_per_interval_with_a_count() -> None:
    out, clock = io.StringIO(), Clock()
    h = AggregatingHandler(logging.StreamHandler(out), interval_s=10, clock=clock)
    h.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    lg = _logger(h)
    for i in range(943):  # the demo's flood: one reason, 943 times in ~7 s
        clock.t += 0.0075
        lg.warning("gateway-weblog: gateway not reachable yet: [Errno %d] refused (attempt %d)", 111, i)
    assert out.getvalue().count("\n") == 1
    clock.t += 10
    lg.warning("gateway-weblog: gateway not reachable yet: [Errno %d] refused (attempt %d)", 111, 943)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "942 like this before in the last" in lines[1]


def test_different_reasons_are_kept_apart_and_info_passes() -> None:
    out, clock = io.StringIO(), Clock()
    h = AggregatingHandler(logging.StreamHandler(out), interval_s=10, clock=clock)
    lg = _logger(h, "t.agg2")
    for _ in range(5):
        lg.warning("late reading for sensor 's-3'")
        lg.error("disk full")
        lg.info("batch written")
    lines = out.getvalue().splitlines()
    assert lines.count("late reading for sensor 's-3'") == 1
    assert lines.count("disk full") == 1
    assert lines.count("batch written") == 5


def test_pending_counts_are_printed_at_flush() -> None:
    out, clock = io.StringIO(), Clock()
    h = AggregatingHandler(logging.StreamHandler(out), interval_s=10, clock=clock)
    lg = _logger(h, "t.agg3")
    for n in range(4):
        lg.warning("late reading at %d", n)
    h.flush()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "3 more like this" in lines[1]


def test_numbers_do_not_split_a_reason() -> None:
    a = logging.makeLogRecord({"name": "x", "levelno": 30, "msg": "late reading for sensor 's-3' at 17000"})
    b = logging.makeLogRecord({"name": "x", "levelno": 30, "msg": "late reading for sensor 's-12' at 17999.5"})
    assert reason_of(a) == reason_of(b)


def test_setup_logging_quiet_and_tensorflow_silence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    root = logging.getLogger()
    old_level, old_handlers = root.level, list(root.handlers)
    try:
        out = io.StringIO()
        setup_logging("INFO", quiet=True, stream=out)
        import os

        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
        assert root.level == logging.WARNING
        assert logging.getLogger("absl").level == logging.ERROR
        logging.getLogger("t.quiet").info("hidden")
        logging.getLogger("t.quiet").warning("shown")
        assert out.getvalue().strip().endswith("shown") and "hidden" not in out.getvalue()
    finally:
        for h in list(root.handlers):
            if h not in old_handlers:
                root.removeHandler(h)
        root.setLevel(old_level)


def test_control_characters_in_a_message_are_escaped_and_a_traceback_keeps_its_lines() -> None:
    """A file name or rejected value with an escape sequence reached the terminal as one; a newline in
    it forged a log line of its own."""
    import io

    from streaming.logs import setup_logging

    out = io.StringIO()
    setup_logging(stream=out)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("t").exception("skipped %s", "evil\x1b]0;pwned\x07.log\n2026-01-01 INFO forged")
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert "evil\\x1b]0;pwned\\x07.log\\x0a2026-01-01 INFO forged" in text
    assert "Traceback (most recent call last):\n" in text and text.rstrip().endswith("ValueError: boom")


def test_a_cancelled_metadata_refresh_at_close_is_not_printed_as_an_error() -> None:
    """kafka-python logs ERROR "Metadata refresh: failed Cancelled" when a client closes with a refresh in
    flight; it ended ``retrain --reproduce`` runs that had worked. Other metadata failures still print."""
    from kafka.errors import Cancelled, NodeNotReadyError

    root = logging.getLogger()
    old_level, old_handlers = root.level, list(root.handlers)
    try:
        out = io.StringIO()
        setup_logging("INFO", stream=out)
        cluster = logging.getLogger("kafka.cluster")
        cluster.error("Metadata refresh: failed %s", Cancelled())
        cluster.error("Metadata refresh: failed %s", NodeNotReadyError("metadata"))
        assert "Cancelled" not in out.getvalue() and "NodeNotReadyError" in out.getvalue()
    finally:
        for h in list(root.handlers):
            if h not in old_handlers:
                root.removeHandler(h)
        root.setLevel(old_level)
