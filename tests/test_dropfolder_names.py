"""Names in the drop folder's processed/ and rejected/: an earlier file's sidecars are never overwritten,
a copy of bytes already published is moved beside a note that names the first file (never sent twice),
and ``--idle-exit`` does not leave a file that is still being written without a word."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streaming.config import Settings


def _png(shade: int, w: int = 8, h: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w), shade, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), color=shade).save(buf, format="JPEG")
    return buf.getvalue()


def _run(settings: Settings, watch: Path, **kwargs: float) -> tuple[int, int, int]:
    """One once-run of a watcher on ``watch`` (files taken as soon as they are seen)."""
    from ingest.images import ImageWatcher
    from streaming.producer import Publisher

    with Publisher(settings) as pub:
        watcher = ImageWatcher(settings, pub, watch, settle_s=0.0, **kwargs)
        try:
            watcher.run(follow=False)
        finally:
            watcher.close()
    return watcher.published, watcher.rejected_count, watcher.duplicates


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_name_taken_in_processed_or_rejected_keeps_the_earlier_files_sidecars(settings: Settings,
                                                                                tmp_path: Path) -> None:
    """The collision name was chosen after the .label/.reason were written under the original name,
    so the second cat.png's label 'dog' replaced the first one's 'cat' in processed/."""
    from streaming.producer import header_dict
    from streaming.topics import dead_letter_topic, raw_topic
    from tests.helpers import read_topic

    watch = tmp_path / "drop"
    watch.mkdir()
    (watch / "cat.png").write_bytes(_png(10))
    (watch / "cat.png.label").write_text("cat\n")
    (watch / "shot.png").write_bytes(_png(20))
    (watch / "shot.label").write_text("first\n")  # the x.label form
    (watch / "bad.png").write_bytes(b"not a png at all")
    assert _run(settings, watch) == (2, 1, 0)

    (watch / "cat.png").write_bytes(_png(11))  # other bytes, the same name
    (watch / "cat.png.label").write_text("dog\n")
    (watch / "shot.jpg").write_bytes(_jpeg(30))  # another name, but shot.label is taken in processed/
    (watch / "shot.label").write_text("second\n")
    (watch / "bad.png").write_bytes(_png(12)[:-12])  # truncated this time
    assert _run(settings, watch) == (2, 1, 0)

    processed, rejected = watch / "processed", watch / "rejected"
    cat2 = f"cat.{hashlib.sha256(_png(11)).hexdigest()[:12]}.png"
    shot2 = f"shot.{hashlib.sha256(_jpeg(30)).hexdigest()[:12]}"
    bad2 = f"bad.{hashlib.sha256(_png(12)[:-12]).hexdigest()[:12]}.png"
    assert _names(processed) == sorted(["cat.png", "cat.png.label", cat2, f"{cat2}.label", "shot.png", "shot.label",
                                        f"{shot2}.jpg", f"{shot2}.label"])
    assert (processed / "cat.png.label").read_text() == "cat\n"
    assert (processed / f"{cat2}.label").read_text() == "dog\n"
    assert (processed / "shot.label").read_text() == "first\n"
    assert (processed / f"{shot2}.label").read_text() == "second\n"
    assert (processed / cat2).read_bytes() == _png(11)
    assert _names(rejected) == sorted(["bad.png", "bad.png.reason", bad2, f"{bad2}.reason"])
    assert (rejected / "bad.png.reason").read_text().startswith("bad_magic:")
    assert (rejected / f"{bad2}.reason").read_text().startswith("truncated:")
    assert _names(watch) == ["processed", "rejected"]
    records = read_topic(settings, raw_topic(settings, "image"), expect=4)
    assert sorted((r.value["source"], r.value["label"]) for r in records) == [
        ("cat.png", "cat"), ("cat.png", "dog"), ("shot.jpg", "second"), ("shot.png", "first")]
    dls = read_topic(settings, dead_letter_topic(settings, "image"), decode=False, expect=2)
    assert sorted(header_dict(d.headers)["dl.source_reason"] for d in dls) == ["bad_magic", "truncated"]


def test_a_copy_of_published_bytes_under_another_name_is_moved_beside_a_note_naming_the_first(
        settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """b.png (the bytes of a.png, labelled 'dog') went to processed/ without a word: nothing said it was
    not published, and its label was lost. The event id is the bytes': still published once."""
    from streaming.topics import dead_letter_topic, raw_topic
    from tests.helpers import read_topic

    watch = tmp_path / "drop"
    watch.mkdir()
    photo = _png(40)
    (watch / "a.png").write_bytes(photo)
    (watch / "a.png.label").write_text("cat\n")
    (watch / "b.png").write_bytes(photo)  # the same batch: b.png's event id is still in flight
    (watch / "b.png.label").write_text("dog\n")
    (watch / "x.bin").write_bytes(b"junk bytes")
    (watch / "y.bin").write_bytes(b"junk bytes")
    caplog.set_level(logging.INFO, logger="ingest.images")
    counts = _run(settings, watch)
    processed, rejected = watch / "processed", watch / "rejected"
    assert _names(processed) == ["a.png", "a.png.label", "b.png", "b.png.duplicate", "b.png.label"]
    assert counts == (1, 1, 2)  # published, rejected, copies moved beside a note
    note = (processed / "b.png.duplicate").read_text()
    assert note.startswith("duplicate: same bytes") and "processed/a.png" in note, note
    assert "no longer there" not in note, note  # a.png was moved in the same batch, after the note was planned
    assert "'dog'" in note and "'cat'" in note, note  # the label that was not published is recorded
    assert (processed / "b.png.label").read_text() == "dog\n"
    y_note = (rejected / "y.bin.reason").read_text()
    assert y_note.startswith("bad_magic:") and "rejected/x.bin" in y_note and "not dead-lettered again" in y_note
    assert any("b.png" in r.getMessage() and "processed/a.png" in r.getMessage() for r in caplog.records)

    (watch / "c.png").write_bytes(photo)  # a later run, labelled as the first: a note, no label line
    (watch / "c.png.label").write_text("cat\n")
    (watch / "d.jpg").write_bytes(photo)  # PNG bytes named .jpg: refused on its own, and a copy
    assert _run(settings, watch) == (0, 0, 2)
    c_note = (processed / "c.png.duplicate").read_text()
    assert "processed/a.png" in c_note and "label" not in c_note, c_note
    d_note = (rejected / "d.jpg.reason").read_text()
    assert d_note.startswith("wrong_extension:") and "processed/a.png" in d_note, d_note
    assert _names(watch) == ["processed", "rejected"]
    (record,) = read_topic(settings, raw_topic(settings, "image"), idle_timeout=1.0)
    assert (record.value["source"], record.value["label"]) == ("a.png", "cat")
    assert len(read_topic(settings, dead_letter_topic(settings, "image"), decode=False, idle_timeout=1.0)) == 1


