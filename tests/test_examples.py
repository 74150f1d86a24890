"""The README's sample files work as described, and long commands report progress (silenced by --quiet)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streaming import config
from streaming.topics import dead_letter_topic, raw_topic
from streamlearn.cli import main
from tests.helpers import ROOT, read_topic

EXAMPLES = ROOT / "examples"


def cli(settings: config.Settings, *args: str) -> int:
    return main(["--home", str(settings.home), "--bootstrap", settings.bootstrap,
                 "--topic-prefix", settings.topic_prefix, *args])


def test_requests_file_is_current_and_parses() -> None:
    import sys

    from serving.client import read_requests_file

    sys.path.insert(0, str(EXAMPLES))
    try:
        from make_requests import lines
    finally:
        sys.path.remove(str(EXAMPLES))
    shipped = (EXAMPLES / "requests.jsonl").read_text().splitlines()
    assert shipped == list(lines()), "regenerate: python examples/make_requests.py > examples/requests.jsonl"
    requests = read_requests_file("digits_cnn", shipped)
    assert len(requests) == 5 and all(r["model"] == "digits_cnn" for r in requests)


def test_access_log_ingests_with_progress_and_one_dead_letter(settings: config.Settings, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    log = EXAMPLES / "access.log"
    assert cli(settings, "ingest", "weblog", str(log), "--checkpoint", str(tmp_path / "cp.json")) == 0
    captured = capsys.readouterr()
    stats = json.loads(captured.out.strip().splitlines()[-1])
    assert stats["published"] == 25 and stats["dead_lettered"] == 1
    assert f"ingest access.log: done, {log.stat().st_size:,} bytes in" in captured.err
    assert len(read_topic(settings, raw_topic(settings, "weblog"), decode=False, expect=25)) == 25
    [dead] = read_topic(settings, dead_letter_topic(settings, "weblog"), decode=False, expect=1)
    assert dead.raw.startswith(b"this line is not a log line")


def test_publish_generate_reports_progress_unless_quiet(settings: config.Settings,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(settings, "publish", "image", "--generate", "20") == 0
    assert "publish image --generate: done, 20 events in" in capsys.readouterr().err
    assert cli(settings, "--quiet", "publish", "image", "--generate", "20") == 0
    err = capsys.readouterr().err
    assert "publish image --generate" not in err
    assert cli(settings, "topics", "list") == 0  # leaves the process-wide --quiet off for later tests
