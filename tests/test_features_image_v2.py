"""image-v2: the EXIF orientation is applied (phone photos come out upright); everything else is v1's."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from streaming.features import get_featurizer
from streaming.features.image import ImageFeaturizer
from streaming.features.image_v2 import ImageFeaturizerV2

# A 16x8 (w x h) "upright" picture: a bright left half with a gradient, so every turn and mirror differs.
UPRIGHT = np.zeros((8, 16), np.uint8)
UPRIGHT[:, :8] = 200
UPRIGHT += np.arange(16, dtype=np.uint8)[None, :] * 3 + np.arange(8, dtype=np.uint8)[:, None]
#: EXIF orientation -> how the camera stored the upright picture (the inverse of the turn that fixes it).
STORED = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.T,
    6: lambda a: np.rot90(a, 1),
    7: lambda a: np.rot90(a, 2).T,
    8: lambda a: np.rot90(a, -1),
}


def png(pixels: np.ndarray, orientation: int | None = None, exif_bytes: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    kw: dict[str, Any] = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    if exif_bytes is not None:
        kw["exif"] = exif_bytes
    Image.fromarray(np.ascontiguousarray(pixels), "L").save(buf, "PNG", **kw)
    return buf.getvalue()


def v2(size: tuple[int, int] = (16, 8)) -> ImageFeaturizerV2:
    return ImageFeaturizerV2(size=size)


def test_v2_is_current_and_v1_stays_registered() -> None:
    assert get_featurizer("image").version == "image-v2"
    assert type(get_featurizer("image", "v1")) is ImageFeaturizer


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_each_orientation_comes_out_upright(orientation: int) -> None:
    data = png(STORED[orientation](UPRIGHT), orientation)
    np.testing.assert_array_equal(v2().pixels(data, "PNG"), UPRIGHT.reshape(-1).astype(np.float32) / 255)


def test_v1_ignores_the_tag_and_v2_equals_v1_without_one() -> None:
    stored = STORED[6](UPRIGHT)  # 8 wide, 16 high as stored
    v1 = ImageFeaturizer(size=(8, 16))
    np.testing.assert_array_equal(v1.pixels(png(stored, 6), "PNG"), stored.reshape(-1).astype(np.float32) / 255)
    for data in (png(UPRIGHT), png(UPRIGHT, 1)):
        np.testing.assert_array_equal(v2().pixels(data, "PNG"), ImageFeaturizer(size=(16, 8)).pixels(data, "PNG"))


def test_a_turned_jpeg_is_drafted_at_its_pre_turn_shape() -> None:
    """libjpeg's draft scaling is asked for the size before the turn. A portrait photo (80x320 upright,
    stored 320x80 with orientation 6) into a wide (40, 8) input: drafted at the upright shape, it would
    decode at 40x10, turn to 10x40 and be stretched back to 40 wide, losing its 4-pixel stripes."""
    upright = np.zeros((320, 80), np.uint8)
    for k in range(4):
        upright[:, k::8] = 255
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(STORED[6](upright)), "L").save(buf, "JPEG", quality=95, exif=exif.tobytes())
    truth = np.asarray(Image.fromarray(upright, "L").resize((40, 8), Image.Resampling.BOX), np.float32)
    got = v2(size=(40, 8)).pixels(buf.getvalue(), "JPEG").reshape(8, 40) * 255
    assert np.abs(got - truth).max() < 20  # JPEG loss only; drafted at the wrong shape: ~128


@pytest.mark.parametrize("exif_bytes", [
    b"Exif\x00\x00garbage-not-tiff",  # not a TIFF header
    b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff",  # an IFD claiming 65535 entries, none there
    b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06",  # orientation 6, cut short
])
def test_unreadable_exif_is_taken_as_upright_and_counted(exif_bytes: bytes) -> None:
    f = v2()
    np.testing.assert_array_equal(f.pixels(png(UPRIGHT, exif_bytes=exif_bytes), "PNG"),
                                  UPRIGHT.reshape(-1).astype(np.float32) / 255)
    assert f.exif_unreadable == 1


def test_an_orientation_outside_1_to_8_is_taken_as_upright_and_counted() -> None:
    f = v2()
    np.testing.assert_array_equal(f.pixels(png(UPRIGHT, 9), "PNG"), UPRIGHT.reshape(-1).astype(np.float32) / 255)
    assert f.exif_unreadable == 1


def test_featurizing_on_several_threads_leaves_the_process_warnings_filters_alone() -> None:
    """Serving featurizes on several threads (the Kafka loop, the HTTP predict pool). The decode used to
    wrap everything in ``warnings.catch_warnings()``, which is process-wide: interleaved blocks restored
    each other's filter lists and left "error" installed for the whole process (seen within 12,000 calls
    on 4 threads). Every answer must also stay right."""
    import threading
    import warnings

    f = v2()
    unreadable = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff"  # an IFD claiming 65535 entries
    cases = [(png(STORED[6](UPRIGHT), 6), 0), (png(UPRIGHT, exif_bytes=unreadable), 1), (png(UPRIGHT), 0)]
    want = UPRIGHT.reshape(-1).astype(np.float32) / 255
    before = list(warnings.filters)
    wrong: list[int] = []

    def work() -> None:
        for i in range(3000):
            data, _ = cases[i % len(cases)]
            if not np.array_equal(f.pixels(data, "PNG"), want):
                wrong.append(i)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not wrong
    assert list(warnings.filters) == before
    assert f.exif_unreadable == sum(1 for i in range(3000) if cases[i % len(cases)][1]) * 4