def test_a_move_cut_short_by_a_kill_ends_under_the_name_it_was_given(settings: Settings, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the note was written but before the file moved: the next run moves it under the same
    name (its own note is not taken for an earlier file's) and does not dead-letter it again."""
    import ingest.images
    from streaming.topics import dead_letter_topic
    from tests.helpers import read_topic

    watch = tmp_path / "drop"
    watch.mkdir()
    (watch / "bad.png").write_bytes(b"not a png")

    def killed(plan: object) -> None:
        note = plan.note  # type: ignore[attr-defined]
        note[0].write_text(note[1])
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest.images, "carry_out", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(settings, watch)
    monkeypatch.undo()
    assert _names(watch / "rejected") == ["bad.png.reason"]
    assert _run(settings, watch) == (0, 0, 0)
    assert _names(watch / "rejected") == ["bad.png", "bad.png.reason"]
    assert len(read_topic(settings, dead_letter_topic(settings, "image"), decode=False, idle_timeout=1.0)) == 1


@pytest.mark.timeout(120)
def test_idle_exit_waits_for_a_file_still_being_written(settings: Settings, tmp_path: Path) -> None:
    """The runner counted the settle time of a file as idleness: --idle-exit 0.2 exited at once and left
    the file in the folder, unpublished, without a word."""
    from ingest.images import ImageWatcher
    from streaming.producer import Publisher

    watch = tmp_path / "drop"
    watch.mkdir()
    (watch / "late.png").write_bytes(_png(50))  # mtime now: not settled for settle_s (1.5 s)
    with Publisher(settings) as pub:
        watcher = ImageWatcher(settings, pub, watch, settle_s=1.5)
        try:
            watcher.run(follow=True, poll_s=0.05, idle_exit_s=0.2)
        finally:
            watcher.close()
    assert watcher.published == 1
    assert _names(watch / "processed") == ["late.png"]


@pytest.mark.timeout(120)
def test_idle_exit_logs_each_file_it_leaves_when_one_never_settles(settings: Settings, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from ingest.images import ImageWatcher
    from streaming.producer import Publisher

    watch = tmp_path / "drop"
    watch.mkdir()
    (watch / "slow.png").write_bytes(_png(60))
    caplog.set_level(logging.WARNING, logger="ingest.images")
    started = time.monotonic()
    with Publisher(settings) as pub:  # settles after 60 s; waited for 0.3 s past the idle exit
        watcher = ImageWatcher(settings, pub, watch, settle_s=60.0, max_settle_wait_s=0.3)
        try:
            watcher.run(follow=True, poll_s=0.05, idle_exit_s=0.2)
        finally:
            watcher.close()
    assert time.monotonic() - started < 30
    assert (watcher.published, _names(watch)) == (0, ["processed", "rejected", "slow.png"])
    assert any("slow.png is still being written" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.timeout(180)
def test_ingest_images_idle_exit_publishes_a_file_still_being_written(settings: Settings, tmp_path: Path) -> None:
    from tests.helpers import streamlearn_cmd, subprocess_env

    watch = tmp_path / "drop"
    watch.mkdir()
    (watch / "late.png").write_bytes(_png(70))
    cmd = streamlearn_cmd("ingest", "images", "--watch", str(watch), "--idle-exit", "0.3", "--settle", "3",
                          "--poll", "0.05")
    done = subprocess.run(cmd, env=subprocess_env(settings), capture_output=True, timeout=150)
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert (report["published"], report["rejected"], report["duplicates"]) == (1, 0, 0), report
    assert _names(watch / "processed") == ["late.png"]
