"""Image formats other than PNG and JPEG: named, checked, and where Pillow can, converted to PNG.

Shared by ingestion (``ingest/image_check.py``: the drop folder and the gateway publish the PNG) and
the image featurizers' prediction path (``streaming/features/image.py``: a serving request may carry
the same formats), so a photo converted at either place is the same PNG, and the same features.
Errors are :class:`~streaming.exceptions.ImageProbeError` with a ``reason`` code; ingestion turns them
into dead letters, the featurizer into its validation error.

``ingest.image_check.inspect`` accepts PNG and JPEG, the two encodings an ImageEvent carries; everything
else is named here so a reason says what the file is (``unsupported_format``, ``animated``), and a
GIF's declared logical screen is checked before anything else (``too_many_pixels``: a 32767x32767
screen). That parsing is a bounded walk over the bytes already read.

Users' folders hold scans and exports as BMP, TIFF, GIF, WebP and ICO, and datasets as netpbm
(PPM/PGM/PBM), and refusing them made the drop folder useless on such data. A still image of those
formats is decoded once by Pillow under the same pixel caps (the declared size is checked before any
pixel is decoded; a decompression-bomb warning is an error) and re-encoded as PNG, lossless, by
:func:`to_png`; the PNG is then validated like any other.
Phone photos arrive as HEIC (an iPhone's default) and web exports as AVIF: AVIF is decoded by Pillow's
own plugin, HEIC by pillow-heif (libheif), and both are converted alike. A converted image is turned
upright first by its EXIF orientation (AVIF and TIFF carry the turn there; libheif applies HEIC's
``irot``/``imir`` itself and reports orientation 1), since the PNG carries no EXIF: a phone photo
taken in portrait must not become a landscape one on the way.
Still refused, with their reason: animated GIF/WebP/AVIF, image sequences and multi-page TIFF
(``animated``: which frame is "the" image is the user's call), PDF and other ISO media (a video, a
camera's raw file: no decoder here). A format not named here (PCX, TGA, ...) is ``bad_magic``, with a
message that lists what is taken.
:func:`shrink_to_fit` scales any image down by halves until it fits one Kafka record and the caps on
stored images (a phone's 2-5 MB JPEG, a 24 Mpx photo), for the same two callers.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import Any

from streaming import image_probe
from streaming.exceptions import ImageProbeError

#: Formats recognized only to be rejected with their name (magic bytes, format name).
_OTHER_FORMATS = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"), (b"\x00\x00\x01\x00", "ICO"),
)


#: Formats :func:`to_png` converts (our name -> Pillow's format name, the file extensions that fit it).
CONVERTIBLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "GIF": ("GIF", (".gif",)), "BMP": ("BMP", (".bmp", ".dib")), "TIFF": ("TIFF", (".tif", ".tiff")),
    "WebP": ("WEBP", (".webp",)), "ICO": ("ICO", (".ico",)),
    "PNM": ("PPM", (".ppm", ".pgm", ".pbm", ".pnm")),  # netpbm: scientific and computer-vision datasets
    "AVIF": ("AVIF", (".avif",)), "HEIC": ("HEIF", (".heic", ".heif", ".hif")),  # web exports, phone photos
}

#: ISO base media ``ftyp`` brands (major or compatible) of the two still-image formats taken. An AVIF
#: brand wins over the generic HEIF ones (``mif1``/``miaf`` are both's); anything else in an ``ftyp`` box
#: (mp4, QuickTime, a Canon CR3 raw) is named with its brand and refused.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1",
                          b"msf1"})


def _ftyp_name(data: bytes) -> str:
    """AVIF, HEIC or "ISO media 'brand'" for bytes that start with an ``ftyp`` box (bounded: one box)."""
    size = struct.unpack(">I", data[:4])[0]
    end = min(len(data), size if 16 <= size <= 4096 else 16)
    brands = {data[8:12]} | {data[i:i + 4] for i in range(16, end - 3, 4)}
    if brands & _AVIF_BRANDS:
        return "AVIF"
    if brands & _HEIC_BRANDS:
        return "HEIC"
    return f"ISO media {data[8:12].decode('latin-1')!r}"


def format_name(data: bytes) -> str | None:
    """The name of a recognized format other than PNG/JPEG, from its magic bytes (None: not one)."""
    name = next((n for magic, n in _OTHER_FORMATS if data.startswith(magic)), None)
    if name is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        name = "WebP"
    if name is None and data[4:8] == b"ftyp" and len(data) >= 12:
        name = _ftyp_name(data)
    if name is None and data[:1] == b"P" and data[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6") \
            and data[2:3] in (b" ", b"\t", b"\r", b"\n", b"#"):
        name = "PNM"
    return name


def gif_screen_check(data: bytes, max_side: int, max_pixels: int) -> None:
    """A GIF's declared logical screen against the caps, before anything else (ImageProbeError)."""
    if len(data) < 10:
        raise ImageProbeError("GIF is truncated inside its header", "truncated")
    width, height = struct.unpack("<HH", data[6:10])
    if width > max_side or height > max_side or width * height > max_pixels:
        raise ImageProbeError(
            f"GIF declares a logical screen of {width}x{height}, over the cap {max_side}x{max_side} / "
            f"{max_pixels} pixels (possible decompression bomb)", "too_many_pixels")


