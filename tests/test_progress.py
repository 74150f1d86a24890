"""streaming.progress: bar on a terminal, periodic lines off it, nothing when quiet."""

from __future__ import annotations

import io
import logging

import pytest

from streaming import progress as progress_mod
from streaming.progress import progress


def test_line_mode_emits_periodic_lines_and_a_closing_line() -> None:
    out = io.StringIO()
    with progress(100, "ingest x", quiet=False, tty=False, interval=1e-9, stream=out, unit="lines") as bar:
        for _ in range(4):
            bar.advance(25)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5, lines
    assert lines[0].startswith("ingest x: 25/100 (25%)")
    assert "ETA" in lines[0] and "lines/s" in lines[0]
    assert lines[-1].startswith("ingest x: done, 100 lines in")


def test_line_mode_is_rate_limited() -> None:
    out = io.StringIO()
    with progress(None, "stream", quiet=False, tty=False, interval=3600, stream=out) as bar:
        for _ in range(1000):
            bar.advance()
    lines = out.getvalue().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("stream: done, 1,000 items in")


def test_unknown_total_has_no_eta() -> None:
    out = io.StringIO()
    with progress(None, "replay", quiet=False, tty=False, interval=1e-9, stream=out) as bar:
        bar.advance(7)
    assert out.getvalue().splitlines()[0].startswith("replay: 7 items,")
    assert "ETA" not in out.getvalue()


def test_quiet_prints_nothing_in_either_mode() -> None:
    for tty in (True, False):
        out = io.StringIO()
        with progress(10, "quiet job", quiet=True, tty=tty, interval=1e-9, stream=out) as bar:
            bar.advance(10)
        assert out.getvalue() == ""
        assert bar.done == 10


def test_configure_sets_the_process_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_mod, "_DEFAULTS", dict(progress_mod._DEFAULTS))
    progress_mod.configure(quiet=True)
    out = io.StringIO()
    with progress(3, "job", tty=False, interval=1e-9, stream=out) as bar:
        bar.advance(3)
    assert out.getvalue() == "" and progress_mod.is_quiet()
    with pytest.raises(ValueError, match="interval"):
        progress_mod.configure(interval=0)


def test_terminal_mode_draws_a_rich_bar_with_count_rate_and_eta() -> None:
    out = io.StringIO()
    with progress(50, "train epochs", quiet=False, tty=True, stream=out, unit="rows") as bar:
        bar.advance(20)
        bar.advance(30)
    text = out.getvalue()
    assert "train epochs" in text and "50/50" in text and "rows/s" in text and "ETA" in text


def test_line_mode_logs_by_default(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="streamlearn.progress"):
        with progress(2, "publish", quiet=False, tty=False, interval=1e-9) as bar:
            bar.advance(2)
    msgs = [r.getMessage() for r in caplog.records if r.name == "streamlearn.progress"]
    assert msgs[0].startswith("publish: 2/2 (100%)") and msgs[-1].startswith("publish: done")


def test_failure_is_reported_as_failed() -> None:
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with progress(5, "job", quiet=False, tty=False, interval=3600, stream=out) as bar:
            bar.advance(2)
            raise RuntimeError("boom")
    assert out.getvalue().startswith("job: failed, 2 items")


def test_training_callback_counts_rows_and_names_the_epoch() -> None:
    """trainer.training's Keras callback, driven by hand (no TensorFlow needed for the arithmetic)."""
    import types

    from trainer.training import _progress_callback

    fake_keras = types.SimpleNamespace(callbacks=types.SimpleNamespace(Callback=object))
    out = io.StringIO()
    rows, batch_size, epochs = 250, 100, 2
    with progress(rows * epochs, "train m epoch 1/2", quiet=False, tty=False, interval=3600, stream=out,
                  unit="rows") as bar:
        cb = _progress_callback(fake_keras, bar, "m", epochs, rows, batch_size)
        for epoch in range(epochs):
            for batch in range(3):  # 100 + 100 + 50 rows
                cb.on_train_batch_end(batch)
            cb.on_epoch_end(epoch)
            if epoch == 0:
                assert bar.done == rows and bar.desc == "train m epoch 2/2 (250 rows)"
    assert bar.done == rows * epochs
    assert out.getvalue().startswith("train m epoch 2/2 (250 rows): done, 500 rows in")
