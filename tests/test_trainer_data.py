"""The prequential data plan: holdout, cursor, bounded seeded reservoir, hashes, NaN labels."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from ingest.generators import digits
from streaming.store import BatchInfo, FeatureStore
from trainer.data import labelled, load_batches, plan_data, reservoir_add
from trainer.exceptions import LineageError, NotEnoughDataError
from trainer.spec import load_spec
from trainer.synthetic import write_batches

# min_holdout_rows=20: these tests are about the cursor and reservoir with one 20-row holdout batch
SPEC = dataclasses.replace(load_spec("digits_cnn"), reservoir_batches=3, min_holdout_rows=20, holdout_fraction=0.0)


@pytest.fixture(scope="module")
def batches(tmp_path_factory: pytest.TempPathFactory) -> list[BatchInfo]:
    store = FeatureStore(tmp_path_factory.mktemp("store"))
    return write_batches(store, "image", digits(240, seed=0), batch_size=20, topic="image.raw")


def test_first_plan_trains_on_all_but_the_newest_batch(batches: list[BatchInfo]) -> None:
    plan = plan_data(SPEC, batches[:4], None)
    assert [b.batch_id for b in plan.train] == [b.batch_id for b in batches[:3]]
    assert plan.holdout == [batches[3]] and plan.reservoir == []
    assert plan.data_state["cursor"] == batches[2].batch_id and plan.data_state["seen"] == 3


def test_next_plan_trains_on_the_previous_holdout_plus_reservoir(batches: list[BatchInfo]) -> None:
    first = plan_data(SPEC, batches[:4], None)
    second = plan_data(SPEC, batches[:7], first.data_state)
    assert second.train_new == batches[3:6]  # the old holdout is now trained on
    assert second.holdout == [batches[6]]
    assert [b.batch_id for b in second.reservoir] == first.data_state["reservoir"]
    assert len(second.data_state["reservoir"]) == 3  # capped


def test_reservoir_is_bounded_deterministic_and_keeps_old_batches() -> None:
    picks: list[list[str]] = []
    for _ in range(2):
        res: list[str] = []
        seen = 0
        for i in range(1000):
            seen = reservoir_add(res, seen, f"b{i:04d}", 20, seed=5)
        picks.append(res)
    assert picks[0] == picks[1] and len(picks[0]) == 20 and seen == 1000
    ids = sorted(int(b[1:]) for b in picks[0])
    assert ids[0] < 500 and ids[-1] >= 500  # old and recent batches both represented
    other: list[str] = []
    seen = 0
    for i in range(1000):
        seen = reservoir_add(other, seen, f"b{i:04d}", 20, seed=6)
    assert other != picks[0]


def test_too_few_new_batches_is_a_clear_error(batches: list[BatchInfo]) -> None:
    first = plan_data(SPEC, batches[:4], None)
    with pytest.raises(NotEnoughDataError, match="1 new feature batch"):
        plan_data(SPEC, batches[:4], first.data_state)


def test_cursor_falls_back_to_creation_time_when_its_batch_is_gone(batches: list[BatchInfo]) -> None:
    first = plan_data(SPEC, batches[:4], None)
    remaining = [b for b in batches[:8] if b.batch_id != first.data_state["cursor"]]
    plan = plan_data(SPEC, remaining, first.data_state)
    assert plan.train_new == batches[3:7]


def test_load_checks_hashes_and_drops_unlabelled_rows(batches: list[BatchInfo], tmp_path: Path) -> None:
    x, cols, hashes = load_batches(SPEC, batches[:2], 64)
    assert x.shape == (40, 64) and len(hashes) == 2
    cols["digit"][[0, 5]] = np.nan
    xs, ys = labelled(SPEC, x, cols)
    assert xs.shape == (38, 64) and ys.shape == (38, 10) and np.all(ys.sum(axis=1) == 1)
    # labels that are no class id (a camera file name "20241203_101500.png", "-1", "2.5") are unlabelled
    # rows, not the end of every retrain ("class ids must be integers in [0, 10)")
    cols["digit"][[1, 2, 3]] = [20241203.0, -1.0, 2.5]
    xs, ys = labelled(SPEC, x, cols)
    assert xs.shape == (35, 64) and ys.shape == (35, 10) and np.all(ys.sum(axis=1) == 1)
    with pytest.raises(LineageError, match="sha256"):
        load_batches(SPEC, batches[:1], 64, expected_sha={batches[0].batch_id: "0" * 64})
    with pytest.raises(LineageError, match="features"):
        load_batches(SPEC, batches[:1], 14)


def test_holdout_grows_to_max_of_n_rows_and_a_fraction_of_the_new_data(batches: list[BatchInfo]) -> None:
    spec = dataclasses.replace(SPEC, min_holdout_rows=50, holdout_fraction=0.2)
    plan = plan_data(spec, batches[:6], None)  # 120 new rows: max(50, 24) = 50 -> 3 batches of 20
    assert plan.holdout == batches[3:6] and plan.train_new == batches[:3]
    plan = plan_data(spec, batches, None)  # 240 rows: max(50, 48) -> still 3 batches (60 rows)
    assert len(plan.holdout) == 3 and sum(b.manifest["record_count"] for b in plan.holdout) >= 50
    big = dataclasses.replace(spec, min_holdout_rows=10, holdout_fraction=0.5)
    assert len(plan_data(big, batches, None).holdout) == 6  # half of 240 rows
    with pytest.raises(NotEnoughDataError, match=r"needs at least 200 held-out rows.*min_holdout_rows=200"):
        plan_data(load_spec("digits_cnn"), batches[:4], None)  # the default N=200 > 80 rows in all


def _fake(i: int, rows: int) -> BatchInfo:
    """A batch as the planner sees it (id, creation time, row count): planning reads no files."""
    return BatchInfo(f"b{i:05d}", Path(f"/nowhere/b{i:05d}.avro"), {"created_at_ms": 1_000 + i, "record_count": rows})


def test_every_new_batch_is_trained_on_while_the_rows_fit() -> None:
    """60 new 5-row batches since the cursor: all but the holdout are trained on directly. The old cap
    counted 40 batches and left the oldest ones (the previous version's holdout) to reservoir sampling."""
    spec = dataclasses.replace(SPEC, min_holdout_rows=5)
    old = [_fake(i, 5) for i in range(4)]
    first = plan_data(spec, old, None)
    new = [_fake(i, 5) for i in range(4, 64)]
    plan = plan_data(spec, old + new, first.data_state)
    assert plan.train_new == [old[3], *new[:-1]] and plan.holdout == [new[-1]]


def test_new_rows_over_max_new_rows_leave_the_oldest_batches_to_the_reservoir() -> None:
    spec = dataclasses.replace(SPEC, min_holdout_rows=5, max_new_rows=100)
    batches = [_fake(i, 30) for i in range(10)]
    plan = plan_data(spec, batches, None)
    assert plan.holdout == [batches[9]]
    assert plan.train_new == batches[6:9]  # the newest 90 rows; a 4th batch would make 120 > 100
    # the six older batches were offered to the reservoir first: this version trains on a sample of them
    assert len(plan.reservoir) == 3 and {b.batch_id for b in plan.reservoir} <= {b.batch_id for b in batches[:6]}
    assert plan.data_state["seen"] == 9


def test_one_batch_over_max_new_rows_is_still_trained_on() -> None:
    spec = dataclasses.replace(SPEC, min_holdout_rows=5, max_new_rows=10)
    batches = [_fake(i, 500) for i in range(3)]
    plan = plan_data(spec, batches, None)
    assert plan.train_new == [batches[1]] and plan.holdout == [batches[2]]


def test_a_once_run_that_would_repeat_a_rejected_candidate_is_recognised(tmp_path: Path) -> None:
    """`train --once` from cron published a copy of the same rejected candidate on every run (same
    batches, parent and spec: training is deterministic), pushing real versions out of --keep."""
    from types import SimpleNamespace

    from streaming.model_registry import ModelRegistry
    from streaming.store import BatchInfo
    from tests.test_model_registry import fake_export
    from trainer.cycle import rejected_repeat

    reg = ModelRegistry(tmp_path / "models")

    def batch(i: int, sha: str = "s") -> BatchInfo:
        return BatchInfo(f"b{i}", tmp_path / f"b{i}.avro", {"sha256": f"{sha}{i}"})

    def plan(*batches: BatchInfo) -> SimpleNamespace:
        return SimpleNamespace(reservoir=[], train_new=list(batches[:-1]), holdout=[batches[-1]])

    spec = {"epochs": 2, "layers": [8, 4]}
    lineage = {"batches": [{"batch_id": "b1", "role": "train", "sha256": "s1"},
                           {"batch_id": "b2", "role": "holdout", "sha256": "s2"}]}
    reg.publish("m", fake_export(reg, "m"), {"parent_version": None, "spec": spec, "lineage": lineage})
    reg.set_promoted("m", 1, "first")
    reg.publish("m", fake_export(reg, "m"), {"parent_version": 1, "spec": spec, "lineage": lineage})
    assert rejected_repeat(reg, "m", spec, plan(batch(1), batch(2)), 1) is None  # no decision yet: not a repeat
    reg.record("m", 2, "REJECTED", "worse")
    assert rejected_repeat(reg, "m", spec, plan(batch(1), batch(2)), 1) == 2
    assert rejected_repeat(reg, "m", spec, plan(batch(1), batch(2), batch(3)), 1) is None  # a new batch
    assert rejected_repeat(reg, "m", spec, plan(batch(1, "t"), batch(2)), 1) is None  # same id, other bytes
    assert rejected_repeat(reg, "m", {**spec, "epochs": 3}, plan(batch(1), batch(2)), 1) is None  # spec changed
    assert rejected_repeat(reg, "m", spec, plan(batch(1), batch(2)), None) is None  # another parent


def test_after_a_promote_only_batches_past_the_trained_offsets_are_new(tmp_path: Path) -> None:
    """`store promote` of a rebuilt namespace: other batch ids (other boundaries), all created later.
    By creation time all of them were new, so the next candidate trained again on its parent's rows and
    held out rows its parent had trained on."""
    old_store = FeatureStore(tmp_path / "old")
    old = write_batches(old_store, "image", digits(160, seed=0), batch_size=20, topic="image.raw")
    first = plan_data(SPEC, old[:4], None)  # trained on offsets 0..59, held out 60..79
    assert first.data_state["cursor_offsets"] == {"image.raw/0": 59}
    rebuilt = write_batches(FeatureStore(tmp_path / "rebuilt"), "image", digits(160, seed=0), batch_size=30,
                            topic="image.raw", created_at_ms=1_900_000_000_000)  # boundaries 0-29, 30-59, ...
    plan = plan_data(SPEC, rebuilt, first.data_state)
    assert [b.manifest["ranges"][0]["first_offset"] for b in plan.train_new + plan.holdout] == [60, 90, 120, 150]
