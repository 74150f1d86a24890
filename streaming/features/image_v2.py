"""Image featurizer ``image-v2``: ``image-v1`` with the EXIF orientation applied before anything else.

Why a new version: cameras and phones store a photo's pixels as the sensor read them and record
how to turn them upright in the EXIF ``Orientation`` tag (274). v1 ignores the tag, so a portrait
phone photo reached the model lying on its side, while every viewer shows it upright. v2 reads the
tag after the header checks and before decoding, lets libjpeg scale down to the pre-turn size, and
transposes the decoded pixels (orientations 2-8: mirrors and quarter turns). An image without EXIF,
or whose tag is 1, gives exactly v1's features; so do the scikit-learn digits.

A tag that cannot be read (malformed EXIF, an orientation outside 1-8) is taken as "upright", as
viewers do: the pixels themselves decoded fine, and rejecting the photo for its metadata would drop
real data over a side channel. The image is counted (``exif_unreadable``) and logged once per
featurizer instance.

Limit: a PNG whose ``eXIf`` chunk comes after its pixel data (allowed, rare; phone photos are JPEG)
is taken as upright, because Pillow fills ``info["exif"]`` only from the chunks read when the file is
opened, and the check below looks only there.

v1 stays registered, unchanged, for models trained on it: serving builds a version's inputs with
the featurizer recorded in its metadata, so a model never sees turned pixels it was not trained on.
"""

from __future__ import annotations

import logging
import warnings

from PIL import Image

from streaming.features.base import register
from streaming.features.image import ImageFeaturizer
from streaming.image_probe import WARNINGS_LOCK

log = logging.getLogger(__name__)

VERSION = "image-v2"
#: EXIF tag 274 (Orientation) value -> the transpose that makes the pixels upright.
_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION = 0x0112


class ImageFeaturizerV2(ImageFeaturizer):
    """v1's decoding and checks, with the EXIF orientation applied (see the module docstring)."""

    version = VERSION
    #: images whose EXIF could not be read (taken as upright); for logs and tests.
    exif_unreadable = 0

    def _turn(self, img: Image.Image) -> Image.Transpose | None:
        if "exif" not in img.info:  # no EXIF block at all: the common case costs one dict lookup
            return None
        # Pillow only warns on a truncated IFD and drops the tags, so the warning is made an error.
        # catch_warnings() swaps process-wide state and is not thread-safe; the lock keeps two of these
        # blocks (serving featurizes on several threads) from restoring each other's filters and leaving
        # "error" installed for the whole process. It covers the EXIF parse only, not the pixel decode,
        # and the count of unreadable tags.
        with WARNINGS_LOCK:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", UserWarning)
                    value = img.getexif().get(_ORIENTATION, 1)
            except Exception as exc:  # noqa: BLE001 - any parse failure of the metadata means "upright"
                self._unreadable(f"{type(exc).__name__}: {exc}")
                return None
            if value == 1:
                return None
            turn = _TURNS.get(value) if isinstance(value, int) else None
            if turn is None:
                self._unreadable(f"Orientation {value!r} is not 1-8")
            return turn

    def _unreadable(self, why: str) -> None:
        if not self.exif_unreadable:
            log.warning("image EXIF orientation unreadable (%s); taking the image as upright", why[:200])
        self.exif_unreadable += 1


register("image", VERSION, ImageFeaturizerV2, current=True)
