"""Image validation against hostile files (bomb headers, truncation, wrong extension, junk)."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ingest.exceptions import ImageValidationError
from ingest.generators import digits, render_png
from ingest.images import inspect, label_for
from tests.test_ingest_tailer import kill9


def _png(w: int = 16, h: int = 12) -> bytes:
    return render_png(np.arange(w * h).reshape(h, w) % 256)


def _jpeg(w: int = 16, h: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def png_bomb(w: int = 100_000, h: int = 100_000) -> bytes:
    """A tiny PNG whose IHDR declares a huge image (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat_data = zlib.compress(b"\x00" * 1000)
    idat = struct.pack(">I", len(idat_data)) + b"IDAT" + idat_data + struct.pack(">I", zlib.crc32(b"IDAT" + idat_data))
    return b"\x89PNG\r\n\x1a\n" + chunk + idat + b"\x00\x00\x00\x00IEND\xaeB`\x82"


def jpeg_bomb() -> bytes:
    data = bytearray(_jpeg())
    i = data.find(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", 60000, 60000)
    return bytes(data)


def test_valid_png_and_jpeg() -> None:
    info = inspect(_png(16, 12), "a.png")
    assert (info.content_type, info.width, info.height) == ("PNG", 16, 12)
    info = inspect(_jpeg(20, 10), "b.JPG")
    assert (info.content_type, info.width, info.height) == ("JPEG", 20, 10)
    d = next(digits(1))
    assert inspect(d["data"], "d.png").width == 8


@pytest.mark.parametrize(
    ("make", "name", "reason"),
    [
        (lambda: png_bomb(), "bomb.png", "too_many_pixels"),
        (lambda: png_bomb(4096, 4097), "tall.png", "too_many_pixels"),
        (lambda: jpeg_bomb(), "bomb.jpg", "too_many_pixels"),
        (lambda: _png()[:-20], "cut.png", "truncated"),
        (lambda: _jpeg()[:-2], "cut.jpg", "truncated"),
        (lambda: _jpeg()[:40], "head.jpg", "truncated"),
        (lambda: _jpeg(), "fake.png", "wrong_extension"),
        (lambda: _png(), "fake.jpeg", "wrong_extension"),
        (lambda: _png(), "x.gif", "wrong_extension"),
        (
            lambda: bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8)),
            "r.png",
            "bad_magic",
        ),
        (lambda: b"", "e.png", "empty"),
        (lambda: png_bomb(0, 5), "zero.png", "bad_dimensions"),
        (lambda: _png()[:16] + b"\x00" * 20 + _png()[36:], "crc.png", "bad_header"),
    ],
)
def test_hostile_images_rejected_before_decoding(make, name: str, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ImageValidationError) as info:
        inspect(make(), name)
    assert info.value.reason == reason, str(info.value)


def test_corrupt_middle_caught_by_decode() -> None:
    good = bytearray(_png(64, 64))
    i = good.find(b"IDAT")
    good[i + 10 : i + 30] = b"\xff" * 20  # damage the compressed data, keep headers + IEND
    with pytest.raises(ImageValidationError) as info:
        inspect(bytes(good), "c.png")
    assert info.value.reason == "corrupt"


def test_labels(tmp_path: Path) -> None:
    (tmp_path / "a.png.label").write_text("cat\n")
    (tmp_path / "b.label").write_text("dog")
    assert label_for(tmp_path / "a.png") == "cat"
    assert label_for(tmp_path / "b.png") == "dog"
    assert label_for(tmp_path / "7_abc.png") == "7"
    assert label_for(tmp_path / "plain.png") is None
    assert label_for(tmp_path / "_x.png") is None


# -- the watcher against the real broker ------------------------------------------------------


