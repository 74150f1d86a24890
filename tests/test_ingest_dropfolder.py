"""The image drop folder is complete: every file placed in it is published or dead-lettered with a
reason and moved aside (processed/ or rejected/ + .reason); files still being written wait."""

from __future__ import annotations

import io
import logging
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ingest.exceptions import ImageValidationError
from ingest.images import ImageWatcher, accept, inspect
from streaming.config import Settings


def _png(w: int = 8, h: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(w * h, dtype=np.uint8).reshape(h, w)).save(buf, format="PNG")
    return buf.getvalue()


def _gif(frames: int = 1) -> bytes:
    buf = io.BytesIO()
    imgs = [Image.new("RGB", (6, 6), color=(i * 80, 0, 0)) for i in range(frames)]
    imgs[0].save(buf, format="GIF", save_all=frames > 1, append_images=imgs[1:], loop=0)
    return buf.getvalue()


def huge_screen_gif() -> bytes:
    """The reported file: a GIF header declaring a 32767x32767 logical screen."""
    return b"GIF89a" + struct.pack("<HH", 32767, 32767) + b"\x00\x00\x00" + b"\x3b"


def _apng() -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("L", (6, 6), color=c) for c in (0, 255)]
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _bmp() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (6, 6)).save(buf, format="BMP")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("make", "name", "reason"),
    [
        (huge_screen_gif, "screen.gif", "too_many_pixels"),
        (_gif, "still.gif", "unsupported_format"),
        (lambda: _gif(3), "moving.gif", "animated"),
        (_apng, "moving.png", "animated"),
        (_bmp, "old.bmp", "unsupported_format"),
        (lambda: b"hello", "notes.txt", "bad_magic"),
    ],
)
def test_other_formats_are_named_in_the_reason(make, name: str, reason: str) -> None:  # type: ignore[no-untyped-def,unused-ignore]
    with pytest.raises(ImageValidationError) as info:
        inspect(make(), name)
    assert info.value.reason == reason


