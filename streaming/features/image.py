"""Image featurizer ``image-v1``: PNG/JPEG bytes -> grayscale ``size`` pixels scaled to [0, 1].

Decoding untrusted images is the dangerous part, so it happens in this order:

1. the declared content type must match the magic bytes;
2. the header is read by the one image probe (``streaming/image_probe.py``: PNG ``IHDR``, JPEG
   ``SOFn``) and the declared width x height is checked against its limits (4096 a side, 16 Mpx)
   *before* any pixel is decoded: a 40-byte PNG can declare a 100 000 x 100 000 image (a
   decompression bomb);
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
import os
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from streaming import image_formats, image_probe
from streaming.exceptions import FeatureValidationError, ImageProbeError
from streaming.features.base import FeatureRow, FeatureStateError, Featurizer, check_key, register

VERSION = "image-v1"
RECORD = "ImageEvent"
#: The one set of image limits (streaming/image_probe.py), shared with ingestion.
MAX_PIXELS = image_probe.MAX_PIXELS
MAX_BYTES = image_probe.MAX_BYTES
MAX_SIDE = image_probe.MAX_SIDE
ORIGINAL_MAX_SIDE = image_probe.ORIGINAL_MAX_SIDE
ORIGINAL_MAX_PIXELS = image_probe.ORIGINAL_MAX_PIXELS

#: Transposes that swap width and height (EXIF orientations 5-8).
SWAPS_AXES = frozenset({Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                        Image.Transpose.ROTATE_90})

#: Most threads :meth:`ImageFeaturizer.prepare_many` decodes a poll's images on (fewer on fewer CPUs).
DECODE_THREADS = 4
#: Average encoded size under which a poll's images are decoded one by one in :meth:`ImageFeaturizer.featurize`
#: instead: an 8x8 PNG (~100 bytes) decodes in ~0.05 ms, about what the thread hand-off costs; a 320x240
#: JPEG (~15 KB) in ~0.3 ms.
MIN_BYTES_AHEAD = 2048
#: Largest PNG (declared pixels) decoded ahead on a thread; larger ones decode one at a time in featurize().
AHEAD_MAX_PIXELS = 2_000_000

# Pillow modes of 16-bit grayscale PNGs (samples 0..65535).
_WIDE_GRAY = frozenset({"I", "I;16", "I;16B", "I;16L"})


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _decode_pool(threads: int) -> ThreadPoolExecutor:
    """The process's pool of ``threads`` decode threads, shared by every image featurizer in it.

    Why shared: a featurizer is made per pipeline (a worker, each replay or rebuild job of the API), and
    a pool per instance would leave its idle threads behind each one. Keyed by the process id too: a
    forked child has none of its parent's threads, and would wait forever on the parent's pool."""
    key = (os.getpid(), threads)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="image-decode")
        return pool


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's cpuset), not the host's count. A CPU
    quota (a container's CPU limit) is not visible here; ``STREAMLEARN_IMAGE_DECODE_THREADS`` sets the count
    then."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _small_enough_ahead(data: bytes | bytearray | memoryview) -> bool:
    """Whether an image may be decoded ahead, beside others: a JPEG always (libjpeg decodes it scaled
    down to about the model input), a PNG up to :data:`AHEAD_MAX_PIXELS`, a header that does not probe
    never (featurize() meets its error in order). Why: a PNG decodes at full size, up to 16 Mpx x 4
    bytes; several at once would multiply the worker's peak memory by the thread count."""
    try:
        header = image_probe.probe(data if isinstance(data, bytes) else bytes(data), scans=False)  # sizes only
    except ImageProbeError:
        return False
    return header.content_type == "JPEG" or header.width * header.height <= AHEAD_MAX_PIXELS


