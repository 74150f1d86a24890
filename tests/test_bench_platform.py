"""Pure helpers of the freshness benchmark (benchmarks/bench_platform.py); the figure itself is the
benchmark's, these only check that its stream really shifts and that "trained on it" means what the
JSON's definition says. No broker, no TensorFlow."""

from __future__ import annotations

import itertools

from benchmarks import bench_platform as bp

START_MS = 1_700_000_000_000


def _take(shifted: bool, n: int = 3000) -> list[dict]:
    return list(itertools.islice(bp.regime_events(shifted, START_MS, seed=0), n))


def test_the_new_regime_fails_every_crawler_and_the_old_one_none() -> None:
    old, new = _take(False), _take(True)
    old_bots = [e for e in old if e["label"] == "bot"]
    new_bots = [e for e in new if e["label"] == "bot"]
    assert old_bots and all(e["status"] == 200 for e in old_bots)
    assert new_bots and all(e["status"] == 403 for e in new_bots)
    # crawlers are several times more common after the shift; attacks (the learnable failures) in both
    assert len(new_bots) > 2 * len(old_bots)
    assert all(any(e["label"] == "attack" for e in evs) for evs in (old, new))
    # the request side of a non-crawler is untouched by the shift
    assert all(e["status"] != 403 or e["label"] != "normal" for e in new)


def test_the_stream_is_endless_and_its_event_ids_do_not_repeat() -> None:
    evs = list(itertools.islice(bp.regime_events(True, START_MS, seed=1, chunk=100), 250))  # 3 chunks
    assert len({e["event_id"] for e in evs}) == len(evs)


def _meta(role: str, first: int, last: int, topic: str = "t.weblog.raw", partition: int = 0) -> dict:
    return {"lineage": {"batches": [{"role": role, "ranges": [
        {"topic": topic, "partition": partition, "first_offset": first, "last_offset": last}]}]}}


def test_trained_on_counts_train_and_reservoir_batches_only() -> None:
    assert bp.trained_on(_meta("train", 10, 20), "t.weblog.raw", 0, 15)
    assert bp.trained_on(_meta("reservoir", 10, 20), "t.weblog.raw", 0, 20)
    assert not bp.trained_on(_meta("holdout", 10, 20), "t.weblog.raw", 0, 15)  # only evaluated on
    assert not bp.trained_on(_meta("train", 10, 20), "t.weblog.raw", 1, 15)  # other partition
    assert not bp.trained_on(_meta("train", 10, 20), "t.weblog.raw", 0, 21)
    assert not bp.trained_on({}, "t.weblog.raw", 0, 15)


def test_trained_on_any_means_an_offset_at_or_after_the_regime_start_of_its_partition() -> None:
    firsts = {0: 100, 1: 50}
    assert bp.trained_on_any(_meta("train", 90, 100), "t.weblog.raw", firsts)
    assert bp.trained_on_any(_meta("reservoir", 50, 60, partition=1), "t.weblog.raw", firsts)
    assert not bp.trained_on_any(_meta("train", 90, 99), "t.weblog.raw", firsts)  # all before the shift
    assert not bp.trained_on_any(_meta("holdout", 100, 200), "t.weblog.raw", firsts)
    assert not bp.trained_on_any(_meta("train", 0, 500, partition=2), "t.weblog.raw", firsts)  # start unknown
    assert not bp.trained_on_any(_meta("train", 100, 200, topic="other"), "t.weblog.raw", firsts)


def test_first_event_role_names_the_batch_role_or_none() -> None:
    assert bp.first_event_role(_meta("holdout", 10, 20), "t.weblog.raw", 0, 10) == "holdout"
    assert bp.first_event_role(_meta("holdout", 10, 20), "t.weblog.raw", 0, 21) is None
