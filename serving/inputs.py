"""Turn prediction requests and raw events into feature vectors for one model version.

Requests carry either ``features`` (used as given, after a length and finiteness check) or
``event_json`` (a raw WebLogEvent/SensorReading/ImageEvent as JSON, bytes base64), which is
featurized with the featurizer recorded in the served version's metadata, so serving can never
drift from what the model was trained on.

Limitation (documented): featurizers with per-entity state (the sensor forecaster keeps recent
readings per sensor) get one state per worker process and featurizer version. Requests are keyed
by request id, not sensor id, so with several workers one sensor's history is split between them;
run one worker (or send ``features``) when that matters. The state is not checkpointed either: a
restarted worker starts with empty history.
"""

from __future__ import annotations

import base64
import io
import threading
import warnings
from typing import Any

import numpy as np
from PIL import Image

from serving.exceptions import RequestDecodeError
from serving.model import LoadedVersion
from streaming import image_probe
from streaming.jsoncodec import from_json
from streaming.limits import InputLimitError, bounded_json
from streaming.topics import KINDS


class Featurization:
    """Per-worker featurizer states, keyed by (kind, featurizer version). Thread-safe."""

    def __init__(self) -> None:
        self._states: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def event_from_json(self, text: str, lv: LoadedVersion) -> dict[str, Any]:
        """Parse ``event_json`` into the record dict the featurizer expects (base64 -> bytes)."""
        try:  # size and depth are checked before the JSON is built (a 100k-deep array is one request's error)
            event = bounded_json(text, "event_json")
        except InputLimitError as exc:
            raise RequestDecodeError(f"{exc}; send a raw event object") from exc
        if not isinstance(event, dict):
            raise RequestDecodeError("event_json: must be a JSON object (a raw event), got "
                                     f"{type(event).__name__}")
        return self._decode_bytes(event, lv)

    def _decode_bytes(self, event: dict[str, Any], lv: LoadedVersion) -> dict[str, Any]:
        if lv.featurizer is None:
            return event
        try:
            return from_json(KINDS[lv.featurizer.kind], event)
        except Exception as exc:  # RecordValidationError naming the field with bad base64
            raise RequestDecodeError(f"event_json: {exc}") from exc

    def featurize(self, event: dict[str, Any], lv: LoadedVersion,
                  bytes_are_base64: bool = False) -> tuple[np.ndarray, dict[str, float | None]]:
        """Feature vector and labels of a raw event, with ``lv``'s featurizer and this worker's state."""
        fz = lv.featurizer
        if fz is None:
            raise RequestDecodeError(
                f"event_json: {lv.name} v{lv.version} cannot featurize raw events here "
                f"({lv.featurizer_error}); send 'features' instead")
        if bytes_are_base64:
            event = self._decode_bytes(dict(event), lv)
        key = (fz.kind, fz.version)
        fn = getattr(fz, "featurize_for_prediction", fz.featurize)
        prepare = getattr(fz, "prediction_input", None)  # stateless work (an image's conversion): not under the lock
        try:
            if prepare is not None:
                event = prepare(event)
            with self._lock:  # featurizer state is not thread-safe; featurizing is cheap
                state = self._states.get(key)
                if state is None:
                    state = self._states[key] = fz.new_state()
                row = fn(event, state)
        except Exception as exc:  # FeatureValidationError, KeyError on missing fields, TypeError...
            raise RequestDecodeError(
                f"event: could not featurize with {fz.kind}/{fz.version}: {type(exc).__name__}: {exc}") from exc
        return np.asarray(row.x, dtype=np.float32), dict(row.labels)

    @staticmethod
    def check_features(features: Any, lv: LoadedVersion) -> np.ndarray:
        """A request's ``features`` as float32[n_features], or a RequestDecodeError saying what is wrong."""
        if not isinstance(features, list | tuple | np.ndarray):
            raise RequestDecodeError(f"features: must be a list of {lv.n_features} numbers")
        if len(features) != lv.n_features:
            raise RequestDecodeError(
                f"features: {lv.name} v{lv.version} takes {lv.n_features} features, got {len(features)}")
        if not isinstance(features, np.ndarray) and any(isinstance(v, str | bool) for v in features):
            # numpy read "16" as 16.0 and true as 1.0: a number sent as text is a client's bug to report
            raise RequestDecodeError("features: every value must be a JSON number (not a string or a boolean)")
        try:
            with np.errstate(over="ignore"):  # 1e39 is refused below as not finite, without a RuntimeWarning
                x = np.asarray(features, dtype=np.float32)
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: a 4000-digit integer (was a 500)
            raise RequestDecodeError(f"features: not all numbers ({type(exc).__name__}: {str(exc)[:80]})") from exc
        if x.ndim != 1 or not np.isfinite(x).all():
            raise RequestDecodeError("features: every value must be a finite number (no NaN/inf, no nesting)")
        return x

    def request_input(self, request: dict[str, Any],
                      lv: LoadedVersion) -> tuple[np.ndarray, dict[str, float | None] | None]:
        """Features (and labels, if the request carries a labelled raw event) of a PredictionRequest."""
        if request.get("event_json") is not None:
            event = self.event_from_json(request["event_json"], lv)
            return self.featurize(event, lv)
        if request.get("features") is not None:
            return self.check_features(request["features"], lv), None
        raise RequestDecodeError("request: has neither 'features' nor 'event_json'; set one of them")


#: Base64 characters of an image read to find its size (its header): 192 KiB of bytes, past any EXIF block.
_HEAD_B64 = 256 * 1024


def declared_pixels(instance: Any) -> int:
    """Pixels an instance's image declares in its header (0 when it has none, or none is readable: its
    featurization then says why), read from the head of its base64 ``data`` without decoding a pixel.
    What a request's images will cost to decode, known before any is (serving/http_api.py)."""
    data = instance.get("data") if isinstance(instance, dict) else None
    if not isinstance(data, str) or not data:
        return 0
    try:
        head = base64.b64decode(data[: _HEAD_B64], validate=False)
        if image_probe.sniff(head) is not None:  # PNG/JPEG: the one probe, from the header bytes alone
            header = image_probe.probe(head, scans=False)
            return header.width * header.height
        # a cut-off head's "Corrupt EXIF data": the size is all we read here (the lock: image_probe.WARNINGS_LOCK)
        with image_probe.WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(head)) as img:  # a format ingestion converts (WebP, HEIC...): its header
                width, height = img.size
    except Exception:  # noqa: BLE001 - not an image here: featurize() refuses it with its reason
        if len(data) <= _HEAD_B64:
            return 0
        # A header past the head: a TIFF may put its IFD (the size) at the end of the file. It read as "no
        # size", and 14 such 31-Mpx TIFFs in one 4 MB body went past the per-request pixel cap (7.7 s of
        # decoding, 7 s for a good request beside three of them). Opened whole, still without decoding.
        try:
            with Image.open(io.BytesIO(base64.b64decode(data, validate=False))) as img:
                width, height = img.size
        except Exception:  # noqa: BLE001 - see above
            return 0
    return int(width) * int(height)