def to_png(data: bytes, name: str, max_side: int, max_pixels: int) -> bytes:
    """A still image of a :data:`CONVERTIBLE` format as PNG bytes (lossless); ImageProbeError when
    it is animated or multi-page, over the caps (checked on the declared size, before decoding) or corrupt.

    Modes PNG cannot hold are converted: CMYK and other colour spaces to RGB, 32-bit float (scientific
    TIFF) to 8-bit grey, 32-bit integer grey to 16-bit, both clipped; the featurizers read grey pixels in
    [0, 1] anyway."""
    import io

    from PIL import Image

    if name == "GIF":
        gif_screen_check(data, max_side, max_pixels)
    pil_format = CONVERTIBLE[name][0]
    if name == "HEIC":
        _register_heif()
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        # No warnings filter here (catch_warnings() swaps process-wide state and is not thread-safe):
        # over MAX_IMAGE_PIXELS Pillow only warns, and the size check right after open() refuses the
        # same images before any pixel is decoded; over twice that, open() raises DecompressionBombError.
        with Image.open(io.BytesIO(data), formats=[pil_format]) as img:
            width, height = img.size
            image_probe.check_limits(width, height, max_side=max_side, max_pixels=max_pixels, where=name)
            if getattr(img, "is_animated", False):  # not n_frames: for a TIFF it walks every page
                what = "multi-page TIFF" if name == "TIFF" else f"animated {name}"
                raise ImageProbeError(f"{what} ({width}x{height}) is not supported; convert the page "
                                      "or frame you mean to PNG", "animated")
            img.load()
            still = _png_mode(_upright(img))
            out = io.BytesIO()
            still.save(out, format="PNG", compress_level=1)
    except ImageProbeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # raised by open() itself
        raise ImageProbeError(f"{name}: {exc} (possible decompression bomb)", "too_many_pixels") from exc
    except Exception as exc:  # Pillow raises many unrelated types for corrupt data  # noqa: BLE001
        raise ImageProbeError(f"{name} does not decode: {type(exc).__name__}: {str(exc)[:200]}",
                              "corrupt") from exc
    return out.getvalue()


#: Most bytes an ImageEvent's image may take: the whole record must fit one Kafka record (Kafka's default
#: ``message.max.bytes`` is ~1 MB, the embedded broker refuses ~1 MiB), and the other fields, the Avro and
#: the schema-registry framing need far less than the 100 KB left.
RECORD_IMAGE_BYTES = 900_000
#: Quality of a JPEG re-encoded by :func:`shrink_to_fit` (libjpeg's scale: 75 is its default, 90 keeps
#: fine detail; the featurizers average blocks of pixels anyway).
SHRINK_JPEG_QUALITY = 90


