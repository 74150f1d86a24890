"""HTTP front end: TensorFlow Serving REST shapes (status, metadata, predict, errors)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pytest

from serving.http_api import ServeLimits, start_http
from serving.inputs import Featurization
from serving.policy import Policy
from serving.versions import VersionManager
from streaming.config import Settings
from streaming.model_registry import ModelRegistry
from tests.helpers import wait_until
from tests.serving_helpers import WEBLOG_FEATURIZER, expected_outputs, publish, weblog_event

MODEL = "webtiny"


@pytest.fixture()
def server(settings: Settings) -> Iterator[tuple[str, VersionManager]]:
    reg = ModelRegistry(settings.model_dir)
    publish(reg, MODEL, tag=5.0, n_features=64, n_outputs=1, featurizer=WEBLOG_FEATURIZER)
    v2 = publish(reg, MODEL, tag=7.0, n_features=64, n_outputs=1, featurizer=WEBLOG_FEATURIZER, promote=False)
    manager = VersionManager(settings, MODEL, Policy.parse(f"canary:{v2}:0.5"), poll_interval_s=0.1,
                             follow_updates=False).start()
    wait_until(lambda: manager.current().candidate is not None, timeout=60, message="stable and canary loaded")
    srv = start_http(manager, Featurization(), MODEL, 0)
    yield f"http://127.0.0.1:{srv.bound_port}", manager
    srv.should_exit = True
    manager.stop()


@contextmanager
def image_server(settings: Settings, name: str, limits: ServeLimits | None = None) -> Iterator[str]:
    """An image-v1 model ``name`` loaded and served over HTTP; yields the base URL."""
    reg = ModelRegistry(settings.model_dir)
    publish(reg, name, tag=3.0, n_features=64, n_outputs=1, featurizer={"kind": "image", "version": "image-v1"})
    manager = VersionManager(settings, name, Policy.parse("latest"), poll_interval_s=0.1, follow_updates=False).start()
    srv = None
    try:
        wait_until(lambda: manager.current().stable is not None, timeout=60, message="the image model loaded")
        srv = start_http(manager, Featurization(), name, 0, limits=limits)
        yield f"http://127.0.0.1:{srv.bound_port}"
    finally:
        if srv is not None:
            srv.should_exit = True
        manager.stop()


def test_status_and_metadata_shapes(server: tuple[str, VersionManager]) -> None:
    base, _ = server
    with httpx.Client(base_url=base, timeout=10) as c:
        body = c.get(f"/v1/models/{MODEL}").json()
        assert body == {"model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
            {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
        assert c.get(f"/v1/models/{MODEL}/versions/2").json()["model_version_status"][0]["version"] == "2"
        meta = c.get(f"/v1/models/{MODEL}/metadata").json()
        assert meta["model_spec"] == {"name": MODEL, "signature_name": "", "version": "1"}
        sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
        assert sig["inputs"]["x"]["dtype"] == "DT_FLOAT"
        assert [d["size"] for d in sig["inputs"]["x"]["tensor_shape"]["dim"]] == ["-1", "64"]
        assert [d["size"] for d in sig["outputs"]["outputs"]["tensor_shape"]["dim"]] == ["-1", "1"]
        assert c.get(f"/v1/models/{MODEL}/labels/canary/metadata").json()["model_spec"]["version"] == "2"
        for path in ("/v1/models/nope", f"/v1/models/{MODEL}/versions/9", f"/v1/models/{MODEL}/labels/blue/metadata"):
            r = c.get(path)
            assert r.status_code == 404 and set(r.json()) == {"error"}, (path, r.text)


def test_predict_rows_columnar_versions_labels_and_raw_events(server: tuple[str, VersionManager]) -> None:
    base, _ = server
    x = np.linspace(-1, 1, 64).round(4).tolist()
    with httpx.Client(base_url=base, timeout=10) as c:
        r = c.post(f"/v1/models/{MODEL}:predict", json={"instances": [x, {"x": x}]})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert len(preds) == 2
        np.testing.assert_allclose(preds[0], expected_outputs(x, 5.0, 1), rtol=1e-5)
        r = c.post(f"/v1/models/{MODEL}/versions/2:predict", json={"inputs": {"x": [x]}})
        np.testing.assert_allclose(r.json()["outputs"][0], expected_outputs(x, 7.0, 1), rtol=1e-5)
        for label, tag in (("stable", 5.0), ("canary", 7.0)):
            r = c.post(f"/v1/models/{MODEL}/labels/{label}:predict", json={"instances": [x]})
            np.testing.assert_allclose(r.json()["predictions"][0], expected_outputs(x, tag, 1), rtol=1e-5)
        r = c.post(f"/v1/models/{MODEL}:predict", json={"instances": [weblog_event(1), weblog_event(2)]})
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 2 and len(r.json()["predictions"][0]) == 1


def test_predict_errors_use_tf_serving_shape(server: tuple[str, VersionManager]) -> None:
    base, _ = server
    nan_row = '{"instances": [[' + ",".join(["NaN"] * 64) + "]]}"  # Python's json accepts NaN literals
    cases: list[tuple[dict[str, Any] | str, str]] = [
        ({"instances": [[1.0, 2.0]]}, "takes 64 features"),
        ({"instances": []}, "non-empty"),
        ({"rows": [[1.0]]}, "instances"),
        ({"instances": [{"method": "GET"}]}, "instances[0]"),
        (nan_row, "finite"),
        ("{not json", "not valid JSON"),
        # a key named twice: Python kept the last, a proxy in front may have checked the first (was a 200)
        ('{"instances": [[0]], "instances": [[' + ",".join(["0"] * 64) + "]]}", "appears more than once"),
    ]
    with httpx.Client(base_url=base, timeout=10) as c:
        for body, word in cases:
            if isinstance(body, str):
                r = c.post(f"/v1/models/{MODEL}:predict", content=body, headers={"content-type": "application/json"})
            else:
                r = c.post(f"/v1/models/{MODEL}:predict", json=body)
            assert r.status_code == 400 and set(r.json()) == {"error"} and word in r.json()["error"], (body, r.text)
        r = c.post("/v1/models/other:predict", json={"instances": [[1.0]]})
        assert r.status_code == 404 and "error" in r.json()


def test_metrics_endpoint_exposes_serving_metrics(settings: Settings, server: tuple[str, VersionManager]) -> None:
    from serving.metrics import start_metrics

    port = start_metrics(settings.with_(metrics_port=0))
    assert port is not None
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert f'streamlearn_serving_version{{model="{MODEL}",role="stable"}} 1.0' in text
    assert f'streamlearn_serving_version{{model="{MODEL}",role="candidate"}} 2.0' in text
    assert f'streamlearn_serving_canary_state{{model="{MODEL}"}} 1.0' in text
    assert "request_id" not in text  # bounded labels only


def test_predict_takes_an_image_in_any_format_ingestion_converts(settings: Settings) -> None:
    """A phone's HEIC or a web WebP sent to :predict as a raw ImageEvent is answered with the features of the
    same photo as ingestion publishes it (converted to PNG by the same function), not refused; a PDF is a
    400 that names it."""
    import base64

    from ingest.image_check import accept
    from streaming.features.image import ImageFeaturizer
    from tests.test_features_image import NOW, _photo, rec

    with image_server(settings, "imgtiny") as base:
        fz = ImageFeaturizer(clock_ms=lambda: NOW)
        with httpx.Client(base_url=base, timeout=30) as c:
            for fmt in ("WEBP", "HEIF"):
                raw = _photo(fmt)
                want = fz.featurize(rec(accept(raw)[0]), fz.new_state()).x.tolist()
                event = {**rec(raw, content_type=None), "timestamp": int(NOW), "data": base64.b64encode(raw).decode()}
                del event["content_type"]
                r = c.post("/v1/models/imgtiny:predict", json={"instances": [event]})
                assert r.status_code == 200, (fmt, r.text)
                np.testing.assert_allclose(r.json()["predictions"][0], expected_outputs(want, 3.0, 1), rtol=1e-5)
            pdf = {**rec(b"", content_type=None), "timestamp": int(NOW),
                   "data": base64.b64encode(b"%PDF-1.7\n" + bytes(64)).decode()}
            r = c.post("/v1/models/imgtiny:predict", json={"instances": [pdf]})
            assert r.status_code == 400 and "PDF is not supported" in r.json()["error"], r.text


def test_the_images_of_one_request_are_bounded_in_pixels_before_any_is_decoded(settings: Settings) -> None:
    """180 small PNGs each declaring 4000x4000 fit the body and instance limits and took 14 s of CPU to
    decode, so two requests filled the inference pool and a trivial predict waited 12 s. The request's
    images are now counted from their headers, and a request over the pixel budget is a 413 at once."""
    import base64
    import io

    from PIL import Image

    from serving.inputs import declared_pixels
    from tests.test_features_image import NOW, rec

    buf = io.BytesIO()
    Image.new("L", (2000, 2000), 200).save(buf, "PNG")  # ~10 KB on the wire, 4 Mpx to decode
    big = {**rec(b""), "timestamp": int(NOW), "data": base64.b64encode(buf.getvalue()).decode()}
    assert declared_pixels(big) == 4_000_000 and declared_pixels({"data": "not base64!"}) == 0
    with image_server(settings, "imgpx", ServeLimits(max_request_pixels=10_000_000)) as base:
        with httpx.Client(base_url=base, timeout=30) as c:
            r = c.post("/v1/models/imgpx:predict", json={"instances": [big] * 3})
            assert r.status_code == 413 and "12000000 pixels in all" in r.json()["error"], r.text
            # Cut after the header: decoded first, it would be a 400 "cannot decode"; the 413 says the
            # request was refused from the headers alone.
            cut = {**big, "data": base64.b64encode(buf.getvalue()[:40]).decode()}
            r = c.post("/v1/models/imgpx:predict", json={"instances": [cut] * 3})
            assert r.status_code == 413, r.text
            r = c.post("/v1/models/imgpx:predict", json={"instances": [big] * 2})
            assert r.status_code == 200, r.text
