"""A test-sized sensor forecaster for tests/test_distributed_training.py (loaded by name in its workers).

The built-in spec with fewer epochs and a smaller holdout, so the two-worker test stays cheap; the
model, loss, guard and score are the built-in ones.
"""

from __future__ import annotations

import dataclasses

from trainer.spec import load_spec

SPEC = dataclasses.replace(load_spec("sensor_forecaster"), name="sensor_small", epochs=3, min_train_steps=0,
                           min_holdout_rows=100)