def test_watcher_publishes_valid_and_dead_letters_hostile_files(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ingest.images import ImageWatcher
    from streaming.producer import Publisher, header_dict
    from streaming.topics import dead_letter_topic, raw_topic
    from tests.helpers import read_topic

    watch = tmp_path / "in"
    watch.mkdir()
    d = list(digits(3))
    (watch / "7_abc.png").write_bytes(d[0]["data"])
    (watch / "plain.png").write_bytes(d[1]["data"])
    (watch / "plain.png.label").write_text("one\n")
    (watch / "photo.jpg").write_bytes(_jpeg(30, 20))
    (watch / "bomb.png").write_bytes(png_bomb())
    (watch / "cut.png").write_bytes(d[2]["data"][:-12])
    old = time.time() - 60  # a truncated file that has lain there a while: no writer is coming back to it
    os.utime(watch / "cut.png", (old, old))
    (watch / "liar.png").write_bytes(_jpeg())
    (watch / "noise.jpeg").write_bytes(bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8)))
    (watch / "notes.txt").write_text("not an image: rejected too (the drop folder is complete)")
    noise = np.random.default_rng(3).integers(0, 256, (1100, 1100), dtype=np.uint8)
    (watch / "huge.png").write_bytes(render_png(noise))  # valid, over a Kafka record: published at half size
    with Publisher(settings) as pub:
        watcher = ImageWatcher(settings, pub, watch)
        watcher.run(follow=False)
        watcher.close()
    assert (watcher.published, watcher.rejected_count) == (4, 5)
    events = {r.value["source"]: r.value for r in read_topic(settings, raw_topic(settings, "image"))}
    assert set(events) == {"7_abc.png", "plain.png", "photo.jpg", "huge.png"}
    huge = events["huge.png"]
    assert (huge["content_type"], huge["width"], huge["height"]) == ("PNG", 550, 550)
    assert len(huge["data"]) <= 900_000
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(huge["data"]))),
                                  np.asarray(Image.fromarray(noise).reduce(2)))  # the box average, lossless
    assert events["7_abc.png"]["label"] == "7" and events["plain.png"]["label"] == "one"
    assert events["photo.jpg"]["content_type"] == "JPEG" and events["photo.jpg"]["width"] == 30
    assert events["7_abc.png"]["data"] == d[0]["data"]
    dls = read_topic(settings, dead_letter_topic(settings, "image"), decode=False)
    reasons = {Path(header_dict(x.headers)["dl.source_file"]).name: header_dict(x.headers) for x in dls}
    assert {k: v["dl.source_reason"] for k, v in reasons.items()} == {
        "bomb.png": "too_many_pixels",
        "cut.png": "truncated",
        "liar.png": "wrong_extension",
        "noise.jpeg": "bad_magic",
        "notes.txt": "bad_magic",
    }
    assert all(v["dl.stage"] == "validate" and v["dl.message"] for v in reasons.values())
    assert sorted(p.name for p in (watch / "processed").iterdir()) == [
        "7_abc.png",
        "huge.png",
        "photo.jpg",
        "plain.png",
        "plain.png.label",
    ]
    rejected = sorted(p.name for p in (watch / "rejected").iterdir())
    assert rejected == sorted(
        [f"{n}{s}" for n in ("bomb.png", "cut.png", "liar.png", "noise.jpeg", "notes.txt")
         for s in ("", ".reason")]
    )
    assert (watch / "rejected" / "bomb.png.reason").read_text().startswith("too_many_pixels:")
    assert sorted(p.name for p in watch.iterdir()) == ["processed", "rejected"]


