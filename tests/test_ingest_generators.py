"""Demo data generators: deterministic, schema-valid, labelled, digits in natural order."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
from fastavro import parse_schema
from fastavro.validation import validate as avro_validate
from PIL import Image

from ingest.generators import digits, web_traffic
from schemas.catalog import load_schema


def test_web_traffic_deterministic_labelled_and_schema_valid() -> None:
    a = list(web_traffic(3000, seed=11))
    assert a == list(web_traffic(3000, seed=11))
    assert a != list(web_traffic(3000, seed=12))
    labels = Counter(r["label"] for r in a)
    assert set(labels) == {"normal", "bot", "attack"}
    assert labels["normal"] > labels["bot"] + labels["attack"]
    schema = parse_schema(load_schema("WebLogEvent"))
    for r in a:
        assert avro_validate(r, schema, raise_errors=True)
    attacks = [r for r in a if r["label"] == "attack"]
    assert sum(r["status"] >= 400 for r in attacks) > 0.7 * len(attacks)
    assert all(a[i]["timestamp"] <= a[i + 1]["timestamp"] for i in range(len(a) - 1))
    assert len({r["event_id"] for r in a}) == len(a)


def test_digits_natural_order_and_pixels() -> None:
    from sklearn.datasets import load_digits

    ds = load_digits()
    out = list(digits())
    assert len(out) == 1797
    assert [r["label"] for r in out[:20]] == [str(int(t)) for t in ds.target[:20]]
    img = np.asarray(Image.open(io.BytesIO(out[5]["data"])))
    assert img.shape == (8, 8)
    assert np.allclose(img / 255.0 * 16.0, ds.images[5], atol=0.07)
    schema = parse_schema(load_schema("ImageEvent"))
    assert avro_validate(out[0], schema, raise_errors=True)
    assert [r["image_id"] for r in digits(5, seed=3)] == [r["image_id"] for r in out[:5]]


def test_demo_file_helpers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ingest.generators import web_traffic_lines, write_digit_files
    from ingest.images import inspect, label_for
    from ingest.weblog import parse_line

    lines = list(web_traffic_lines(50, seed=2))
    assert all(line.endswith("\n") for line in lines)
    assert [parse_line(x, source="s")["path"] for x in lines] == [r["path"] for r in web_traffic(50, seed=2)]
    files = write_digit_files(tmp_path / "in", 5, start=10)
    assert [f.name for f in files] == [f"{r['label']}_{10 + i:04d}.png" for i, r in enumerate(list(digits(15))[10:])]
    assert all(label_for(f) == f.name[0] and inspect(f.read_bytes(), f.name).width == 8 for f in files)
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == sorted(f.name for f in files)
