"""One input is published once, however its path is spelled and however often its command is started.

Why: checkpoints were keyed by the path as given, so ``in/../in/x.csv`` or the file through a linked
directory was another checkpoint and the file was published again; and two runs of one command (a cron
job over a slow one) both resumed from one checkpoint and both published every event. Now the key is
the directory's real path, and a run holds ``<checkpoint>.lock`` (an flock) while it goes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ingest.exceptions import SourceError
from ingest.runner import SourceRunner
from ingest.sensor_csv import SensorCsvSource, default_checkpoint_path, publish_csv
from ingest.tailer import FileTailer
from streaming.config import Settings
from streaming.producer import Publisher

NOW = int(time.time() * 1000)


def _csv(path: Path, rows: int = 5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("sensor_id,timestamp,value\n" + "".join(f"s{i},{NOW - i},{i}\n" for i in range(rows)))
    return path


def test_a_csv_named_through_dot_dot_or_a_linked_directory_is_not_published_again(settings: Settings,
                                                                                 tmp_path: Path) -> None:
    real = _csv(tmp_path / "in" / "x.csv")
    (tmp_path / "link").symlink_to(tmp_path / "in", target_is_directory=True)
    with Publisher(settings) as pub:
        assert publish_csv(settings, pub, real).published == 5
        assert publish_csv(settings, pub, tmp_path / "in" / ".." / "in" / "x.csv").published == 0
        assert publish_csv(settings, pub, tmp_path / "link" / "x.csv").published == 0
        with real.open("a") as fh:  # appended rows: resumed through another spelling, sent once
            fh.write(f"late,{NOW},9\n")
        assert publish_csv(settings, pub, tmp_path / "link" / "x.csv").published == 1
        assert publish_csv(settings, pub, real).published == 0
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "alias.csv").symlink_to(real)  # a link to the file itself: read once, same file
        assert publish_csv(settings, pub, tmp_path / "elsewhere" / "alias.csv").published == 0


def test_a_checkpoint_written_under_the_path_as_given_is_still_resumed(settings: Settings, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Before keys were canonical, a run through a linked directory kept its checkpoint under the path as
    given: the same command after the upgrade resumes it rather than publishing the file again."""
    import ingest.source as source_mod

    _csv(tmp_path / "in" / "x.csv")
    (tmp_path / "link").symlink_to(tmp_path / "in", target_is_directory=True)
    given = tmp_path / "link" / "x.csv"
    with monkeypatch.context() as old_keys:  # the earlier version: the path as given, nothing resolved
        old_keys.setattr(source_mod, "canonical_path", lambda p, whole=False: Path(p).absolute())
        legacy = default_checkpoint_path(settings, given)
        with Publisher(settings) as pub:
            assert publish_csv(settings, pub, given).published == 5
    assert legacy.exists()
    assert default_checkpoint_path(settings, given) == legacy
    assert default_checkpoint_path(settings, tmp_path / "in" / "x.csv") != legacy  # new spellings: the new key
    with Publisher(settings) as pub:
        assert publish_csv(settings, pub, given).published == 0


def test_a_second_run_of_one_input_is_refused_while_the_first_goes(settings: Settings, tmp_path: Path) -> None:
    path = _csv(tmp_path / "x.csv")
    cp = default_checkpoint_path(settings, path)
    with Publisher(settings) as pub:
        first = SourceRunner(settings, pub, lambda state: SensorCsvSource(path, resume_state=state), kind="sensor",
                             checkpoint_path=cp)
        with pytest.raises(SourceError, match=r"another run \(pid \d+\) is publishing this input now"):
            publish_csv(settings, pub, tmp_path / "." / "x.csv")
        assert first.run().published == 5
        assert publish_csv(settings, pub, path).published == 0  # the lock went with the first run


def test_a_web_log_named_another_way_resumes_and_a_drop_folder_is_watched_once(settings: Settings,
                                                                             tmp_path: Path) -> None:
    from ingest.images import ImageWatcher

    log = tmp_path / "logs" / "access.log"
    log.parent.mkdir()
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(NOW / 1000 - 5))
    log.write_text("".join(f'10.0.0.{i} - - [{stamp}] "GET /{i} HTTP/1.1" 200 5 "-" "curl/8"\n' for i in range(4)))
    (tmp_path / "link").symlink_to(tmp_path / "logs", target_is_directory=True)
    with Publisher(settings) as pub:
        assert FileTailer(settings, pub, log).run().published == 4
        assert FileTailer(settings, pub, tmp_path / "link" / "access.log").run().published == 0
        drop = tmp_path / "drop"
        drop.mkdir()
        (tmp_path / "drop-link").symlink_to(drop, target_is_directory=True)
        watcher = ImageWatcher(settings, pub, drop)
        with pytest.raises(SourceError, match="another run"):
            ImageWatcher(settings, pub, tmp_path / "drop-link")
        watcher.close()
        ImageWatcher(settings, pub, tmp_path / "drop-link").close()


def test_keyed_state_keeps_an_earlier_state_only_while_it_is_the_only_one(tmp_path: Path) -> None:
    """The rule the CSV, followed-log and drop-folder states share (``ingest.source.keyed_state``)."""
    from ingest.source import keyed_state

    def at(where: Path) -> Path:
        return tmp_path / where.name

    given, canonical = Path("/spelled/a"), Path("/real/b")
    assert keyed_state(given, canonical, at) == tmp_path / "b"  # nothing yet: the canonical key
    (tmp_path / "a").touch()
    assert keyed_state(given, canonical, at) == tmp_path / "a"  # only the earlier state: resumed
    assert keyed_state(canonical, canonical, at) == tmp_path / "b"  # spelled canonically: its own key
    (tmp_path / "b").touch()
    assert keyed_state(given, canonical, at) == tmp_path / "b"  # both: the canonical one wins
    # the drop folder proves a state by its journal, not by the base path itself
    journal = lambda base: base.with_suffix(".journal").exists()  # noqa: E731
    assert keyed_state(given, canonical, at, found=journal) == tmp_path / "b"
    (tmp_path / "a.journal").touch()
    assert keyed_state(given, canonical, at, found=journal) == tmp_path / "a"
