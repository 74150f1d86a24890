"""image-v1: known pixels in, exact [0, 1] grayscale out; bombs and broken files rejected before decoding."""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np
import pytest
from PIL import Image

from streaming.exceptions import FeatureValidationError
from streaming.features import get_featurizer
from streaming.features.image import ImageFeaturizer, probe_image

T0 = 1_700_000_000_000
NOW = T0 + 3_600_000


def encode(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rec(data: bytes, content_type: str = "PNG", label: str | None = "7", **over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "image_id": "img-1",
        "timestamp": T0,
        "content_type": content_type,
        "width": 8,
        "height": 8,
        "data": data,
        "label": label,
        "source": "test",
    }
    r.update(over)
    return r


def fz(**kw: Any) -> ImageFeaturizer:
    return ImageFeaturizer(clock_ms=lambda: NOW, **kw)


def test_known_8x8_pixels_scale_exactly() -> None:
    pixels = (np.arange(64, dtype=np.uint8) * 4).reshape(8, 8)
    pixels[7, 7] = 255
    f = fz()
    row = f.featurize(rec(encode(Image.fromarray(pixels, "L"))), f.new_state())
    assert f.version == "image-v1" and f.input_shape == (8, 8, 1) and f.n_features == 64
    assert row.x.dtype == np.float32 and row.x.shape == (64,)
    np.testing.assert_array_equal(row.x, pixels.reshape(-1).astype(np.float32) / np.float32(255))
    assert row.x[-1] == 1.0 and row.x[0] == 0.0
    assert row.labels == {"digit": 7.0} and row.key == "img-1" and row.event_time_ms == T0
    assert f.feature_names[9] == "px_1_1"


def test_white_on_black_digit_as_the_generator_renders_it() -> None:
    digit = np.zeros((8, 8), dtype=np.float64)
    digit[1:7, 3:5] = 16.0  # a "1" in scikit-learn's 0..16 intensities
    digit[1, 2] = 8.0
    rendered = np.round(digit * 255 / 16).astype(np.uint8)
    f = fz()
    row = f.featurize(rec(encode(Image.fromarray(rendered, "L")), label="1"), f.new_state())
    img = row.x.reshape(f.input_shape)[:, :, 0]
    assert img[1, 3] == 1.0 and img[0, 0] == 0.0 and img[1, 2] == np.float32(128 / 255)
    assert row.labels["digit"] == 1.0


def test_larger_image_is_box_resized() -> None:
    blocks = np.kron(np.arange(64, dtype=np.uint8).reshape(8, 8) * 3, np.ones((4, 4), dtype=np.uint8))
    f = fz()
    row = f.featurize(rec(encode(Image.fromarray(blocks, "L")), width=32, height=32), f.new_state())
    np.testing.assert_allclose(row.x, np.arange(64) * 3 / 255, atol=1e-6)


def test_rgb_is_grayscaled_and_size_is_a_parameter() -> None:
    rgb = np.zeros((12, 16, 3), dtype=np.uint8)
    rgb[:, 8:] = 255
    f = fz(size=(16, 12))
    assert f.input_shape == (12, 16, 1) and f.n_features == 192
    row = f.featurize(rec(encode(Image.fromarray(rgb, "RGB"))), f.new_state())
    img = row.x.reshape(12, 16)
    assert (img[:, :8] == 0.0).all() and (img[:, 8:] == 1.0).all()


def test_16_bit_grayscale_is_rescaled_not_clipped() -> None:
    wide = np.array([[0, 257 * 100, 65535, 32896] * 2] * 8, dtype=np.uint16)
    img = Image.fromarray(wide)
    assert img.mode.startswith("I")
    row = fz().featurize(rec(encode(img)), {})
    np.testing.assert_array_equal(row.x[:4], np.array([0, 100, 255, 128], dtype=np.float32) / np.float32(255))


def test_jpeg_decodes_close_to_its_pixels() -> None:
    pixels = np.full((8, 8), 200, dtype=np.uint8)
    data = encode(Image.fromarray(pixels, "L"), "JPEG", quality=95)
    assert probe_image(data) == ("JPEG", 8, 8)
    f = fz()
    row = f.featurize(rec(data, "JPEG"), f.new_state())
    np.testing.assert_allclose(row.x, 200 / 255, atol=3 / 255)


@pytest.mark.parametrize(
    ("label", "digit"), [("7", 7.0), ("0", 0.0), ("cat", None), (None, None), ("", None)]
)
def test_digit_label(label: str | None, digit: float | None) -> None:
    f = fz()
    data = encode(Image.new("L", (8, 8)))
    assert f.featurize(rec(data, label=label), f.new_state()).labels == {"digit": digit}


_NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8), "L")
NOISE_PNG = encode(_NOISE)
NOISE_JPEG = encode(_NOISE, "JPEG")