def probe_image(data: bytes) -> tuple[str, int, int]:
    """Return ``(format, width, height)`` from the header alone, decoding no pixels.

    The one probe of :mod:`streaming.image_probe` (ingestion uses it too); its error becomes a
    FeatureValidationError naming the field.
    """
    try:
        header = image_probe.probe(data)
    except ImageProbeError as exc:
        raise FeatureValidationError(f"{RECORD}.data: {exc}") from exc
    return header.content_type, header.width, header.height


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
        decode_threads: int | None = None,
    ) -> None:
        """``size`` is (width, height) of the model input; the default 8x8 fits the digits model.
        ``decode_threads``: how many images of a poll :meth:`prepare_many` decodes at once (None: up
        to :data:`DECODE_THREADS`, at most the CPUs the process may run on; 1: none ahead, each in
        :meth:`featurize`). The stream worker passes ``Settings.image_decode_threads`` when it is set."""
        super().__init__(clock_ms, max_future_ms)
        self.decode_threads = max(1, int(decode_threads if decode_threads is not None
                                         else min(DECODE_THREADS, _usable_cpus())))
        #: id(record) -> (its data object, pixels or the error), filled by prepare_many for one run
        self._prepared: dict[int, tuple[Any, np.ndarray | Exception]] = {}
        #: records whose pixels (or decode error) featurize() took from prepare_many (for callers and tests)
        self.decoded_ahead = 0
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
        ready = self._prepared.pop(id(record), None) if self._prepared else None
        if ready is not None and ready[0] is data:  # decoded ahead by prepare_many, same bytes object
            self.decoded_ahead += 1
            if isinstance(ready[1], Exception):
                raise ready[1]
            x = ready[1]
        else:
            x = self.pixels(bytes(data), record.get("content_type"))
        label = record.get("label")
        digit = float(int(label)) if isinstance(label, str) and label.isdigit() and label.isascii() else None
        return FeatureRow(x, {"digit": digit}, t, key)

    def featurize_for_prediction(self, record: dict[str, Any], state: dict[str, Any]) -> FeatureRow:
        """Serving's entry: a request may carry any still format the drop folder and the gateway take.

        Why: stored ImageEvents are PNG or JPEG because ingestion converts GIF, BMP, TIFF, WebP, ICO,
        netpbm, AVIF and HEIC to PNG before publishing; a model trained on those photos was refusing the
        same photo sent for a prediction. Such bytes are converted here by the same function
        (``streaming/image_formats.py``: same caps, same EXIF turn, same PNG), so the features are those
        of the photo ingested. PNG and JPEG go to :meth:`featurize` as they are. ``content_type`` may be
        left out for a converted format, or name it (``WebP``, ``HEIC``/``HEIF``, ...)."""
        return self.featurize(self.prediction_input(record), state)

    def prediction_input(self, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` with its image as ingestion would have published it: converted to PNG where
        :meth:`featurize_for_prediction` converts it, and scaled down where it would not fit a Kafka record
        (``streaming/image_formats.py: shrink_to_fit``, the rule ingestion applies to phone photos).

        Stateless, so serving calls it before it takes its featurizer-state lock: a 12 Mpx HEIC takes a
        few hundred ms to decode, and one request must not hold up every other one's featurization."""
        data = record.get("data") if isinstance(record, dict) else None
        if isinstance(data, bytes | bytearray | memoryview):
            raw = bytes(data)
            kind = image_probe.sniff(raw)
            declared = record.get("content_type")
            try:
                if kind is None:
                    png = self._as_png(raw, declared)
                    if png is not None:
                        fitted = image_formats.shrink_to_fit(png, "PNG", max_side=MAX_SIDE, max_pixels=self.max_pixels)
                        return {**record, "data": fitted, "content_type": "PNG"}
                elif declared in (None, kind) and self._over_record_or_caps(raw):
                    # What ingestion publishes for a photo over a Kafka record or the caps (accept() ->
                    # shrink_to_fit), after the same checks on the original.
                    image_probe.check_size(len(raw), self.max_bytes)
                    header = image_probe.probe(raw)
                    image_probe.check_limits(header.width, header.height, max_side=ORIGINAL_MAX_SIDE,
                                             max_pixels=max(self.max_pixels, ORIGINAL_MAX_PIXELS))
                    fitted = image_formats.shrink_to_fit(raw, kind, max_side=MAX_SIDE, max_pixels=self.max_pixels)
                    return {**record, "data": fitted, "content_type": kind}
            except ImageProbeError as exc:
                raise FeatureValidationError(f"{RECORD}.data: {exc} [{exc.reason}]") from exc
        return record

    def _as_png(self, data: bytes, declared: Any) -> bytes | None:
        """PNG bytes of a convertible format (ImageProbeError when it cannot be); None for unknown bytes."""
        name = image_formats.format_name(data)
        if name is None:
            return None
        image_probe.check_size(len(data), self.max_bytes)
        if name not in image_formats.CONVERTIBLE:  # PDF, a video: named, never decoded
            raise image_formats.other_format(data, MAX_SIDE, self.max_pixels) or ImageProbeError(
                f"{name} is not supported", "unsupported_format")
        if declared is not None and str(declared).upper() not in (name.upper(), image_formats.CONVERTIBLE[name][0]):
            raise FeatureValidationError(
                f"{RECORD}.content_type: declared {declared!r} but the bytes are a {name} file; "
                f"say {name!r} or leave content_type out")
        return image_formats.to_png(data, name, ORIGINAL_MAX_SIDE, max(self.max_pixels, ORIGINAL_MAX_PIXELS))

    def _over_record_or_caps(self, data: bytes) -> bool:
        """Whether ingestion would have scaled this PNG/JPEG down (bytes over a record, size over the caps)."""
        if len(data) > image_formats.RECORD_IMAGE_BYTES:
            return True
        try:
            header = image_probe.probe(data)
        except ImageProbeError:
            return False  # featurize() refuses it with its own reason
        return image_formats.halvings_within(header.width, header.height, MAX_SIDE, self.max_pixels) > 0

    def prepare_many(self, records: Sequence[Any]) -> None:
        """Decode a poll's images on ``decode_threads`` threads; :meth:`featurize` takes each result.

        Why: per image the Pillow decode is most of the worker's CPU, and Pillow releases the GIL while
        it decodes, so a multi-core box decodes several at once. :meth:`pixels` keeps no state and
        changes no process-wide state, so the result (or the error) is exactly what the per-record
        call computes; the checks that come before it in :meth:`featurize` (key, event time) still
        run there, in order, so a record fails with the same error as before."""
        if self.decode_threads < 2 or len(records) < 2:
            return
        jobs: list[tuple[dict[str, Any], bytes | bytearray | memoryview, Any]] = [
            (r, r["data"], r.get("content_type")) for r in records
            if isinstance(r, dict) and isinstance(r.get("data"), bytes | bytearray | memoryview)
            and _small_enough_ahead(r["data"])]
        if len(jobs) < 2 or sum(len(job[1]) for job in jobs) < MIN_BYTES_AHEAD * len(jobs):
            return  # small images (the 8x8 digits) decode in less time than handing them to a thread takes
        results = _decode_pool(self.decode_threads).map(self._pixels_or_error, [(j[1], j[2]) for j in jobs])
        self._prepared = {id(job[0]): (job[1], res) for job, res in zip(jobs, results, strict=True)}

    def release_prepared(self) -> None:
        self._prepared = {}

    def _pixels_or_error(self, job: tuple[Any, str | None]) -> np.ndarray | Exception:
        try:
            return self.pixels(bytes(job[0]), job[1])
        except Exception as exc:  # noqa: BLE001 - handed to featurize(), which raises it for its record
            return exc

    def pixels(self, data: bytes, content_type: str | None = None) -> np.ndarray:
        """Decode safely and return the flattened float32 pixels in [0, 1] (the feature vector)."""
        try:
            image_probe.check_size(len(data), self.max_bytes)
        except ImageProbeError as exc:
            raise FeatureValidationError(f"{RECORD}.data: {exc}") from exc
        fmt, width, height = probe_image(data)
        if content_type is not None and content_type != fmt:
            raise FeatureValidationError(
                f"{RECORD}.content_type: declared {content_type!r} but the bytes are a {fmt} file"
            )
        self._check_pixels(width, height, "header")
        try:
            img = Image.open(io.BytesIO(data), formats=[fmt])
            self._check_pixels(img.width, img.height, "decoder")
            turn = self._turn(img)
            if fmt == "JPEG":  # let libjpeg scale down while decoding (to the size before any turn)
                img.draft("L", self.size[::-1] if turn in SWAPS_AXES else self.size)
            img.load()
            pic: Image.Image = img if turn is None else img.transpose(turn)
            if pic.mode == "L":
                gray = pic  # already 8-bit grayscale: convert("L") would only copy it
            elif pic.mode in _WIDE_GRAY:
                # 16-bit grayscale PNG: convert("L") would clip at 255, not rescale.
                wide = np.asarray(pic, dtype=np.float32)
                gray = Image.fromarray(np.clip(wide / 257.0 + 0.5, 0, 255).astype(np.uint8), "L")
            else:
                gray = pic.convert("L")  # alpha is ignored
            if gray.size != self.size:
                gray = gray.resize(self.size, Image.Resampling.BOX)
            # Mode L packs one byte a pixel, row-major, unpadded: the same values as
            # np.asarray(gray, dtype=float32) without building the array interface (per image,
            # that costs more than the decode of a small image).
            raw = gray.tobytes()
        except FeatureValidationError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as exc:
            raise FeatureValidationError(f"{RECORD}.data: cannot decode the {fmt} image ({exc})") from exc
        if len(raw) != self.size[0] * self.size[1]:  # not one byte a pixel: never hand on a misread image
            raise FeatureValidationError(f"{RECORD}.data: decoded {len(raw)} bytes for a {self.size} L image")
        out = np.frombuffer(raw, dtype=np.uint8).astype(np.float32)
        np.divide(out, np.float32(255.0), out=out)
        return out

    def _turn(self, img: Image.Image) -> Image.Transpose | None:
        """The transpose that makes the stored pixels upright; None in v1, which ignores EXIF
        orientation (kept bit-identical for the models trained on it; ``image-v2`` applies it)."""
        return None

    def _check_pixels(self, width: int, height: int, where: str) -> None:
        """Our caps, and Pillow's own ``Image.MAX_IMAGE_PIXELS`` where it is lower.

        Why Pillow's too: it warns (``DecompressionBombWarning``) over that size, and this featurizer
        used to turn the warning into an error with ``warnings.catch_warnings()``. That changes
        process-wide state and is not thread-safe: serving featurizes on several threads (the Kafka
        loop and the HTTP predict pool), and interleaved blocks left the "error" filter installed for
        the whole process. Checking the same size here, before Pillow decodes, refuses exactly the
        images the warning did, with no global state."""
        pillow_cap = Image.MAX_IMAGE_PIXELS
        cap = self.max_pixels if pillow_cap is None else min(self.max_pixels, int(pillow_cap))
        try:
            image_probe.check_limits(width, height, max_side=MAX_SIDE, max_pixels=cap, where=where)
        except ImageProbeError as exc:
            raise FeatureValidationError(f"{RECORD}.data: {exc}") from exc

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
