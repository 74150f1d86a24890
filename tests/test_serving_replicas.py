"""Two serving replicas in one group keep the exactly-once answer while versions swap (issue 16 step 4).

Slow (two `streamlearn serve` processes import TensorFlow; well under a minute of work after that on a
quiet 2-core box), so it is one test. The second replica joins the group while the first answers
(scaling out). The scenario is :func:`benchmarks.bench_failover.serving`, which
also measures the version skew between the replicas; this test asserts correctness only: every
request answered exactly once across both replicas (read_committed), by the version the answer names,
both replicas owning partitions, and every promoted version reaching every partition.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_failover
from streaming.config import Settings


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_replicas_answer_exactly_once_while_versions_swap(settings: Settings, tmp_path: Path) -> None:
    result = bench_failover.serving(settings, tmp_path, versions=2, poll_s=0.5)
    assert result["requests"] > 100, result
    assert (result["missing"], result["duplicates"], result["wrong_outputs"]) == (0, 0, 0), result
    at_swaps = result["partitions_at_swaps"]
    assert len(at_swaps) == 2 and all(at_swaps), result  # both replicas owned partitions when versions swapped
    assert [s["version"] for s in result["skews"]] == [2, 3], result
    assert all(s["partitions"] == settings.partitions for s in result["skews"]), result
