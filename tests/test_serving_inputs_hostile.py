"""Hostile numbers in a prediction request are the request's 400, never the server's 500.

A 4000-digit integer among the features raised OverflowError in ``np.asarray`` (serving HTTP answered
500 with a traceback in its log) and in ``float()`` (``streamlearn predict --file`` ended in a traceback).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from serving.client import to_request
from serving.exceptions import RequestDecodeError
from serving.inputs import Featurization

HUGE = int("9" * 4000)


def test_a_huge_integer_feature_is_a_decode_error() -> None:
    version = SimpleNamespace(n_features=3, name="m", version=1)
    with pytest.raises(RequestDecodeError, match="features: not all numbers"):
        Featurization.check_features([HUGE, 0, 0], version)  # type: ignore[arg-type]
    assert Featurization.check_features([1, 2, 3], version).tolist() == [1.0, 2.0, 3.0]  # type: ignore[arg-type]


@pytest.mark.parametrize("line", [{"features": [HUGE, 0]}, {"features": [1, 2], "timestamp": "soon"},
                                  {"features": [1, "x"]}])
def test_predict_file_lines_with_unusable_numbers_are_refused_naming_the_line(line: dict) -> None:
    with pytest.raises(RequestDecodeError, match="line 7: features must be numbers"):
        to_request("m", line, line=7)


def test_a_predict_file_line_naming_another_model_is_refused_before_anything_is_sent() -> None:
    """It went to this model's requests topic with the other name in it, and was answered by this model;
    the worker now answers such a request with an error, so the client refuses it first."""
    with pytest.raises(RequestDecodeError, match=r"line 3: model is 'other', but these requests go to 'm'"):
        to_request("m", {"features": [1.0], "model": "other"}, line=3)
    assert to_request("m", {"features": [1.0], "model": "m"})["model"] == "m"
    assert to_request("m", {"features": [1.0], "model": ""})["model"] == "m"


def test_numbers_sent_as_strings_or_booleans_are_refused_on_both_paths() -> None:
    """HTTP took ["16", ...] as 16.0 and `predict --file` took true as 1.0 (and "1" as 1.0); both now refuse
    them, as docs/SECURITY.md says. A line with both features and event_json used event_json silently."""
    version = SimpleNamespace(n_features=2, name="m", version=1)
    for bad in (["16", 0], [True, 0]):
        with pytest.raises(RequestDecodeError, match="features: every value must be a JSON number"):
            Featurization.check_features(bad, version)  # type: ignore[arg-type]
        with pytest.raises(RequestDecodeError, match="line 2: features must be numbers"):
            to_request("m", {"features": bad}, line=2)
    with pytest.raises(RequestDecodeError, match="line 4: give features or event_json, not both"):
        to_request("m", {"features": [0.0, 1.0], "event_json": "{}"}, line=4)
    with pytest.raises(RequestDecodeError, match=r"line 5: each request must be a JSON object .* got list"):
        to_request("m", [1, 2, 3], line=5)  # the message was missing its f-string: "{type(obj).__name__}"


def test_an_image_whose_size_is_at_its_end_declares_its_pixels() -> None:
    """A group4 TIFF of 8000x3900 puts its IFD after 200 KB of strips: past the head that was probed, so it
    declared 0 pixels and a 4 MB body of 14 of them went past the per-request pixel cap."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from serving.inputs import declared_pixels

    pixels = np.zeros((3900, 8000), bool)
    pixels[:100] = np.random.default_rng(0).random((100, 8000)) > 0.5
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "TIFF", compression="group4")
    assert buf.tell() > 200_000
    assert declared_pixels({"data": base64.b64encode(buf.getvalue()).decode()}) == 8000 * 3900
