"""Version policy parsing, stable canary routing and the rollback rule (pure logic, no broker)."""

from __future__ import annotations

import pytest

from serving.exceptions import PolicyError
from serving.policy import CanaryJudge, Policy, canary_bucket


def test_policy_parse() -> None:
    assert Policy.parse(None) == Policy.parse("latest") == Policy()
    assert Policy.parse("pinned:3") == Policy("pinned", 3)
    assert Policy.parse("canary:4:0.25") == Policy("canary", 4, 0.25)
    assert str(Policy.parse("canary:4:0.25")) == "canary:4:0.25"
    for bad in ("pinned", "pinned:x", "canary:4", "canary:4:0", "canary:4:1.5", "newest"):
        with pytest.raises(PolicyError, match="policy"):
            Policy.parse(bad)


def test_canary_bucket_is_stable_and_spreads() -> None:
    # crc32 of the id, so the value is fixed across processes and releases (never Python's hash())
    assert canary_bucket("request-1") == canary_bucket("request-1")
    assert abs(canary_bucket("abc") - 0x352441C2 / 2**32) < 1e-12
    share = sum(canary_bucket(f"r{i}") < 0.1 for i in range(10_000)) / 10_000
    assert 0.08 < share < 0.12


def test_judge_rolls_back_only_on_enough_worse_evidence() -> None:
    judge = CanaryJudge(window=50, min_samples=10, rel_threshold=0.2, abs_threshold=0.02)
    for _ in range(9):
        judge.record(1, 0.1)
        judge.record(2, 0.9)
    assert judge.verdict(1, 2) is None  # too few samples yet
    judge.record(1, 0.1)
    judge.record(2, 0.9)
    assert "candidate v2" in (judge.verdict(1, 2) or "")
    judge.forget(2)
    for _ in range(20):
        judge.record(2, 0.11)  # within 20 % + 0.02 of the stable error: keep routing
    assert judge.verdict(1, 2) is None