def _png_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("L", (8, 8))))
    data[16:24] = struct.pack(">II", width, height)  # header lies; CRC now wrong too
    return bytes(data)


def test_png_bomb_rejected_from_the_header() -> None:
    data = _png_declaring(100_000, 100_000)
    assert probe_image(data) == ("PNG", 100_000, 100_000)
    with pytest.raises(FeatureValidationError, match=r"ImageEvent\.data: header declares 100000x100000"):
        fz().featurize(rec(data), {})


def test_real_png_over_the_pixel_cap_is_rejected_before_decoding() -> None:
    data = encode(Image.new("L", (40, 30)))  # valid file, small on disk, 1200 px
    with pytest.raises(FeatureValidationError, match="decompression bomb"):
        fz(max_pixels=1000).featurize(rec(data), {})


def test_jpeg_bomb_rejected_from_the_sof_header() -> None:
    data = bytearray(encode(Image.new("L", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)
    assert probe_image(bytes(data)) == ("JPEG", 60_000, 60_000)
    with pytest.raises(FeatureValidationError, match="60000x60000"):
        fz().featurize(rec(bytes(data), "JPEG"), {})


@pytest.mark.parametrize(
    ("data", "content_type", "pattern"),
    [
        (encode(Image.new("L", (8, 8)))[:20], "PNG", "truncated PNG"),
        (NOISE_PNG[: len(NOISE_PNG) // 2], "PNG", "cannot decode the PNG"),  # cut inside IDAT
        (encode(Image.new("L", (8, 8)), "JPEG")[:30], "JPEG", "JPEG"),
        (NOISE_JPEG[: len(NOISE_JPEG) // 2], "JPEG", "cannot decode the JPEG"),
        (b"GIF89a....", "PNG", "not a PNG or JPEG"),
        (b"", "PNG", "not a PNG or JPEG"),
        (encode(Image.new("L", (8, 8))), "JPEG", r"content_type: declared 'JPEG' but the bytes are a PNG"),
        (_png_declaring(0, 8), "PNG", "declares 0x8"),
    ],
)
def test_broken_images_raise_validation_errors(data: bytes, content_type: str, pattern: str) -> None:
    with pytest.raises(FeatureValidationError, match=pattern):
        fz().featurize(rec(data, content_type), {})


def test_oversized_payload_and_bad_fields() -> None:
    data = encode(Image.new("L", (8, 8)))
    with pytest.raises(FeatureValidationError, match="byte image limit"):
        fz(max_bytes=10).featurize(rec(data), {})
    with pytest.raises(FeatureValidationError, match=r"ImageEvent\.data: expected bytes"):
        fz().featurize(rec("not bytes"), {})  # type: ignore[arg-type]
    with pytest.raises(FeatureValidationError, match=r"ImageEvent\.timestamp"):
        fz().featurize(rec(data, timestamp=-9_300_000_000_000), {})  # before 1678


def test_stateless_state_round_trip() -> None:
    f = get_featurizer("image")
    assert f.state_from_json(f.state_to_json(f.new_state())) == {}


def test_pillows_own_pixel_cap_still_refuses_without_a_warnings_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's MAX_IMAGE_PIXELS (lowered here) is checked as our own cap, before decoding: the images the
    DecompressionBombWarning-as-error used to refuse, refused with no process-wide warnings filter."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(Image.new("L", (40, 30)))  # 1,200 px: within the featurizer's cap, over Pillow's
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(FeatureValidationError, match="over the cap .* 1000 pixels"):
            fz(max_pixels=10_000).featurize(rec(data), {})
    assert not seen  # refused from the header, before Pillow looked at it
    assert list(warnings.filters) == before


def test_prepare_many_decodes_photos_ahead_not_large_pngs_and_gives_the_one_by_one_answers() -> None:
    """A poll's photos are decoded ahead on threads; a PNG over AHEAD_MAX_PIXELS (it decodes at full size)
    and an image whose header does not probe are left to featurize(); every answer, rows and errors, is
    what a featurizer without threads gives."""
    import numpy as np

    from streaming.features import image as image_mod

    rng = np.random.default_rng(3)
    photos = [encode(Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)), "JPEG") for _ in range(4)]
    big_png = encode(Image.new("L", (2000, 1500), 9))  # 3 Mpx, a few KB
    assert 2000 * 1500 > image_mod.AHEAD_MAX_PIXELS
    records = [rec(p, "JPEG", image_id=f"p{i}") for i, p in enumerate(photos)]
    records += [rec(big_png, image_id="big"), rec(photos[0][:4000], "JPEG", image_id="cut"),
                rec(b"GIF89a" + bytes(5000), "PNG", image_id="gif"), rec(photos[1], "PNG", image_id="liar")]

    def answers(f: ImageFeaturizer) -> list[Any]:
        out: list[Any] = []
        f.prepare_many(records)
        try:
            for r in records:
                try:
                    out.append(f.featurize(r, {}).x.tolist())
                except FeatureValidationError as exc:
                    out.append(str(exc))
        finally:
            f.release_prepared()
        return out

    threaded, single = fz(decode_threads=4), fz(decode_threads=1)
    assert answers(threaded) == answers(single)
    assert threaded.decoded_ahead == 6 and single.decoded_ahead == 0  # 4 photos, the cut one, the liar
    assert isinstance(answers(single)[-1], str) and "declared 'PNG'" in answers(single)[-1]


def _photo(fmt: str, orientation: int | None = None, frames: int = 1) -> bytes:
    """A 24x20 gradient photo in ``fmt`` (Pillow's format name), optionally EXIF-turned or animated."""
    if fmt == "HEIF":
        from pillow_heif import register_heif_opener

        register_heif_opener()
    arr = (np.add.outer(np.arange(20) * 9, np.arange(24) * 4) % 256).astype(np.uint8)
    img = Image.fromarray(arr, "L").convert("RGB")
    extra: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        extra["exif"] = exif.tobytes()
    if frames > 1:
        extra.update(save_all=True, append_images=[img.rotate(90)] * (frames - 1))
    return encode(img, fmt, **extra)


@pytest.mark.parametrize(("fmt", "declared"), [("WEBP", None), ("WEBP", "WebP"), ("BMP", None), ("TIFF", "tiff"),
                                               ("GIF", None), ("HEIF", "HEIC"), ("AVIF", None)])
def test_a_prediction_in_a_format_ingestion_converts_gets_the_features_of_the_ingested_photo(
        fmt: str, declared: str | None) -> None:
    """Serving took PNG and JPEG only, while the drop folder and the gateway convert these formats to PNG
    before publishing: a model trained on a user's WebP/HEIC photos refused the same photo at predict time.
    The prediction path converts with the same function, so the row equals the one ingestion would store."""
    from ingest.image_check import accept

    raw = _photo(fmt, orientation=6 if fmt in ("AVIF", "TIFF") else None)
    from streaming.features.image_v2 import ImageFeaturizerV2

    ingested_png, _ = accept(raw)
    for fz in (ImageFeaturizer(clock_ms=lambda: NOW), ImageFeaturizerV2(clock_ms=lambda: NOW)):
        stored = fz.featurize(rec(ingested_png), fz.new_state())
        served = fz.featurize_for_prediction(rec(raw, content_type=declared), fz.new_state())  # type: ignore[arg-type]
        np.testing.assert_array_equal(served.x, stored.x)
        assert served.labels == stored.labels and served.key == stored.key
        with pytest.raises(FeatureValidationError):  # stored records stay PNG/JPEG: ingestion converted them
            fz.featurize(rec(raw, content_type=declared), fz.new_state())  # type: ignore[arg-type]


@pytest.mark.parametrize(("data", "declared", "words"), [
    (b"%PDF-1.7\n" + bytes(64), None,
     "PDF is not supported (PNG, JPEG, and GIF, BMP, TIFF, WebP, ICO, PNM, AVIF, HEIC converted to PNG); "
     "convert it to PNG [unsupported_format]"),
    (b"\x00\x00\x00\x18ftypmp42" + bytes(40), None, "ISO media 'mp42' is not supported"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(30), None, "WebP does not decode: OSError"),
    (None, "PNG", "declared 'PNG' but the bytes are a WebP file"),
    ("animated", None, "animated GIF (24x20) is not supported; convert the page or frame you mean to PNG [animated]"),
    (b"GIF89a" + struct.pack("<HH", 32767, 32767) + bytes(20), None, "[too_many_pixels]"),
])
def test_a_prediction_in_an_unusable_format_is_refused_with_its_reason(data: Any, declared: str | None,
                                                                       words: str) -> None:
    if data is None:
        data = _photo("WEBP")
    elif data == "animated":
        data = _photo("GIF", frames=3)
    fz = ImageFeaturizer(clock_ms=lambda: NOW)
    with pytest.raises(FeatureValidationError) as info:
        fz.featurize_for_prediction(rec(data, content_type=declared), fz.new_state())  # type: ignore[arg-type]
    assert words in str(info.value)


def test_a_prediction_in_png_or_jpeg_is_featurized_as_it_is() -> None:
    fz = ImageFeaturizer(clock_ms=lambda: NOW)
    for fmt in ("PNG", "JPEG"):
        data = encode(Image.fromarray((np.arange(64).reshape(8, 8) * 3).astype(np.uint8), "L"), fmt)
        a = fz.featurize_for_prediction(rec(data, content_type=fmt), fz.new_state())
        b = fz.featurize(rec(data, content_type=fmt), fz.new_state())
        np.testing.assert_array_equal(a.x, b.x)


def test_a_prediction_on_a_photo_over_a_kafka_record_sees_what_ingestion_published() -> None:
    """Ingestion publishes a phone photo over ~1 MB scaled down (shrink_to_fit); a prediction on the original
    photo is scaled down by the same rule first, so both image featurizers give the ingested photo's row."""
    from ingest.image_check import accept
    from streaming.features.image_v2 import ImageFeaturizerV2
    from tests.test_ingest_dropfolder import _phone_photo

    original = _phone_photo("JPEG", (2400, 1800), orientation=6)
    published, info = accept(original, "IMG_1.JPG")
    assert published != original
    for fz in (ImageFeaturizer(clock_ms=lambda: NOW), ImageFeaturizerV2(clock_ms=lambda: NOW)):
        assert fz.prediction_input(rec(original, content_type="JPEG"))["data"] == published
        served = fz.featurize_for_prediction(rec(original, content_type="JPEG"), fz.new_state())
        stored = fz.featurize(rec(published, content_type="JPEG"), fz.new_state())
        np.testing.assert_array_equal(served.x, stored.x)


def test_a_prediction_on_a_photo_over_the_pixel_caps_sees_what_ingestion_published() -> None:
    """A 4400x3300 photo small in bytes: ingestion publishes it halved (the 4096 px cap); a prediction on
    the original is halved by the same rule, where it used to be refused as too_many_pixels."""
    from ingest.image_check import accept
    from tests.test_ingest_dropfolder import _phone_photo

    original = _phone_photo("JPEG", (4400, 3300), noise=0)
    published, _ = accept(original, "IMG_4.JPG")
    fz = ImageFeaturizer(clock_ms=lambda: NOW)
    with pytest.raises(FeatureValidationError, match="too_many_pixels|over the cap"):
        fz.featurize(rec(original, content_type="JPEG"), fz.new_state())  # stored records keep the caps
    assert fz.prediction_input(rec(original, content_type="JPEG"))["data"] == published
    np.testing.assert_array_equal(fz.featurize_for_prediction(rec(original, content_type="JPEG"), fz.new_state()).x,
                                  fz.featurize(rec(published, content_type="JPEG"), fz.new_state()).x)
