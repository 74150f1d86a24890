"""Image validation against hostile files (bomb headers, truncation, wrong extension, junk)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ingest.exceptions import ImageValidationError
from ingest.generators import digits, render_png
from ingest.images import inspect, label_for


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
    idat = (
        struct.pack(">I", len(idat_data))
        + b"IDAT"
        + idat_data
        + struct.pack(">I", zlib.crc32(b"IDAT" + idat_data))
    )
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