def test_an_image_over_the_publishers_own_record_limit_is_still_dead_lettered_unpublishable(
        settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Scaling down fits the default ~1 MB record; a publisher set to a smaller limit still refuses what is
    over its own, and the file is kept as a dead letter with the reason, never dropped."""
    from ingest.images import ImageWatcher
    from streaming.producer import Publisher, header_dict
    from streaming.topics import dead_letter_topic
    from tests.helpers import read_topic

    watch = tmp_path / "in"
    watch.mkdir()
    noise = np.random.default_rng(4).integers(0, 256, (400, 400), dtype=np.uint8)
    (watch / "big.png").write_bytes(render_png(noise))  # ~160 KB: fits the 900 KB budget as it is
    with Publisher(settings, max_record_bytes=100_000) as pub:
        watcher = ImageWatcher(settings, pub, watch)
        watcher.run(follow=False)
        watcher.close()
    assert (watcher.published, watcher.rejected_count) == (0, 1)
    (dl,) = read_topic(settings, dead_letter_topic(settings, "image"), decode=False)
    assert header_dict(dl.headers)["dl.source_reason"] == "unpublishable"
    assert "over the limit of 100000 bytes" in header_dict(dl.headers)["dl.message"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_watcher_kill9_at_random_points_publishes_each_file_once(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import random
    import subprocess
    from collections import Counter

    from streaming.consumer import Subscriber
    from streaming.producer import header_dict
    from streaming.topics import dead_letter_topic, raw_topic
    from tests.helpers import read_topic, streamlearn_cmd, subprocess_env, wait_until

    rng = random.Random(7)
    watch = tmp_path / "in"
    watch.mkdir()
    cmd = streamlearn_cmd("ingest", "images", "--watch", str(watch), "--poll", "0.05")
    # kafka-python sends: with librdkafka the watcher's acks come a round at a time under load, so the
    # progress probe saw a round only once it was all out, and no kill landed mid-round. The librdkafka
    # path's kill tests are the tailer's (test_ingest_tailer.py) and the broker kill (test_cproduce.py).
    env = subprocess_env(settings, STREAMLEARN_FAST_PUBLISHER="false")
    images = list(digits(900))
    probe = Subscriber(settings, raw_topic(settings, "image"), start="end", decode=False)
    tps = list(probe.assignment())

    def published() -> int:
        return sum(probe.consumer.end_offsets(tps).values())

    dropped = 0
    hostile = 0
    kills_mid_stream = 0
    for kill in range(4):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            n = rng.randint(150, 250)
            before = published()
            for rec in images[dropped : dropped + n]:  # write-then-rename, as producers of files should
                tmp = watch / f".{rec['source'].split(':')[1]}.tmp"
                tmp.write_bytes(rec["data"])
                os.rename(tmp, watch / f"{rec['label']}_{rec['source'].split(':')[1]}.png")
            (watch / f"bad{kill}.png").write_bytes(png_bomb(9000 + kill, 9000))
            hostile += 1
            dropped += n
            target = before + rng.randint(1, n - 1)
            wait_until(
                lambda t=target, p=proc: published() >= t or p.poll() is not None,
                60,
                interval=0.002,
                message="watcher progress",
            )
        finally:
            kill9(proc)
        kills_mid_stream += published() < dropped
    assert kills_mid_stream >= 2
    proc = subprocess.Popen(cmd + ["--idle-exit", "1.5"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    probe.close()
    got = Counter(r.value["image_id"] for r in read_topic(settings, raw_topic(settings, "image")))
    want = {r["image_id"] for r in images[:dropped]}
    assert (len(want - set(got)), sum(v > 1 for v in got.values())) == (0, 0)
    assert sum(got.values()) == dropped
    dls = read_topic(settings, dead_letter_topic(settings, "image"), decode=False, idle_timeout=1.0)
    assert sorted(Path(header_dict(d.headers)["dl.source_file"]).name for d in dls) == [f"bad{k}.png" for k in range(4)]
    assert len(list((watch / "processed").iterdir())) == dropped
    assert sorted(p.name for p in watch.iterdir()) == ["processed", "rejected"]


def test_images_acked_but_not_journaled_are_not_published_again(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The state a kill -9 between the acks and the journal write leaves: intents only."""
    from ingest.images import ImageWatcher
    from streaming.producer import Publisher
    from streaming.topics import dead_letter_topic, raw_topic
    from tests.helpers import read_topic

    watch = tmp_path / "in"
    watch.mkdir()
    for rec in digits(10):
        (watch / f"{rec['label']}_{rec['source'].split(':')[1]}.png").write_bytes(rec["data"])
    (watch / "bomb.png").write_bytes(png_bomb())

    class Crashing(ImageWatcher):
        def _move(self, it):  # type: ignore[no-untyped-def]
            raise KeyboardInterrupt  # dies right after the acks, before journal + move

    with Publisher(settings) as pub:
        crashing = Crashing(settings, pub, watch)
        real_add = crashing.journal.add_many
        crashing.journal.add_many = lambda items: real_add([i for i in items if i[0] == "I"])  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            crashing.run(follow=False)
        crashing.close()
        assert crashing.published == 10
        again = ImageWatcher(settings, pub, watch)
        again.run(follow=False)
        again.close()
    assert (again.published, again.rejected_count) == (0, 0)
    assert len(read_topic(settings, raw_topic(settings, "image"), decode=False, idle_timeout=1.0)) == 10
    assert len(read_topic(settings, dead_letter_topic(settings, "image"), decode=False, idle_timeout=1.0)) == 1
    assert len(list((watch / "processed").iterdir())) == 10
    assert sorted(p.name for p in (watch / "rejected").iterdir()) == ["bomb.png", "bomb.png.reason"]


def test_a_file_written_with_a_pause_longer_than_settle_is_published_not_rejected_as_truncated(
        settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A writer that paused longer than --settle (a slow network copy) had its half-written file rejected as
    truncated and moved to rejected/ while it kept writing into it. A settled file that is cut short and was
    written to within 10 settle times is now read again later. The writer here resumes only once the watcher
    has read the half file, so the pause is always longer than the settle time."""
    import threading

    from ingest.images import ImageWatcher
    from streaming.producer import Publisher

    watch = tmp_path / "in"
    watch.mkdir()
    data = next(iter(digits(1)))["data"]
    target = watch / "slow.png"
    half_read = threading.Event()
    with Publisher(settings) as pub:
        watcher = ImageWatcher(settings, pub, watch, settle_s=0.2)
        load = watcher._load

        def spying_load(path: Path):  # type: ignore[no-untyped-def]
            item = load(path)
            if path == target and path.exists() and path.stat().st_size < len(data):
                half_read.set()
            return item

        watcher._load = spying_load  # type: ignore[method-assign]

        fh = open(target, "wb")  # noqa: SIM115 - the writer thread finishes and closes it
        fh.write(data[: len(data) // 2])
        fh.flush()

        def write_slowly() -> None:
            with fh:
                half_read.wait(60)
                fh.write(data[len(data) // 2:])

        writer = threading.Thread(target=write_slowly)
        writer.start()
        try:
            watcher.run(follow=False)
        finally:
            half_read.set()
            writer.join(60)
            watcher.close()
    assert half_read.is_set()
    assert (watcher.published, watcher.rejected_count) == (1, 0)
    assert (watch / "processed" / "slow.png").read_bytes() == data


def test_a_file_gone_between_the_listing_and_its_stat_is_skipped(settings, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`x.part` renamed to `x.png` (the usual upload pattern) between the folder listing and the stat of its
    entry was a FileNotFoundError out of the scan: `ingest images --watch` died with a traceback. The entry
    is skipped; the next scan sees the new name."""
    import ingest.images as images
    from streaming.producer import Publisher

    watch = tmp_path / "in"
    watch.mkdir()
    data = next(iter(digits(1)))["data"]
    (watch / "x.part").write_bytes(data)
    (watch / "kept.png").write_bytes(data)
    real = os.scandir

    def listing_then_rename(path):  # type: ignore[no-untyped-def]
        with real(path) as it:
            entries = list(it)
        if (watch / "x.part").exists():
            os.rename(watch / "x.part", watch / "x.png")
        return iter(entries)

    with Publisher(settings) as pub:
        watcher = images.ImageWatcher(settings, pub, watch, settle_s=0.0)
        monkeypatch.setattr(images.os, "scandir", listing_then_rename)
        assert [p.name for p in watcher.candidates()] == ["kept.png"]
        monkeypatch.setattr(images.os, "scandir", real)
        assert [p.name for p in watcher.candidates()] == ["kept.png", "x.png"]
        watcher.close()
