"""Image formats the drop folder and the gateway recognize only to reject them with a reason.

``ingest.images.inspect`` accepts PNG and JPEG; everything else is named here so the reason says
what the file is (``unsupported_format``, ``animated``), and a GIF's declared logical screen is
checked before anything else (``too_many_pixels``: a 32767x32767 screen). All parsing is a bounded
walk over the bytes already read; nothing is decoded.
"""

from __future__ import annotations

import struct

from ingest.exceptions import ImageValidationError

#: Formats recognized only to be rejected with their name (magic bytes, format name).
_OTHER_FORMATS = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"), (b"\x00\x00\x01\x00", "ICO"),
)


def other_format(data: bytes, max_side: int, max_pixels: int) -> ImageValidationError | None:
    """The rejection of a recognized but unsupported format (checked before anything is decoded)."""
    name = next((n for magic, n in _OTHER_FORMATS if data.startswith(magic)), None)
    if name is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        name = "WebP"
    if name is None and data[4:8] == b"ftyp":
        name = "HEIF/AVIF"
    if name is None:
        return None
    if name == "GIF":
        if len(data) < 10:
            return ImageValidationError("GIF is truncated inside its header", "truncated")
        width, height = struct.unpack("<HH", data[6:10])
        if width > max_side or height > max_side or width * height > max_pixels:
            return ImageValidationError(
                f"GIF declares a logical screen of {width}x{height}, over the cap {max_side}x{max_side} / "
                f"{max_pixels} pixels (possible decompression bomb); GIF is not supported anyway: convert "
                "one frame to PNG", "too_many_pixels")
        animated = _gif_frames(data) > 1
        return ImageValidationError(
            f"{'animated ' if animated else ''}GIF ({width}x{height}) is not supported; convert "
            f"{'one frame ' if animated else 'it '}to PNG", "animated" if animated else "unsupported_format")
    return ImageValidationError(f"{name} is not supported (PNG or JPEG only); convert it to PNG",
                                "unsupported_format")


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