def _saved(fmt: str, mode: str = "L", frames: int = 1, size: tuple[int, int] = (12, 10),
           orientation: int | None = None) -> bytes:
    if fmt == "HEIF":
        from pillow_heif import register_heif_opener

        register_heif_opener()
    extra: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        extra["exif"] = exif.tobytes()
    base = Image.fromarray((np.arange(size[0] * size[1], dtype=np.uint32) * 7 % 251).astype(np.uint8)
                           .reshape(size[1], size[0]))
    imgs = [base.convert(mode).rotate(90 * i) for i in range(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, format=fmt, save_all=frames > 1, append_images=imgs[1:], **extra)  # type: ignore[arg-type]
    return buf.getvalue()


def _bmp_header(width: int, height: int) -> bytes:
    """A BMP whose header declares ``width`` x ``height`` 8-bit pixels and holds none of them."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 1024, 0, 0, 14 + 40 + 1024) + info + bytes(1024)


@pytest.mark.parametrize(("make", "name", "mode"), [
    (lambda: _saved("GIF", "P"), "still.gif", "P"), (lambda: _saved("BMP"), "scan.bmp", "L"),
    (lambda: _saved("BMP", "1"), "fax.bmp", "1"), (lambda: _saved("TIFF"), "page.tif", "L"),
    (lambda: _saved("TIFF", "CMYK"), "print.tiff", "RGB"), (lambda: _saved("TIFF", "F"), "sci.tiff", "I;16"),
    (lambda: _saved("WEBP", "RGB"), "photo.webp", "RGB"), (lambda: _saved("ICO", "RGBA"), "icon.ico", "RGBA"),
    (lambda: _saved("TIFF", "I"), "counts.tif", "I;16"),  # 32-bit integer grey (microscopy) could not be saved
    (lambda: _saved("PPM"), "face.pgm", "L"), (lambda: _saved("PPM", "RGB"), "frame.ppm", "RGB"),
    (lambda: _saved("PPM", "1"), "mask.pbm", "1"),
    (lambda: _saved("AVIF", "RGB"), "export.avif", "RGB"), (lambda: _saved("HEIF", "RGB"), "IMG_0001.HEIC", "RGB"),
])
def test_still_images_of_other_formats_are_published_as_png(make, name: str, mode: str) -> None:  # type: ignore[no-untyped-def,unused-ignore]
    """Scans, faxes and exports arrive as BMP, TIFF, GIF, WebP and ICO; they used to be refused whole."""
    from ingest.images import accept

    data = make()
    published, info = accept(data, name)
    assert published[:8] == b"\x89PNG\r\n\x1a\n" and info.content_type == "PNG" and inspect(published) == info
    with Image.open(io.BytesIO(published)) as png, Image.open(io.BytesIO(data)) as original:
        assert png.mode == mode and png.size == original.size
        if original.mode in ("L", "P", "1"):  # lossless: the very pixels
            assert np.array_equal(np.asarray(png.convert("L")), np.asarray(original.convert("L")))


def test_a_float_image_in_0_to_1_keeps_its_picture() -> None:
    """A normalized float TIFF (values 0..1) became all black: convert("L") truncated every pixel to 0,
    and 64 zero features were published as a valid image."""
    from ingest.images import accept
    from streaming.features import get_featurizer

    ramp = np.linspace(0.0, 1.0, 32 * 32, dtype=np.float32).reshape(32, 32)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="TIFF")
    published, info = accept(buf.getvalue(), "norm.tiff")
    with Image.open(io.BytesIO(published)) as png:
        pixels = np.asarray(png, dtype=np.float64)
    assert png.mode == "I;16" and pixels.min() == 0 and pixels.max() == 65535 and info.width == 32
    grey = get_featurizer("image").pixels(published, "PNG")
    assert 0.4 < float(np.mean(grey)) < 0.6 and float(np.max(grey)) > 0.9  # a ramp, not black


@pytest.mark.parametrize(("make", "name", "reason"), [
    (lambda: _saved("GIF", "P", frames=3), "moving.gif", "animated"),
    (lambda: _saved("WEBP", "RGB", frames=2), "moving.webp", "animated"),
    (lambda: _saved("TIFF", frames=2), "two_pages.tif", "animated"),
    (lambda: _bmp_header(100_000, 100_000), "bomb.bmp", "too_many_pixels"),
    (lambda: _bmp_header(9000, 3000), "wide.bmp", "too_many_pixels"),  # over the caps on an original, 8192 a side
    (lambda: _bmp_header(6000, 6000), "big.bmp", "too_many_pixels"),  # 36 Mpx: over 32 Mpx
    (lambda: _saved("TIFF")[:60], "cut.tif", "corrupt"),
    (lambda: _saved("BMP"), "scan.jpg", "wrong_extension"),
    (lambda: b"\x00\x00\x00\x18ftypheic" + bytes(40), "phone.heic", "corrupt"),
    (lambda: b"\x00\x00\x00\x18ftypisom" + bytes(40), "clip.mp4", "unsupported_format"),
    (lambda: _saved("AVIF", "RGB", frames=2), "moving.avif", "animated"),
    (huge_screen_gif, "screen.gif", "too_many_pixels"),
    (lambda: _saved("PCX", "RGB"), "paint.pcx", "bad_magic"),
])
def test_other_formats_that_cannot_be_converted_keep_their_reason(make, name: str, reason: str) -> None:  # type: ignore[no-untyped-def,unused-ignore]
    from ingest.images import accept

    with pytest.raises(ImageValidationError) as info:
        accept(make(), name)
    assert info.value.reason == reason, info.value
    if reason == "bad_magic":  # an unknown format: the message says what is taken
        assert "PNG and JPEG; GIF, BMP, TIFF, WebP, ICO, PNM, AVIF, HEIC are converted to PNG" in str(info.value)


def test_every_file_in_the_drop_folder_ends_published_or_rejected(settings: Settings, tmp_path: Path) -> None:
    from ingest.images import ImageWatcher
    from streaming.producer import Publisher, header_dict
    from streaming.topics import dead_letter_topic, raw_topic
    from tests.helpers import read_topic

    watch = tmp_path / "drop"
    watch.mkdir()
    files = {
        "ok.png": _png(),
        "screen.gif": huge_screen_gif(),
        "still.gif": _gif(),
        "moving.gif": _gif(3),
        "moving.png": _apng(),
        "old.bmp": _bmp(),
        "README": b"what is this folder?",
        "data.bin": bytes(range(256)),
        "lonely.label": b"7\n",
        "future.png": _png(9, 9),
    }
    for name, data in files.items():
        (watch / name).write_bytes(data)
    (watch / ".partial.png").write_bytes(_png()[:20])  # a dot-file: a writer's temporary, left alone
    old = time.time() - 60
    for name in files:
        os.utime(watch / name, (old, old))
    ahead = time.time() + 3600
    os.utime(watch / "future.png", (ahead, ahead))  # a clock an hour ahead: outside the 5-minute window
    with Publisher(settings) as pub:
        watcher = ImageWatcher(settings, pub, watch)
        watcher.run(follow=False)
        watcher.close()
    assert (watcher.published, watcher.rejected_count) == (3, 7)  # the still GIF and the BMP as PNGs
    published = read_topic(settings, raw_topic(settings, "image"))
    assert sorted(r.value["source"] for r in published) == ["ok.png", "old.bmp", "still.gif"]
    assert {r.value["content_type"] for r in published} == {"PNG"}
    dls = read_topic(settings, dead_letter_topic(settings, "image"), decode=False, expect=7)
    reasons = {Path(header_dict(d.headers)["dl.source_file"]).name: header_dict(d.headers)["dl.source_reason"]
               for d in dls}
    assert reasons == {"screen.gif": "too_many_pixels", "moving.gif": "animated",
                       "moving.png": "animated", "README": "bad_magic",
                       "data.bin": "bad_magic", "lonely.label": "orphan_label", "future.png": "timestamp_in_future"}
    assert sorted(p.name for p in watch.iterdir()) == [".partial.png", "processed", "rejected"]
    rejected = sorted(p.name for p in (watch / "rejected").iterdir())
    published_names = ("ok.png", "still.gif", "old.bmp")
    assert rejected == sorted([n for n in files if n not in published_names]
                              + [f"{n}.reason" for n in files if n not in published_names])
    assert (watch / "rejected" / "screen.gif.reason").read_text().startswith("too_many_pixels: GIF declares")


def _once(settings: Settings, watch: Path, files: dict[str, bytes]) -> ImageWatcher:
    """``files`` written into a new drop folder ``watch`` (settled: a minute old), then one run of it."""
    from streaming.producer import Publisher

    watch.mkdir()
    old = time.time() - 60
    for name, data in files.items():
        (watch / name).write_bytes(data)
        os.utime(watch / name, (old, old))
    with Publisher(settings) as pub:
        watcher = ImageWatcher(settings, pub, watch)
        watcher.run(follow=False)
        watcher.close()
    return watcher


def test_a_file_name_too_long_for_its_sidecars_is_moved_under_a_shorter_one(settings: Settings,
                                                                           tmp_path: Path) -> None:
    """A 250-character name: its `.reason` could not be written, every run of the folder ended in
    "File name too long" and no other file was moved. A valid one was refused as "bad_label" (its
    label file's name was too long to look up). Now both take a shortened name, the rest goes on."""
    from ingest.image_moves import MAX_MOVED_NAME_BYTES

    watch = tmp_path / "drop"
    watcher = _once(settings, watch, {"a" * 246 + ".png": b"not an image", "b" * 247 + ".png": _png(),
                                      "ok.png": _png(9, 9)})
    assert (watcher.published, watcher.rejected_count) == (2, 1)
    assert sorted(p.name for p in watch.iterdir()) == ["processed", "rejected"]
    moved = [p.name for d in ("processed", "rejected") for p in (watch / d).iterdir()]
    assert all(len(n.encode()) <= MAX_MOVED_NAME_BYTES + len(".reason") for n in moved), moved
    reasons = list((watch / "rejected").glob("*.reason"))
    assert len(reasons) == 1 and reasons[0].read_text().startswith("bad_magic")
    assert {n[:3] for n in moved} == {"aaa", "bbb", "ok."}


def test_a_once_run_publishes_a_valid_copy_of_a_rejected_files_bytes(settings: Settings, tmp_path: Path) -> None:
    """`ingest images --once`: a JPEG named .png is rejected; the same bytes as prog.jpg are valid, and were
    "left for the next scan", which a once run never made (it ended while the batch was still in flight):
    exit 0 with the file still in the folder. The run now scans once more after its last commit."""
    watch = tmp_path / "drop"
    jpeg = _saved("JPEG", "L", size=(32, 32))
    watcher = _once(settings, watch, {"prog.jpg": jpeg, "jpeg_named.png": jpeg})
    assert (watcher.published, watcher.rejected_count) == (1, 1)
    assert sorted(p.name for p in watch.iterdir()) == ["processed", "rejected"]
    assert [p.name for p in (watch / "processed").iterdir()] == ["prog.jpg"]


def test_a_file_still_being_written_waits_and_is_never_cut(settings: Settings, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from ingest.images import ImageWatcher
    from streaming.producer import Publisher

    watch = tmp_path / "drop"
    watch.mkdir()
    data = _png(40, 40)
    (watch / "slow.png").write_bytes(data[: len(data) // 2])  # half written, mtime now
    caplog.set_level(logging.WARNING, logger="ingest.images")
    with Publisher(settings) as pub:
        watcher = ImageWatcher(settings, pub, watch, settle_s=30.0, max_settle_wait_s=0.3)
        watcher.run(follow=False, poll_s=0.05)
        assert (watcher.published, watcher.rejected_count) == (0, 0)  # not taken: not rejected as truncated
        assert (watch / "slow.png").exists()
        assert any("slow.png is still being written" in m for m in caplog.messages)
        with (watch / "slow.png").open("ab") as fh:  # the writer finishes
            fh.write(data[len(data) // 2:])
        old = time.time() - 60
        os.utime(watch / "slow.png", (old, old))
        watcher.run(follow=False, poll_s=0.05)
        watcher.close()
    assert (watcher.published, watcher.rejected_count) == (1, 0)
    assert (watch / "processed" / "slow.png").read_bytes() == data


@pytest.mark.parametrize(("fmt", "name"), [("AVIF", "portrait.avif"), ("HEIF", "portrait.heic"),
                                           ("TIFF", "portrait.tif")])
def test_a_converted_photo_taken_in_portrait_stays_in_portrait(fmt: str, name: str) -> None:
    """The PNG a converted image becomes carries no EXIF, so the turn a camera records there (AVIF, TIFF)
    is applied first; libheif applies HEIC's own rotation and reports orientation 1, so a HEIC is not
    turned twice. Stored 12x10 with orientation 6 (turn 90 degrees): published 10x12."""
    from ingest.images import accept

    published, info = accept(_saved(fmt, "RGB", orientation=6), name)
    assert (info.width, info.height) == (10, 12), (fmt, info)


def test_iso_media_other_than_avif_and_heic_is_named_by_its_brand() -> None:
    from ingest.images import accept

    with pytest.raises(ImageValidationError, match="ISO media 'crx '") as info:
        accept(b"\x00\x00\x00\x18ftypcrx " + bytes(40), "IMG_1.CR3")  # a Canon raw file
    assert info.value.reason == "unsupported_format"


def _phone_photo(fmt: str, size: tuple[int, int], orientation: int | None = None, noise: float = 8) -> bytes:
    """A photo-like picture (smooth light, sensor noise) as a camera or phone writes it."""
    if fmt == "HEIF":
        from pillow_heif import register_heif_opener

        register_heif_opener()
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    light = np.stack([x / w * 200 + 30, y / h * 180 + 40, (x + y) / (w + h) * 150 + 60], -1)
    pixels = np.clip(light + np.random.default_rng(5).normal(0, noise, light.shape), 0, 255).astype(np.uint8)
    extra: dict[str, object] = {"quality": 92}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        extra["exif"] = exif.tobytes()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **extra)
    return buf.getvalue()


@pytest.mark.parametrize(("fmt", "name", "published_as", "size"), [("JPEG", "IMG_1234.JPG", "JPEG", (2400, 1800)),
                                                                    ("HEIF", "IMG_0001.HEIC", "PNG", (1600, 1200))])
def test_a_phone_photo_over_a_kafka_record_is_published_scaled_down(fmt: str, name: str, published_as: str,
                                                                     size: tuple[int, int]) -> None:
    """A phone's 2-5 MB JPEG, or a HEIC whose PNG is several MB, was refused (``unpublishable`` /
    ``too_large``): a Kafka record holds ~1 MB. It is now published halved until it fits, in the format
    it would have had, with its EXIF orientation kept (image-v2 still turns it)."""
    from streaming.image_formats import RECORD_IMAGE_BYTES

    original = _phone_photo(fmt, size, orientation=6)
    assert len(original) > RECORD_IMAGE_BYTES or fmt == "HEIF"  # HEIF is small; its PNG is not
    published, info = accept(original, name)
    assert len(published) <= RECORD_IMAGE_BYTES and info.content_type == published_as
    # halved or quartered; a converted HEIC is also turned upright by its orientation 6 (to_png), so portrait
    assert sorted((info.width, info.height)) in ([size[1] >> k, size[0] >> k] for k in (1, 2, 3))
    assert (info.width > info.height) == (published_as == "JPEG")
    with Image.open(io.BytesIO(published)) as img:
        assert img.format == published_as and img.size == (info.width, info.height)
        if published_as == "JPEG":
            assert img.getexif().get(0x0112) == 6  # still says "turn me": image-v2 does, as for the original
    assert accept(original, name) == (published, info)  # deterministic: the same photo, the same event


def test_a_photo_that_fits_a_record_is_published_byte_for_byte() -> None:
    small = _phone_photo("JPEG", (640, 480))
    assert accept(small, "small.jpg")[0] == small


def test_a_photo_over_the_pixel_caps_is_published_halved_within_them() -> None:
    """A 24 Mpx phone photo (5712x4284, an iPhone 15's default) is over the 4096 px / 16 Mpx caps on what is
    stored and featurized. Its original is checked against the caps on originals (8192 px, 32 Mpx) and it
    is published halved: here a 4400x3300 JPEG small enough in bytes, so only the caps ask for it."""
    from streaming.image_probe import MAX_PIXELS, MAX_SIDE

    photo = _phone_photo("JPEG", (4400, 3300), noise=0)
    assert len(photo) <= 900_000
    published, info = accept(photo, "IMG_3.JPG")
    assert (info.content_type, info.width, info.height) == ("JPEG", 2200, 1650)
    assert info.width <= MAX_SIDE and info.width * info.height <= MAX_PIXELS
