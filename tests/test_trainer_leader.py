"""Two trainer processes for one model, kill -9 of the leader: the standby takes over (issue 16 step 3).

Slow (about a minute on a quiet 2-core box: two trainer processes import TensorFlow and train the
test-sized ``restart_tiny`` model a few times), so it is the one process-level test of the lease; the
lease and fence logic itself is tested without TensorFlow in tests/test_leader_lease.py. The scenario
is :func:`benchmarks.bench_failover.trainer`, which also reports the takeover time; here only
correctness is asserted, the takeover only has to happen before the scenario's generous deadline.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_failover
from streaming.config import Settings


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_standby_trainer_takes_over_after_kill_9_without_losing_or_duplicating_versions(
        settings: Settings, tmp_path: Path) -> None:
    result = bench_failover.trainer(settings, tmp_path, rows=40, lease_s=3.0)
    assert result["problems"] == [], result
    assert result["standby_said_so"], result  # a standby says so once: it logged nothing before
    assert result["epochs"][1] > result["epochs"][0], result  # the takeover fenced the old epoch
    assert len(result["versions"]) > len(result["versions_at_kill"]) >= 1, result