def shrink_to_fit(data: bytes, fmt: str, budget: int = RECORD_IMAGE_BYTES, *, max_side: int = image_probe.MAX_SIDE,
                  max_pixels: int = image_probe.MAX_PIXELS) -> bytes:
    """``data`` as it is when it fits ``budget`` bytes and the caps; else the same picture halved,
    quartered, ... (box average, :meth:`PIL.Image.Image.reduce`) until it is within ``max_side`` /
    ``max_pixels`` and its encoding fits, in the same format.

    Why: a phone photo is a 2-5 MB JPEG, or a 12 Mpx HEIC whose PNG is 15-25 MB, and a Kafka record
    holds ~1 MB, so every such photo was refused (``unpublishable``, ``too_large``). The models take
    8x8 to 64x64 grey pixels, box-averaged from the picture, so a picture of 1000-2000 pixels a side
    gives them practically what the original gives. Deterministic (same bytes in, same bytes out), so
    ingestion (``ingest/image_check.py: accept``) and the image featurizers' prediction path apply the
    same rule and a photo sent for a prediction gets the features of the same photo ingested. A JPEG is
    re-encoded at :data:`SHRINK_JPEG_QUALITY` with its EXIF block (its orientation tag still applies);
    a PNG stays lossless. ImageProbeError (``too_large``) when even 1/1024 of it does not fit."""
    if fmt not in ("PNG", "JPEG"):
        raise ValueError(f"fmt: {fmt!r}; shrink_to_fit takes PNG or JPEG bytes (convert others first)")
    header = image_probe.probe(data)
    within = halvings_within(header.width, header.height, max_side, max_pixels)
    if len(data) <= budget and within == 0:
        return data
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            exif = img.info.get("exif")
            img.load()
            picture = img.copy()
        # Halving a side quarters the pixels and, roughly, the bytes: start at the last halving that cannot
        # be enough yet (a 13 MB PNG starts at 1/4, not 1/2), which saves the largest encode; and no earlier
        # than the caps ask. Depends only on the input, so the result stays deterministic.
        first = max(within, max(1, int(math.log(len(data) / budget, 4))) if len(data) > budget else 1)
        for k in range(first, 11):
            factor = 2 ** k
            try:
                small = picture.reduce(factor)
            except ValueError:  # a mode reduce() does not take (16-bit grey): the same box average by resize
                small = picture.resize((halved(picture.width, k), halved(picture.height, k)), Image.Resampling.BOX)
            out = io.BytesIO()
            extra = {"exif": exif} if exif else {}
            if fmt == "JPEG":
                small.save(out, "JPEG", quality=SHRINK_JPEG_QUALITY, **extra)
            else:
                small.save(out, "PNG", compress_level=6, **extra)
            if out.tell() <= budget:
                return out.getvalue()
    except ImageProbeError:
        raise
    except Exception as exc:  # Pillow raises many unrelated types for corrupt data  # noqa: BLE001
        raise ImageProbeError(f"{fmt} of {len(data)} bytes could not be scaled down to fit a Kafka record: "
                              f"{type(exc).__name__}: {str(exc)[:200]}", "corrupt") from exc
    raise ImageProbeError(f"{fmt} of {len(data)} bytes does not fit {budget} bytes even at 1/1024 of its size",
                          "too_large")


