"""Image featurizer ``image-v1``: PNG/JPEG bytes -> grayscale ``size`` pixels scaled to [0, 1].

Decoding untrusted images is the dangerous part, so it happens in this order:

1. the declared content type must match the magic bytes;
2. the header is parsed by hand (PNG ``IHDR``, JPEG ``SOFn``) and the declared width x height is
   checked against ``max_pixels`` (16 Mpx) *before* any pixel is decoded: a 40-byte PNG can declare
   a 100 000 x 100 000 image (a decompression bomb);
3. Pillow opens the bytes restricted to that one format, and the size it reports is checked again
   before ``load()`` (so a header we misread cannot slip through either); truncated or corrupt
   data raises inside ``load()`` and becomes FeatureValidationError.

Then: grayscale (``L``; 16-bit grayscale is rescaled to 8 bits first; alpha is ignored), resize
to ``size`` (box filter, the area average, which keeps thin digit strokes) unless already that
size, and ``pixel / 255``. No inversion or contrast tricks: the
digits generator renders scikit-learn's 0..16 intensities as white-on-black 0..255, and serving
inputs go through this exact function, so whatever convention the data has is learned consistently.

``x`` is row-major (``px_<row>_<col>``); ``input_shape`` is ``(height, width, 1)`` for the CNN.
The label ``digit`` is ``float(int(label))`` when the label is a string of digits, else None.
This featurizer keeps no state (``new_state()`` is an empty dict).
"""

from __future__ import annotations

import io
import json
import struct
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from streaming.exceptions import FeatureValidationError
from streaming.features.base import FeatureRow, FeatureStateError, Featurizer, check_key, register

