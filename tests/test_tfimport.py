"""serving.tfimport: TensorFlow without Keras for the serving worker, and Keras still importable after.

Runs in a fresh interpreter: the test process has usually imported TensorFlow and Keras already, and
then the function is (by design) a plain import.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys
from serving.tfimport import import_tensorflow
tf = import_tensorflow()
assert tf.constant([1.0, 2.0]).numpy().sum() == 3.0
leaked = sorted(n for n in sys.modules if n == "keras" or n.startswith(("keras.", "sklearn")))
assert not leaked, leaked  # neither Keras nor scikit-learn came with it
import keras  # the markers are gone: the real Keras imports afterwards
assert hasattr(keras, "layers") and keras.layers.Dense(2) is not None
assert import_tensorflow() is tf
print("ok")
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serving_imports_tensorflow_without_keras_and_keras_still_works() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=540,
                          env={"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
