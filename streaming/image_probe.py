"""One image header probe and one set of limits for every place that takes image bytes.

Why here: the drop folder and the gateway (``ingest/image_check.py``) and the image featurizer
(``streaming/features/image.py``, also serving's decode) each parsed PNG ``IHDR`` / JPEG ``SOFn``
themselves, with different limits (20 MiB and a 4096 px side vs 10 MiB and no side cap). Both layers
may import ``streaming``, so the probe lives here and both call it.

The probe reads the format and the declared size from the header alone, decoding no pixel, so a
decompression bomb (a 40-byte PNG declaring 100 000 x 100 000) is refused before anything allocates.
``complete=True`` also checks the container's integrity (PNG IHDR CRC and final IEND chunk, JPEG end
marker), which ingestion wants before it publishes; the featurizer lets Pillow find such damage
while decoding. Every error is an :class:`~streaming.exceptions.ImageProbeError` with a reason code.
"""

from __future__ import annotations

import re
import struct
import threading
import zlib
from dataclasses import dataclass

from streaming.exceptions import ImageProbeError

#: The limits (one set): bytes of an encoded image, pixels a side, pixels in all.
MAX_BYTES = 10 * 1024 * 1024
#: Held around every ``warnings.catch_warnings()`` block of the image paths: it swaps process-wide state and
#: is not thread-safe, and serving featurizes on several threads; two unlocked blocks can restore each
#: other's filters and leave one installed for the whole process.
WARNINGS_LOCK = threading.Lock()
MAX_SIDE = 4096
MAX_PIXELS = 16_000_000
#: Caps on an *original* photo that ingestion, or a prediction, scales down before anything stores or
#: featurizes it (``streaming/image_formats.py: shrink_to_fit``): a 24 Mpx phone photo (5712x4284, an
#: iPhone 15's default) is over MAX_SIDE and MAX_PIXELS, and what is published stays within them. Still
#: checked on the declared size before any pixel is decoded; one such decode takes ~100 MB (32 Mpx RGB).
ORIGINAL_MAX_SIDE = 8192
ORIGINAL_MAX_PIXELS = 32_000_000
#: Scans a JPEG may hold. Why: a progressive JPEG's decode cost is (scans x blocks), not bytes. A
#: 655 KB file of 18,500 tiny AC scans, each an end-of-band run over a 4000x4000 frame, took 30 s to
#: decode even with draft scaling, wedging the drop folder and tripping the stream worker's watchdog at
#: every restart. Encoders write 6 (grey) to 10 (colour) scans with the standard script and mozjpeg's
#: optimised scripts stay under 30; libjpeg-turbo's own tools offer a ``-maxscans`` guard for this attack.
MAX_JPEG_SCANS = 100

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
JPEG_MAGIC = b"\xff\xd8\xff"
# SOF markers carrying frame dimensions (C4 = DHT, C8 = JPG extension, CC = DAC are not frames).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# In entropy-coded data FF is followed by 00 (stuffing), a restart marker D0-D7 or more FF (fill): any
# other byte after FF is the next marker.
_NEXT_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
# Markers without a length field.
_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})


@dataclass(frozen=True)
class ImageHeader:
    content_type: str  # "PNG" or "JPEG"
    width: int
    height: int


def sniff(data: bytes) -> str | None:
    """Content type from the magic bytes (``PNG``, ``JPEG``), or None."""
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(JPEG_MAGIC):
        return "JPEG"
    return None


def probe(data: bytes, *, complete: bool = False, scans: bool = True) -> ImageHeader:
    """Format and declared size from the header alone (no limits applied: see :func:`check_limits`).
    A JPEG's scans are counted too (:func:`check_jpeg_scans`) unless ``scans`` is False, for a caller
    that only wants the size and decodes nothing on it."""
    if not data:
        raise ImageProbeError("image is empty: not a PNG or JPEG file", "empty")
    kind = sniff(data)
    if kind == "PNG":
        width, height = _png_size(data, complete)
    elif kind == "JPEG":
        width, height = _jpeg_size(data)
        if scans:
            check_jpeg_scans(data)
        if complete and not data.endswith(b"\xff\xd9"):
            raise ImageProbeError("JPEG is truncated: it does not end with the FFD9 marker", "truncated")
    else:
        raise ImageProbeError(f"not a PNG or JPEG file (magic bytes {data[:8].hex()})", "bad_magic")
    if width < 1 or height < 1:
        raise ImageProbeError(f"{kind} header declares {width}x{height} pixels (an empty image)", "bad_dimensions")
    return ImageHeader(kind, width, height)