VERSION = "image-v1"
RECORD = "ImageEvent"
MAX_PIXELS = 16_000_000
MAX_BYTES = 10 * 1024 * 1024

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# SOF markers carrying frame dimensions (C4 = DHT, C8 = JPG extension, CC = DAC are not frames).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Pillow modes of 16-bit grayscale PNGs (samples 0..65535).
_WIDE_GRAY = frozenset({"I", "I;16", "I;16B", "I;16L"})
# Markers without a length field.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def probe_image(data: bytes) -> tuple[str, int, int]:
    """Return ``(format, width, height)`` from the header alone, decoding no pixels.

    ``format`` is ``"PNG"`` or ``"JPEG"``. Raises FeatureValidationError for unknown formats and for
    headers that are truncated or declare zero dimensions. Public so ingestion can apply the same
    checks.
    """
    if data.startswith(PNG_MAGIC):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise FeatureValidationError(f"{RECORD}.data: truncated PNG, no IHDR chunk in the first 24 bytes")
        width, height = struct.unpack(">II", data[16:24])
        fmt = "PNG"
    elif data.startswith(JPEG_MAGIC):
        width, height = _jpeg_size(data)
        fmt = "JPEG"
    else:
        raise FeatureValidationError(
            f"{RECORD}.data: not a PNG or JPEG file (magic bytes {data[:8].hex() or 'empty'})"
        )
    if width <= 0 or height <= 0:
        raise FeatureValidationError(f"{RECORD}.data: {fmt} header declares {width}x{height} pixels")
    return fmt, width, height


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Walk JPEG marker segments up to the first SOF and read its height and width."""
    pos, end = 2, len(data)
    while pos < end:
        if data[pos] != 0xFF:
            raise FeatureValidationError(f"{RECORD}.data: corrupt JPEG, expected a marker at byte {pos}")
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= end:
            break
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            raise FeatureValidationError(f"{RECORD}.data: JPEG has no frame header (SOF) before its data")
        if pos + 2 > end:
            break
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2:
            raise FeatureValidationError(f"{RECORD}.data: corrupt JPEG segment length {length} at byte {pos}")
        if marker in _JPEG_SOF:
            if pos + 7 > end:
                break
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            return width, height
        pos += length
    raise FeatureValidationError(f"{RECORD}.data: truncated JPEG, header ends before the frame size")


class ImageFeaturizer(Featurizer[dict[str, Any]]):
    """See the module docstring for the decoding order and the output."""

    kind = "image"
    version = VERSION
    label_names = ["digit"]

    def __init__(
        self,
        *,
        size: tuple[int, int] = (8, 8),
        max_pixels: int = MAX_PIXELS,
        max_bytes: int = MAX_BYTES,
        clock_ms: Callable[[], int] | None = None,
        max_future_ms: int | None = None,
    ) -> None:
        """``size`` is (width, height) of the model input; the default 8x8 fits the digits model."""
        super().__init__(clock_ms, max_future_ms)
        width, height = size
        if width <= 0 or height <= 0 or max_pixels <= 0 or max_bytes <= 0:
            raise ValueError("size, max_pixels and max_bytes must be positive")
        self.size = (int(width), int(height))
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.input_shape: tuple[int, ...] = (self.size[1], self.size[0], 1)
        self.feature_names = [f"px_{r}_{c}" for r in range(self.size[1]) for c in range(self.size[0])]

    def new_state(self) -> dict[str, Any]:
        return {}

    def featurize(self, record: dict[str, Any], state: dict[str, Any]) -> FeatureRow:
        key = check_key(record, RECORD, "image_id")
        t = self.check_event_time(record, RECORD)
        data = record.get("data")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise FeatureValidationError(f"{RECORD}.data: expected bytes, got {type(data).__name__}")
        x = self.pixels(bytes(data), record.get("content_type"))
        label = record.get("label")
        digit = float(int(label)) if isinstance(label, str) and label.isdigit() and label.isascii() else None
        return FeatureRow(x, {"digit": digit}, t, key)

    def pixels(self, data: bytes, content_type: str | None = None) -> np.ndarray:
        """Decode safely and return the flattened float32 pixels in [0, 1] (the feature vector)."""
        if len(data) > self.max_bytes:
            raise FeatureValidationError(
                f"{RECORD}.data: {len(data)} bytes is over the {self.max_bytes}-byte image limit"
            )
        fmt, width, height = probe_image(data)
        if content_type is not None and content_type != fmt:
            raise FeatureValidationError(
                f"{RECORD}.content_type: declared {content_type!r} but the bytes are a {fmt} file"
            )
        self._check_pixels(width, height, "header")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data), formats=[fmt])
                self._check_pixels(img.width, img.height, "decoder")
                if fmt == "JPEG":
                    img.draft("L", self.size)  # let libjpeg scale down while decoding
                img.load()
                if img.mode in _WIDE_GRAY:
                    # 16-bit grayscale PNG: convert("L") would clip at 255, not rescale.
                    wide = np.asarray(img, dtype=np.float32)
                    gray = Image.fromarray(np.clip(wide / 257.0 + 0.5, 0, 255).astype(np.uint8), "L")
                else:
                    gray = img.convert("L")  # alpha is ignored
                if gray.size != self.size:
                    gray = gray.resize(self.size, Image.Resampling.BOX)
                arr = np.asarray(gray, dtype=np.float32)
        except FeatureValidationError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as exc:
            raise FeatureValidationError(f"{RECORD}.data: cannot decode the {fmt} image ({exc})") from exc
        out = arr.reshape(-1)
        np.divide(out, np.float32(255.0), out=out)
        return out

    def _check_pixels(self, width: int, height: int, where: str) -> None:
        if width * height > self.max_pixels:
            raise FeatureValidationError(
                f"{RECORD}.data: {where} declares {width}x{height} = {width * height} pixels, over the "
                f"{self.max_pixels}-pixel cap (possible decompression bomb)"
            )

    def state_to_json(self, state: dict[str, Any]) -> str:
        return json.dumps({"featurizer": self.version})

    def state_from_json(self, text: str) -> dict[str, Any]:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise FeatureStateError(f"state: not JSON ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("featurizer") != self.version:
            raise FeatureStateError(f"state: not a {self.version} state document")
        return {}


register("image", VERSION, ImageFeaturizer, current=True)