def halved(side: int, k: int) -> int:
    """A side after ``k`` halvings by :func:`shrink_to_fit` (``reduce`` rounds up; never below 1)."""
    return max(1, -(-side // 2 ** k))


def halvings_within(width: int, height: int, max_side: int, max_pixels: int) -> int:
    """How many halvings bring ``width`` x ``height`` within the caps (0: it already is; at most 10)."""
    k = 0
    while k < 10:
        w, h = halved(width, k), halved(height, k)
        if w <= max_side and h <= max_side and w * h <= max_pixels:
            break
        k += 1
    return k


@functools.cache
def _register_heif() -> None:
    """Let Pillow open HEIC/HEIF (pillow-heif), once per process: at the first HEIC, not at import."""
    from pillow_heif import register_heif_opener

    register_heif_opener()


def _upright(img: Any) -> Any:
    """``img`` turned by its EXIF orientation (the PNG written from it carries no EXIF); as it is when it
    has none, or one that cannot be read (counted upright, as the image featurizer does)."""
    from PIL import ImageOps

    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block: upright, as image-v2 reads it
        return img
    if orientation in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


def _png_mode(img: Any) -> Any:
    """``img`` in a mode PNG can hold (see :func:`to_png`)."""
    import numpy as np
    from PIL import Image

    if img.mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
        return img
    if img.mode.startswith("I"):  # 32-bit integer (microscopy, astronomy) or 16-bit of the other byte order
        return Image.fromarray(np.clip(np.asarray(img), 0, 65535).astype(np.uint16))
    if img.mode == "F":  # 32-bit float (scientific TIFF): scaled to 16-bit grey, never truncated
        return Image.fromarray(_float_to_uint16(np.asarray(img, dtype=np.float64)))
    return img.convert("RGB")


def _float_to_uint16(pixels: Any) -> Any:
    """Float pixels as 16-bit grey: values in [0, 1] (the usual normalized image) scale by 65535, any other
    range maps its min..max onto 0..65535; NaN and infinities are 0. ``convert("L")`` truncated them:
    a 0..1 image became all black, 64 zero features published as a valid image."""
    import numpy as np

    finite = np.isfinite(pixels)
    if not finite.any():
        return np.zeros(pixels.shape, np.uint16)
    lo, hi = float(pixels[finite].min()), float(pixels[finite].max())
    if lo >= 0.0 and hi <= 1.0:
        scaled = pixels * 65535.0
    elif hi > lo:
        scaled = (pixels - lo) * (65535.0 / (hi - lo))
    else:
        scaled = np.full(pixels.shape, 0.0)
    return np.clip(np.where(finite, scaled, 0.0), 0, 65535).round().astype(np.uint16)


def other_format(data: bytes, max_side: int, max_pixels: int) -> ImageProbeError | None:
    """The rejection of a recognized format that :func:`inspect <ingest.image_check.inspect>` does not take
    (checked before anything is decoded); :func:`ingest.image_check.accept` converts the convertible ones."""
    name = format_name(data)
    if name is None:
        return None
    if name == "GIF":
        try:
            gif_screen_check(data, max_side, max_pixels)
        except ImageProbeError as exc:
            return exc
        width, height = struct.unpack("<HH", data[6:10])
        animated = _gif_frames(data) > 1
        return ImageProbeError(
            f"{'animated ' if animated else ''}GIF ({width}x{height}) is not supported; convert "
            f"{'one frame ' if animated else 'it '}to PNG", "animated" if animated else "unsupported_format")
    return ImageProbeError(f"{name} is not supported (PNG, JPEG, and {', '.join(CONVERTIBLE)} converted to PNG); "
                           "convert it to PNG", "unsupported_format")


def _gif_frames(data: bytes) -> int:
    """Image descriptors in a GIF (stops counting at 2); a walk over its blocks, bounded by the data."""
    i, n, frames = 13, len(data), 0
    if n > 10 and data[10] & 0x80:
        i += 3 * (2 ** ((data[10] & 0x07) + 1))
    while i < n and frames < 2:
        block = data[i]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label, then sub-blocks
            i += 2
        elif block == 0x2C:  # image descriptor, optional local colour table, LZW code size
            frames += 1
            if i + 10 > n:
                break
            flags = data[i + 9]
            i += 10 + (3 * (2 ** ((flags & 0x07) + 1)) if flags & 0x80 else 0) + 1
        else:
            break
        while i < n and data[i] != 0:  # sub-blocks until the terminator
            i += data[i] + 1
        i += 1
    return frames


def png_animated(data: bytes) -> bool:
    """True when an ``acTL`` chunk (APNG) comes before the first IDAT (chunk walk, bounded by the data)."""
    i, n = 8, len(data)
    while i + 8 <= n:
        length = struct.unpack(">I", data[i : i + 4])[0]
        ctype = data[i + 4 : i + 8]
        if ctype == b"acTL":
            return True
        if ctype in (b"IDAT", b"IEND"):
            return False
        i += 12 + length
    return False