def check_size(n_bytes: int, max_bytes: int = MAX_BYTES) -> None:
    """Refuse an encoded image over ``max_bytes`` (reason ``too_large``)."""
    if n_bytes > max_bytes:
        raise ImageProbeError(f"image is {n_bytes} bytes, over the {max_bytes}-byte image limit", "too_large")


def check_limits(width: int, height: int, *, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS,
                 where: str = "header") -> None:
    """Refuse a declared (or decoded) size over the caps (reason ``too_many_pixels``)."""
    if width > max_side or height > max_side or width * height > max_pixels:
        raise ImageProbeError(
            f"{where} declares {width}x{height} = {width * height} pixels, over the cap of {max_side} a side / "
            f"{max_pixels} pixels (possible decompression bomb); downscale it before sending",
            "too_many_pixels",
        )


def check_jpeg_scans(data: bytes, max_scans: int = MAX_JPEG_SCANS) -> None:
    """Refuse a JPEG with more than ``max_scans`` scans (reason ``too_many_scans``), before any decode.

    The count walks the markers as libjpeg reads them, skipping each segment by its length and each
    scan's entropy-coded data with one C-speed search (~0.35 us a KB, 1-2 % of a decode; a plain
    ``data.count(b"\xff\xda")`` was slower on noisy photos, whose data is full of FF 00 stuffing)."""
    if _jpeg_scan_count(data, max_scans) > max_scans:
        raise ImageProbeError(
            f"JPEG holds more than {max_scans} scans (a progressive-JPEG decode bomb: each scan is a pass over "
            "every block); re-encode it as a baseline JPEG or with the standard progressive script",
            "too_many_scans",
        )


def _jpeg_scan_count(data: bytes, stop_after: int) -> int:
    """Scans (SOS markers) in ``data`` counted by walking its structure as libjpeg reads it (bytes that are no
    marker are skipped to the next FF); stops early past ``stop_after``."""
    pos, end, scans = 2, len(data), 0
    while pos + 1 < end and scans <= stop_after:
        if data[pos] != 0xFF:  # junk where a marker belongs: libjpeg skips to the next FF and decodes on,
            pos = data.find(b"\xff", pos)  # so the count must too (stopping here let one byte hide 6000 scans)
            if pos < 0:
                break
        marker, pos = _marker(data, pos)
        if marker is None or marker == 0xD9:
            break
        if marker == 0x00 or marker in _JPEG_STANDALONE:  # FF 00 there is junk to libjpeg too
            continue
        if pos + 2 > end:
            break
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2:
            break
        pos += length
        if marker != 0xDA:
            continue
        scans += 1
        found = _NEXT_MARKER.search(data, pos)  # skips the scan's entropy-coded data at C speed
        if found is None:
            break
        pos = found.start()
    return scans


def _png_size(data: bytes, complete: bool) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageProbeError("truncated PNG: no IHDR chunk in the first 24 bytes", "bad_header")
    if complete:
        if len(data) < 33 or struct.unpack(">I", data[8:12])[0] != 13:
            raise ImageProbeError("PNG does not start with a 13-byte IHDR chunk", "bad_header")
        if zlib.crc32(data[12:29]) != struct.unpack(">I", data[29:33])[0]:
            raise ImageProbeError("PNG IHDR chunk fails its CRC check", "bad_header")
        if not data.endswith(PNG_IEND):
            raise ImageProbeError("PNG is truncated: it does not end with the IEND chunk", "truncated")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def _marker(data: bytes, pos: int) -> tuple[int | None, int]:
    """The marker code after the FF (and any fill FFs) at ``pos``, and the position after it; None at the end."""
    end = len(data)
    while pos < end and data[pos] == 0xFF:
        pos += 1
    return (None, pos) if pos >= end else (data[pos], pos + 1)


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Walk JPEG marker segments up to the first SOF and read its width and height."""
    pos, end = 2, len(data)
    while pos < end:
        if data[pos] != 0xFF:
            raise ImageProbeError(f"corrupt JPEG: a marker expected at byte {pos}", "bad_header")
        marker, pos = _marker(data, pos)
        if marker is None:
            break
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            raise ImageProbeError("JPEG has no frame header (SOF) before its data", "bad_header")
        if pos + 2 > end:
            break
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2:
            raise ImageProbeError(f"corrupt JPEG: segment length {length} at byte {pos}", "bad_header")
        if marker in _JPEG_SOF:
            if length < 8:
                raise ImageProbeError("JPEG SOF segment is too short", "bad_header")
            if pos + 7 > end:
                break
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            return int(width), int(height)
        pos += length
    raise ImageProbeError("truncated JPEG: the header ends before the frame size", "truncated")
