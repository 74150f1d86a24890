"""Serving loads a version from a registry on ``s3://`` (moto): the trainer's host publishes a real
SavedModel, a serving host with an empty cache verifies, downloads and answers with it, and refuses
a version whose shard was damaged on the object store.

One test on purpose: it imports TensorFlow and exports two tiny SavedModels (36-47 s alone at a load
average of 19-40 on the shared 2-core box, most of it the TF import the suite's serving tests share)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.exceptions import ModelLoadError
from serving.model import load_version
from streaming.model_registry import ModelRegistry
from tests.s3_helpers import S3Server
from tests.serving_helpers import expected_outputs, publish


def test_serving_loads_and_refuses_versions_from_s3(s3_server: S3Server, tmp_path: Path) -> None:
    url = f"s3://{s3_server.new_bucket()}/models"
    trainer = ModelRegistry(url, storage_options=s3_server.options(), cache_dir=tmp_path / "trainer")
    good = publish(trainer, "tiny", tag=3.0)
    bad = publish(trainer, "tiny", tag=5.0, promote=False)
    shard = next(k for k in trainer.objects.list_keys(f"tiny/{bad}") if "variables.data" in k)
    trainer.objects.put(shard, trainer.objects.get(shard)[:7])  # torn on the object store after publishing

    serving = ModelRegistry(url, storage_options=s3_server.options(), cache_dir=tmp_path / "serving")
    assert serving.promoted("tiny") == good
    loaded = load_version(serving, "tiny", good)
    x = np.asarray([[1.0, 2.0, 3.0, 4.0]], np.float32)
    np.testing.assert_allclose(loaded.predict(x)[0], expected_outputs([1, 2, 3, 4], 3.0), rtol=1e-6)
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        load_version(serving, "tiny", bad)
