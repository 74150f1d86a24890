"""Image validation before any decoding: magic bytes, extension vs. content, declared dimensions,
truncation, then one Pillow decode with its pixel cap (see ``ingest/images.py``'s docstring for the
reason codes). Split from the drop-folder source so ``ingest/images.py`` holds only the watcher.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingest.exceptions import ImageValidationError
from ingest.image_formats import other_format, png_animated

MAX_SIDE = 4096
MAX_PIXELS = 16_000_000
MAX_FILE_BYTES = 20 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class ImageInfo:
    content_type: str  # "PNG" or "JPEG"
    width: int
    height: int


def sniff(data: bytes) -> str | None:
    """Content type from the magic bytes, or None."""
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    return None


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 33 or data[12:16] != b"IHDR" or struct.unpack(">I", data[8:12])[0] != 13:
        raise ImageValidationError("PNG does not start with a 13-byte IHDR chunk", "bad_header")
    if zlib.crc32(data[12:29]) != struct.unpack(">I", data[29:33])[0]:
        raise ImageValidationError("PNG IHDR chunk fails its CRC check", "bad_header")
    width, height = struct.unpack(">II", data[16:24])
    if not data.endswith(PNG_IEND):
        raise ImageValidationError("PNG is truncated: it does not end with the IEND chunk", "truncated")
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i, n = 2, len(data)
    size: tuple[int, int] | None = None
    while i < n:
        if data[i] != 0xFF:
            raise ImageValidationError(f"JPEG marker expected at byte {i}", "bad_header")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9:
            raise ImageValidationError("JPEG ends (EOI) before any image scan", "bad_header")
        if i + 2 > n:
            break
        seg_len = struct.unpack(">H", data[i : i + 2])[0]
        if seg_len < 2 or i + seg_len > n:
            break
        if marker in _SOF:
            if seg_len < 8:
                raise ImageValidationError("JPEG SOF segment is too short", "bad_header")
            height, width = struct.unpack(">HH", data[i + 3 : i + 7])
            size = (width, height)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            if size is None:
                raise ImageValidationError("JPEG has no SOF header before its scan", "bad_header")
            if not data.endswith(b"\xff\xd9"):
                raise ImageValidationError("JPEG is truncated: it does not end with the FFD9 marker", "truncated")
            return size
        i += seg_len
    raise ImageValidationError("JPEG is truncated inside its headers (no scan found)", "truncated")


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
    if len(data) == 0:
        raise ImageValidationError("image is empty", "empty")
    if len(data) > max_bytes:
        raise ImageValidationError(f"image is {len(data)} bytes, over the {max_bytes}-byte limit", "too_large")
    kind = sniff(data)
    if kind is None:
        other = other_format(data, max_side, max_pixels)
        if other is not None:
            raise other
        raise ImageValidationError("not a PNG or JPEG: unknown magic bytes", "bad_magic")
    if filename is not None:
        ext = os.path.splitext(filename)[1].lower()
        expected = EXTENSIONS.get(ext)
        if expected is None:
            raise ImageValidationError(f"extension {ext!r} is not .png, .jpg or .jpeg", "wrong_extension")
        if expected != kind:
            raise ImageValidationError(
                f"file name says {expected} ({ext}) but the bytes are {kind}; rename it", "wrong_extension"
            )
    width, height = _png_size(data) if kind == "PNG" else _jpeg_size(data)
    if width < 1 or height < 1:
        raise ImageValidationError(f"declared size {width}x{height} is empty", "bad_dimensions")
    if width > max_side or height > max_side or width * height > max_pixels:
        raise ImageValidationError(
            f"declared size {width}x{height} exceeds the cap {max_side}x{max_side} / {max_pixels} pixels "
            "(possible decompression bomb); downscale it before ingesting",
            "too_many_pixels",
        )
    if kind == "PNG" and png_animated(data):
        raise ImageValidationError("animated PNG (APNG) is not supported; send one frame as a PNG", "animated")
    if decode:
        _decode_check(data, width, height, max_pixels)
    return ImageInfo(kind, width, height)


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


def label_for(path: Path) -> str | None:
    """Label of an image file: sidecar ``x.png.label``, else ``x.label``, else ``label_rest.png``."""
    for sidecar in (path.with_name(path.name + ".label"), path.with_suffix(".label")):
        try:
            text = sidecar.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, IsADirectoryError):
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise ImageValidationError(f"label file {sidecar.name} cannot be read: {exc}", "bad_label") from exc
        if text:
            return text
    stem = path.stem
    if "_" in stem and stem.split("_", 1)[0]:
        return stem.split("_", 1)[0]
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
