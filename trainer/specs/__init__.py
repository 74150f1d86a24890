"""Built-in model specs. Each module defines ``SPEC``; :data:`BUILTIN_SPECS` maps names to them.

Only import paths are listed here (not the specs), so listing models does not import TensorFlow.
"""

from __future__ import annotations

BUILTIN_SPECS: dict[str, str] = {
    "weblog_classifier": "trainer.specs.weblog:SPEC",
    "sensor_forecaster": "trainer.specs.sensor:SPEC",
    "digits_cnn": "trainer.specs.digits:SPEC",
}
