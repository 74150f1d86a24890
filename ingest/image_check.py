"""Image validation before any decoding: magic bytes, extension vs. content, declared dimensions,
truncation, then one Pillow decode with its pixel cap (see ``ingest/images.py``'s docstring for the
reason codes); :func:`accept` converts still GIF/BMP/TIFF/WebP/ICO/netpbm to PNG first. Split from the
drop-folder source so ``ingest/images.py`` holds only the watcher.

The header parsing and the limits are the one probe of ``streaming/image_probe.py`` (shared with the
image featurizer); what is specific to ingestion stays here: unsupported formats named in the reason
(``streaming/image_formats.py``), the file extension, animated PNGs, one decode, labels and the record.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from pathlib import Path
from typing import Any

from ingest.exceptions import ImageValidationError
from ingest.source import text_name
from streaming import image_probe
from streaming.exceptions import ImageProbeError
from streaming.image_formats import CONVERTIBLE, format_name, other_format, png_animated, shrink_to_fit, to_png

#: The one set of limits (``streaming/image_probe.py``), shared with the image featurizer.
MAX_SIDE = image_probe.MAX_SIDE
MAX_PIXELS = image_probe.MAX_PIXELS
MAX_FILE_BYTES = image_probe.MAX_BYTES
EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
sniff = image_probe.sniff
#: What :func:`inspect` returns: the probe's header (content type, declared width and height).
ImageInfo = image_probe.ImageHeader


def inspect(
    data: bytes,
    filename: str | None = None,
    *,
    max_side: int = MAX_SIDE,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_FILE_BYTES,
    decode: bool = True,
) -> ImageInfo:
    """Validate an encoded image; return its type and declared size or raise ImageValidationError.

    ``filename``'s extension, when given, must match the content. ``decode`` runs Pillow once
    after the header checks passed (set False where only headers matter, e.g. benchmarks).
    """
    try:
        image_probe.check_size(len(data), max_bytes)
        kind = sniff(data)
        if kind is None and data:
            other = other_format(data, max_side, max_pixels)
            if other is not None:
                raise other
        if kind is not None and filename is not None:
            ext = os.path.splitext(filename)[1].lower()
            expected = EXTENSIONS.get(ext)
            if expected is None:
                raise ImageValidationError(f"extension {ext!r} is not .png, .jpg or .jpeg", "wrong_extension")
            if expected != kind:
                raise ImageValidationError(
                    f"file name says {expected} ({ext}) but the bytes are {kind}; rename it", "wrong_extension"
                )
        info = image_probe.probe(data, complete=True)
        width, height = info.width, info.height
        image_probe.check_limits(width, height, max_side=max_side, max_pixels=max_pixels)
    except ImageProbeError as exc:
        raise ImageValidationError(str(exc), exc.reason) from exc
    if kind == "PNG" and png_animated(data):
        raise ImageValidationError("animated PNG (APNG) is not supported; send one frame as a PNG", "animated")
    if decode:
        _decode_check(data, width, height, max_pixels)
    return info


def accept(data: bytes, filename: str | None = None, *, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS,
           max_bytes: int = MAX_FILE_BYTES, original_max_side: int = image_probe.ORIGINAL_MAX_SIDE,
           original_max_pixels: int = image_probe.ORIGINAL_MAX_PIXELS) -> tuple[bytes, ImageInfo]:
    """The bytes to publish for an image file and their header: PNG and JPEG as they are (:func:`inspect`),
    a still GIF, BMP, TIFF, WebP, ICO, netpbm (PPM/PGM/PBM), AVIF or HEIC converted to PNG first
    (``streaming/image_formats.py``), anything else refused with its reason. An image over
    ``RECORD_IMAGE_BYTES`` (a phone photo) is published scaled down to fit a Kafka record
    (``shrink_to_fit``), and so is one over ``max_side``/``max_pixels`` (a 24 Mpx phone photo): the
    original is checked against ``original_max_side``/``original_max_pixels`` (before any pixel is
    decoded), what is published against ``max_side``/``max_pixels``. The drop folder and the gateway
    call this; the dead letter of a refused file keeps the original bytes. ``filename``'s extension, when
    given, must fit the content."""
    original_max_side, original_max_pixels = max(max_side, original_max_side), max(max_pixels, original_max_pixels)
    name = format_name(data) if sniff(data) is None else None
    if name not in CONVERTIBLE:
        try:
            info = inspect(data, filename, max_side=original_max_side, max_pixels=original_max_pixels,
                           max_bytes=max_bytes)
            return _fitted(data, info, max_side=max_side, max_pixels=max_pixels, max_bytes=max_bytes)
        except ImageValidationError as exc:
            if exc.reason != "bad_magic":
                raise
            raise ImageValidationError(
                f"{exc}: not an image format this takes (PNG and JPEG; {', '.join(CONVERTIBLE)} are converted to "
                "PNG); convert it to PNG", "bad_magic") from exc
    assert name is not None
    try:
        image_probe.check_size(len(data), max_bytes)  # before decoding; inspect() checks the others
    except ImageProbeError as exc:
        raise ImageValidationError(str(exc), exc.reason) from exc
    if filename is not None:
        ext = os.path.splitext(filename)[1].lower()
        if ext not in CONVERTIBLE[name][1]:
            raise ImageValidationError(f"file name says {ext or 'no extension'} but the bytes are {name}; rename it "
                                       f"({' or '.join(CONVERTIBLE[name][1])})", "wrong_extension")
    try:
        png = to_png(data, name, original_max_side, original_max_pixels)
        png = shrink_to_fit(png, "PNG", max_side=max_side, max_pixels=max_pixels)
    except ImageProbeError as exc:
        raise ImageValidationError(str(exc), exc.reason) from exc
    return png, inspect(png, None, max_side=max_side, max_pixels=max_pixels, max_bytes=max_bytes)


def _fitted(data: bytes, info: ImageInfo, *, max_side: int, max_pixels: int, max_bytes: int) -> tuple[bytes, ImageInfo]:
    """A valid PNG/JPEG, scaled down by :func:`streaming.image_formats.shrink_to_fit` when it would not fit
    a Kafka record (a phone's 2-5 MB JPEG) or the caps (a 24 Mpx photo), with the header of what is published."""
    try:
        fitted = shrink_to_fit(data, info.content_type, max_side=max_side, max_pixels=max_pixels)
    except ImageProbeError as exc:
        raise ImageValidationError(str(exc), exc.reason) from exc
    if fitted is data:
        return data, info
    return fitted, inspect(fitted, None, max_side=max_side, max_pixels=max_pixels, max_bytes=max_bytes)


def _decode_check(data: bytes, width: int, height: int, max_pixels: int) -> None:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size != (width, height):
                raise ImageValidationError(
                    f"decoder sees {img.size[0]}x{img.size[1]}, header declared {width}x{height}",
                    "bad_header",
                )
            img.load()
    except ImageValidationError:
        raise
    except Exception as exc:  # Pillow raises many unrelated types for corrupt data
        raise ImageValidationError(f"image does not decode: {type(exc).__name__}: {exc}", "corrupt") from exc


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: Largest label file read (a label is a class name; the record's label field is bounded further on).
MAX_LABEL_FILE_BYTES = 64 * 1024


def _read_sidecar(sidecar: Path) -> bytes:
    """A label file's bytes: a regular file in the folder itself, at most :data:`MAX_LABEL_FILE_BYTES`.

    Why: read with ``read_text``, a sidecar that was a link to a file outside the drop folder was read
    and published (the image checks refuse such links, the label read did not), a FIFO blocked the
    watcher for good (even SIGTERM waited on it), and a link to /dev/zero read until memory ran out,
    at every restart. Not followed, not waited on, not read past the bound: each is the image's
    ``bad_label`` dead letter instead.
    """
    fd = os.open(sidecar, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(sidecar)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{sidecar.name} is not a regular file")
        data = os.read(fd, MAX_LABEL_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_LABEL_FILE_BYTES:
        raise OSError(f"over {MAX_LABEL_FILE_BYTES} bytes; a label is a short class name")
    return data


def label_for(path: Path) -> str | None:
    """Label of an image file: sidecar ``x.png.label``, else ``x.label``, else ``label_rest.png``."""
    for sidecar in (path.with_name(path.name + ".label"), path.with_suffix(".label")):
        try:
            text = _read_sidecar(sidecar).decode("utf-8").strip()
        except (FileNotFoundError, IsADirectoryError):
            continue
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                continue  # a name too long for any sidecar: the image has none
            raise ImageValidationError(f"label file {sidecar.name} cannot be read: {exc}", "bad_label") from exc
        except UnicodeDecodeError as exc:
            raise ImageValidationError(f"label file {sidecar.name} cannot be read: {exc}", "bad_label") from exc
        if text:
            return text
    stem = path.stem
    if "_" in stem and stem.split("_", 1)[0]:
        return text_name(stem.split("_", 1)[0])
    return None


def image_record(data: bytes, info: ImageInfo, *, label: str | None, source: str, timestamp: int) -> dict[str, Any]:
    """The ImageEvent dict of a validated image (image_id = sha256 of the bytes)."""
    return {
        "image_id": hashlib.sha256(data).hexdigest(),
        "timestamp": int(timestamp),
        "content_type": info.content_type,
        "width": info.width,
        "height": info.height,
        "data": data,
        "label": label,
        "source": source,
    }
