"""Atomic JSON checkpoints and the append-only hash journal survive torn writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.checkpoint import HashJournal, read_json, write_json
from ingest.exceptions import CheckpointError


def test_json_round_trip_and_replace(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cp.json"
    assert read_json(path) is None
    write_json(path, {"offset": 1})
    write_json(path, {"offset": 2})
    assert read_json(path) == {"offset": 2}
    assert [p.name for p in path.parent.iterdir()] == ["cp.json"]  # no temp files left


def test_corrupt_checkpoint_is_reported_not_reset(tmp_path: Path) -> None:
    path = tmp_path / "cp.json"
    path.write_text('{"offset": 1')
    with pytest.raises(CheckpointError, match="delete it"):
        read_json(path)


def test_journal_ignores_and_cuts_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "j.journal"
    j = HashJournal(path)
    j.add_many([("I", "aa"), ("P", "aa"), ("R", "bb")])
    j.close()
    with path.open("ab") as fh:
        fh.write(b"P cc")  # crash mid-append
    j = HashJournal(path)
    assert j.get("aa") == "P" and j.get("bb") == "R" and "cc" not in j
    j.add_many([("P", "dd")])
    j.close()
    assert path.read_bytes().endswith(b"R bb\nP dd\n")
    assert HashJournal(path).get("dd") == "P"
