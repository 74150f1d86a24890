"""A test-sized model for the periodic trainer's restart test (tests/test_restart.py).

Why a spec of its own: ``sensor_forecaster`` holds out at least 200 rows and trains at least 300
gradient steps, which made the restart test the slowest of the suite although what it checks (the
restarted trainer picks up the batches written while it was down and publishes a verified version)
does not depend on the model. This one is the linear test forecaster with a 20-row holdout and two
epochs, so 40-row batches are enough.
"""

from __future__ import annotations

import dataclasses

from tests.custom_spec_module import SPEC as _LINEAR

SPEC = dataclasses.replace(_LINEAR, name="restart_tiny", min_holdout_rows=20, epochs=2,
                           description="test-only: the restart test's small-holdout linear forecaster")
