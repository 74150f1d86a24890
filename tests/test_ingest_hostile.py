"""Hostile and real-world input at every ingest entry, found by an audit run of the README's commands.

Each test failed before its fix: a lone UTF-16 surrogate in gateway JSON (a 500 after the dead letter),
a UTF-8 byte-order mark (Excel's "CSV UTF-8", Windows tools) that refused a whole CSV or dead-lettered
a JSON line, a non-UTF-8 line that crashed ``publish --file``, and a log line over the tailer's limit that
became several dead letters with wrong reasons and shifted every later line number.
All over the real session broker; no sleeps.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from ingest.exceptions import SourceError
from ingest.images import ImageWatcher
from ingest.sensor_csv import MAX_ROW_BYTES, publish_csv
from ingest.tailer import MAX_LINE_BYTES, FileTailer, TailSource
from streaming.config import Settings
from streaming.eventtime import EventTimePolicy
from streaming.producer import Publisher, header_dict
from streaming.topics import dead_letter_topic
from tests.helpers import read_topic, streamlearn_cmd, subprocess_env
from tests.test_gateway_http import AUTH, client, dead_letters, png, raw_records, sensor

CLF = '10.0.0.{i} - - [17/May/2015:10:05:03 +0000] "GET /p{i} HTTP/1.1" 200 5 "-" "ua"\n'


def test_gateway_lone_surrogate_is_rejected_and_dead_lettered_not_a_500(settings: Settings) -> None:
    """JSON may spell a lone surrogate (``"\\ud800"``); UTF-8, and so Avro, cannot hold it."""
    good = sensor(1)
    body = json.dumps([{**sensor(0), "sensor_id": "s\ud800"}, good])  # ensure_ascii: "s\\ud800"
    with client(settings) as tc:
        answer = tc.post("/ingest/sensor", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert answer.status_code == 207, answer.text
    results = answer.json()["results"]
    assert [r["status"] for r in results] == ["rejected", "accepted"]
    assert results[0]["reason"] == "schema" and "sensor_id" in results[0]["error"], results[0]
    assert [r.value["sensor_id"] for r in raw_records(settings, "sensor", expect=1)] == [good["sensor_id"]]
    (letter,) = dead_letters(settings, "sensor", expect=1)
    headers = header_dict(letter.headers)
    assert headers["dl.source_index"] == "0" and headers["dl.source_reason"] == "schema", headers


def _cli(settings: Settings, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(streamlearn_cmd(*args), env=subprocess_env(settings), input=stdin, capture_output=True,
                          timeout=120, check=False)


def _reading(i: int) -> bytes:
    return json.dumps({"sensor_id": f"s{i}", "timestamp": sensor(i)["timestamp"], "value": float(i),
                       "unit": "celsius"}).encode()


def test_publish_file_keeps_going_past_latin1_bom_and_overlong_lines(settings: Settings, tmp_path: Path) -> None:
    """A BOM before line 1 is not part of the event; a latin-1 line and a line over the JSON limit are
    dead letters with their reasons (the latin-1 one used to end the run with a UnicodeDecodeError)."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _reading(0) + b"\r\n" + b'{"sensor_id": "caf\xe9"}\n' + _reading(2) + b"\n"
                     + b'{"x": "' + b"a" * 1_100_000 + b'"}\n' + _reading(4) + b"\n"
                     + _reading(6).replace(b'"s6"', b'"\\ud800"') + b"\n" + b"[" * 100 + b"\n")
    done = _cli(settings, "publish", "sensor", "--file", str(path))
    assert done.returncode == 1, done.stderr[-2000:]
    assert b"published 3 sensor events" in done.stdout and b"4 rejected" in done.stdout, done.stdout
    published = raw_records(settings, "sensor", expect=3)
    assert sorted(r.value["sensor_id"] for r in published) == ["s0", "s2", "s4"]
    dls = read_topic(settings, dead_letter_topic(settings, "sensor"), decode=False, expect=4, timeout=20)
    found = {header_dict(d.headers)["dl.source_line"]: (header_dict(d.headers)["dl.source_reason"], d.value)
             for d in dls}
    assert found["2"] == ("bad_encoding", b'{"sensor_id": "caf\xe9"}'), found["2"]
    assert found["4"][0] == "line_too_long" and found["4"][1].startswith(b'{"x": "aaa'), found["4"][0]
    assert len(found["4"][1]) <= 64 * 1024
    assert found["6"][0] == "schema", found["6"]
    assert found["7"][0] == "bad_json", found["7"]  # bounded_json's refusal, not the class name
    assert len(dls) == 4


def test_sensor_csv_with_a_byte_order_mark_is_published(settings: Settings, tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a BOM; it used to be read into the first column's name, so the
    header 'lacked sensor_id' and the whole file was refused."""
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfsensor_id,timestamp,value,unit\r\n"
                     b"s1,2024-01-01T00:00:00Z,1.5,celsius\r\ns2,2024-01-01T00:01:00+02:00,2,celsius\r\n")
    with Publisher(settings) as pub:
        stats = publish_csv(settings, pub, path)
    assert (stats.published, stats.dead_lettered) == (2, 0)
    assert sorted(r.value["sensor_id"] for r in raw_records(settings, "sensor", expect=2)) == ["s1", "s2"]


def test_utf16_and_empty_sensor_csvs_say_what_they_are(settings: Settings, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Excel's "Unicode Text" was refused as "header lacks ['sensor_id', ...]"; an empty or header-only file,
    on its first run, said it "was published to its end by an earlier run"."""
    utf16 = tmp_path / "unicode.csv"
    utf16.write_bytes("sensor_id,timestamp,value\ns1,2024-01-01T00:00:00Z,1.5\n".encode("utf-16"))
    with Publisher(settings) as pub:
        with pytest.raises(SourceError, match="UTF-16 text .* iconv -f UTF-16 -t UTF-8"):
            publish_csv(settings, pub, utf16)
        for name, text in (("empty.csv", ""), ("header.csv", "sensor_id,timestamp,value\n")):
            caplog.clear()
            (tmp_path / name).write_text(text)
            assert publish_csv(settings, pub, tmp_path / name).published == 0
            assert f"{name} has no rows" in caplog.text and "earlier run" not in caplog.text, caplog.text
            caplog.clear()
            publish_csv(settings, pub, tmp_path / name)  # the same command again: now it was an earlier run
            assert "earlier run" in caplog.text, caplog.text


def test_tailer_over_long_line_is_one_dead_letter_and_later_line_numbers_stay_true(settings: Settings,
                                                                                   tmp_path: Path) -> None:
    """A 3 MB line used to become one dead letter per chunk read (the later ones 'not_combined_format',
    their bytes read as lines of their own), shifting the line number of every later dead letter."""
    long_line = CLF.format(i=2).replace("/p2", "/" + "a" * 3_000_000).encode()
    log = tmp_path / "access.log"
    log.write_bytes(CLF.format(i=1).encode() + long_line + CLF.format(i=3).encode() + b"garbage\n"
                    + CLF.format(i=5).encode().rstrip(b"\n"))
    with Publisher(settings) as pub:
        stats = FileTailer(settings, pub, log).run()
    assert (stats.lines, stats.published, stats.dead_lettered) == (5, 3, 2), stats
    dls = read_topic(settings, dead_letter_topic(settings, "weblog"), decode=False, expect=2, timeout=20)
    found = {header_dict(d.headers)["dl.source_line"]: header_dict(d.headers)["dl.source_reason"] for d in dls}
    assert found == {"2": "line_too_long", "4": "not_combined_format"}, found
    assert sorted(r.value["path"] for r in raw_records(settings, "weblog", expect=3)) == ["/p1", "/p3", "/p5"]

    # A checkpoint taken while the rest of the long line was being skipped resumes skipping it.
    first = CLF.format(i=1).encode()
    state = {"path": str(log.absolute()), "inode": log.stat().st_ino, "file": str(log.absolute()),
             "fingerprint": hashlib.sha1(first).hexdigest(), "offset": len(first) + MAX_LINE_BYTES + 10,
             "line": 2, "skipping": True}
    source = TailSource(log, resume_state=state)
    items = source.next_batch() + source.next_batch()
    source.close()
    assert [(it.source["line"], it.record is not None) for it in items] == [("3", True), ("4", False), ("5", True)]


def test_tailer_log_starting_with_a_byte_order_mark(settings: Settings, tmp_path: Path) -> None:
    """A log saved by a Windows editor starts with a BOM: it was read into the first client address
    ("\\ufeff10.0.0.1"), and a JSON-lines log lost its first line as 'bad_json'."""
    clf, jsonl = tmp_path / "clf.log", tmp_path / "json.log"
    clf.write_bytes(b"\xef\xbb\xbf" + CLF.format(i=1).encode() + CLF.format(i=2).encode())
    event = {"remote_addr": "10.0.0.3", "time": "2024-01-01T00:00:00Z", "request": "GET /p3 HTTP/1.1",
             "status": 200}
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(event).encode() + b"\r\n")
    with Publisher(settings) as pub:
        for log in (clf, jsonl):
            stats = FileTailer(settings, pub, log).run()
            assert stats.dead_lettered == 0, stats
    published = raw_records(settings, "weblog", expect=3)
    assert sorted((r.value["client_ip"], r.value["path"]) for r in published) == [
        ("10.0.0.1", "/p1"), ("10.0.0.2", "/p2"), ("10.0.0.3", "/p3")]


def test_sensor_csv_over_long_row_is_read_in_bounded_pieces(settings: Settings, tmp_path: Path) -> None:
    """A row longer than MAX_ROW_BYTES is one dead letter (its head) and the next row is published; it
    used to be read whole (a 300 MB row held about 2.2 GB: `ingest sensors --csv`, /usr/bin/time -v)."""
    path = tmp_path / "wide.csv"
    path.write_bytes(b"sensor_id,timestamp,value,unit\ns1,2024-01-01T00:00:00Z,1,c\ns2,2024-01-01T00:00:00Z,"
                     + b"9" * (MAX_ROW_BYTES + 5000) + b",c\ns3,2024-01-01T00:00:00Z,3,c\n")
    with Publisher(settings) as pub:
        stats = publish_csv(settings, pub, path)
    assert (stats.published, stats.dead_lettered, stats.reasons) == (2, 1, {"row_too_long": 1}), stats
    (letter,) = read_topic(settings, dead_letter_topic(settings, "sensor"), decode=False, expect=1, timeout=20)
    assert header_dict(letter.headers)["dl.source_line"] == "3"
    assert letter.value.startswith(b"s2,2024-01-01T00:00:00Z,999") and len(letter.value) <= 64 * 1024
    assert sorted(r.value["sensor_id"] for r in raw_records(settings, "sensor", expect=2)) == ["s1", "s3"]


def test_gateway_compressed_body_is_415_naming_the_encoding(settings: Settings) -> None:
    """Bodies are not decompressed; a gzip body was answered 400 'not valid UTF-8 JSON', and dead-lettered."""
    body = gzip.compress(json.dumps(sensor(0)).encode())
    with client(settings) as tc:
        answer = tc.post("/ingest/sensor", content=body, headers={**AUTH, "Content-Type": "application/json",
                                                                  "Content-Encoding": "gzip"})
        plain = tc.post("/ingest/sensor", json=sensor(1), headers={**AUTH, "Content-Encoding": "identity"})
    assert answer.status_code == 415 and "Content-Encoding 'gzip'" in answer.json()["error"], answer.text
    assert plain.status_code == 200, plain.text


def _ids(log: Path, chunk_bytes: int) -> list[tuple[str, str]]:
    source, out = TailSource(log, chunk_bytes=chunk_bytes), []
    try:
        while True:
            out += [(it.event_id, it.source.get("line", "")) for it in source.next_batch() if it.event_id]
    except StopIteration:
        source.close()
    return out


def test_tailer_reads_past_the_nul_hole_of_a_copytruncate_rotation(settings: Settings, tmp_path: Path) -> None:
    """logrotate's copytruncate with a writer that does not append leaves the file reading as NUL bytes
    up to the writer's old offset. The line after the hole was dead-lettered (a hole over 256 KiB lost
    it inside a line_too_long dead letter); NUL runs before a line are now skipped, not lines."""
    log = tmp_path / "access.log"
    log.write_bytes(b"\x00" * 1000 + CLF.format(i=1).encode() + b"\x00" * 600_000 + CLF.format(i=2).encode()
                    + CLF.format(i=3).encode() + b"\x00" * 10)
    with Publisher(settings) as pub:
        stats = FileTailer(settings, pub, log).run()
    assert (stats.published, stats.dead_lettered) == (3, 0), stats
    assert sorted(r.value["path"] for r in raw_records(settings, "weblog", expect=3)) == ["/p1", "/p2", "/p3"]
    assert _ids(log, 4096) == _ids(log, 1 << 20)  # where a read ends does not move a line's id


def test_weblog_backfill_after_a_live_run_publishes_the_history_it_refused(settings: Settings,
                                                                           tmp_path: Path) -> None:
    """The live run's dead letters say 'load history on purpose with --backfill'; that run then resumed
    at the live run's checkpoint (the end of the file) and published nothing."""
    log = tmp_path / "old.log"
    log.write_bytes("".join(CLF.format(i=i).replace("2015", "1999") for i in (1, 2)).encode())
    with Publisher(settings) as pub:
        live = FileTailer(settings, pub, log).run()
        assert (live.published, live.dead_lettered) == (0, 2), live
        backfill = EventTimePolicy(max_age_ms=None, backfill=True, run_id="audit-1")
        history = FileTailer(settings, pub, log, policy=backfill).run()
        again = FileTailer(settings, pub, log, policy=EventTimePolicy(max_age_ms=None, backfill=True,
                                                                     run_id="audit-2")).run()
    assert (history.published, history.dead_lettered) == (2, 0), history
    assert (again.published, again.lines) == (0, 0), again  # the same backfill command again: nothing new
    published = raw_records(settings, "weblog", expect=2)
    assert sorted(header_dict(r.headers)["sl.backfill"] for r in published) == ["audit-1", "audit-1"]


def test_image_rejected_for_its_old_file_time_is_published_when_put_back_with_backfill(
        settings: Settings, tmp_path: Path) -> None:
    """Its reason file says 'load history on purpose with --backfill'; doing so moved it back to
    rejected/ as 'rejected_earlier' (the journal's verdict of the live run), publishing nothing."""
    watch = tmp_path / "in"
    watch.mkdir()
    photo = watch / "scan_1999.png"
    photo.write_bytes(png(shade=99))
    os.utime(photo, (915148800, 915148800))  # 1999-01-01: older than the live window of 20 years

    def run(policy: EventTimePolicy | None = None) -> tuple[int, int]:
        with Publisher(settings) as pub:
            watcher = ImageWatcher(settings, pub, watch, settle_s=0.0, policy=policy)
            watcher.run(follow=False)
            watcher.close()
        return watcher.published, watcher.rejected_count

    assert run() == (0, 1)
    assert (watch / "rejected" / "scan_1999.png.reason").read_text().startswith("timestamp_too_old")
    os.replace(watch / "rejected" / "scan_1999.png", photo)
    assert run(EventTimePolicy(max_age_ms=None, backfill=True, run_id="photos")) == (1, 0)
    assert (watch / "processed" / "scan_1999.png").exists()
    (record,) = raw_records(settings, "image", expect=1)
    assert record.value["data"] == png(shade=99) and header_dict(record.headers)["sl.backfill"] == "photos"
    assert run() == (0, 0)  # nothing left; the same file again would be a duplicate (journal: published)


def test_sensor_csv_with_a_column_named_twice_is_refused_before_any_row(settings: Settings,
                                                                        tmp_path: Path) -> None:
    """Each row kept only the last of the two cells: the other reading was dropped without a word."""
    path = tmp_path / "twice.csv"
    path.write_bytes(b"sensor_id,timestamp,value,unit,temp,temp\ns1,2024-01-01T00:00:00Z,1,c,5,6\n")
    with Publisher(settings) as pub, pytest.raises(SourceError, match=r"\['temp'\] more than once"):
        publish_csv(settings, pub, path)


def test_sensor_csv_of_an_endless_file_is_refused_at_its_header(settings: Settings, tmp_path: Path) -> None:
    """``--csv /dev/zero``: the header was read past its 1 MiB bound to its newline, which never comes
    (before bounded reads: until memory ran out). A device is now refused before any read (not a regular
    file); a regular file whose first line is over the bound is refused at its header, read no further.
    On a regression this test hangs until --timeout."""
    with Publisher(settings) as pub, pytest.raises(SourceError, match="is not a regular file"):
        publish_csv(settings, pub, Path("/dev/zero"))
    wide = tmp_path / "no_newline.csv"
    wide.write_bytes(b"sensor_id," * (MAX_ROW_BYTES // 5))
    with Publisher(settings) as pub, pytest.raises(SourceError, match="header line is over"):
        publish_csv(settings, pub, wide)


def test_sensor_csv_semicolon_and_tab_separated_exports_are_read(settings: Settings, tmp_path: Path) -> None:
    """Excel writes ';' with decimal commas where ',' is the decimal mark; such a file was refused as
    'header lacks [sensor_id, timestamp, value]'. Thousands dots before a decimal comma (1.234,5) are read
    too (they were a not_a_number dead letter: unambiguous, and what German Excel writes)."""
    semi, tab = tmp_path / "excel_de.csv", tmp_path / "export.tsv"
    semi.write_bytes(b"sensor_id;timestamp;value;unit;humidity\r\ns1;2024-01-01T00:00:00Z;1,5;c;0,25\r\n"
                     b"s2;2024-01-01T00:00:00Z;1.234,5;c;1\r\n")
    tab.write_bytes(b"sensor_id\ttimestamp\tvalue\tunit\ns3\t2024-01-01T00:00:00Z\t-7.5\tc\n")
    with Publisher(settings) as pub:
        semi_stats, tab_stats = publish_csv(settings, pub, semi), publish_csv(settings, pub, tab)
    assert (semi_stats.published, semi_stats.dead_lettered) == (2, 0), semi_stats
    assert (tab_stats.published, tab_stats.dead_lettered) == (1, 0), tab_stats
    got = {r.value["sensor_id"]: (r.value["value"], r.value["values"]) for r in raw_records(settings, "sensor", 3)}
    assert got == {"s1": (1.5, {"humidity": 0.25}), "s2": (1234.5, {"humidity": 1.0}), "s3": (-7.5, {})}


def test_files_with_latin1_names_are_published_with_escaped_names(settings: Settings, tmp_path: Path) -> None:
    """A name that is not UTF-8 (an old share's latin-1) reaches Python as lone surrogates. The image
    watcher crashed on every start (UnicodeEncodeError out of the Avro writer) and the log tailer before
    its first line (hashing the checkpoint path)."""
    watch = tmp_path / "in"
    watch.mkdir()
    image = os.fsdecode(os.fsencode(watch) + b"/caf\xe9_3.png")
    Path(image).write_bytes(png(shade=3))
    log = Path(os.fsdecode(os.fsencode(tmp_path) + b"/acc\xe8s.log"))
    log.write_bytes(CLF.format(i=1).encode())
    with Publisher(settings) as pub:
        watcher = ImageWatcher(settings, pub, watch, settle_s=0.0)
        watcher.run(follow=False)
        watcher.close()
        tailed = FileTailer(settings, pub, log).run()
    assert (watcher.published, watcher.rejected_count) == (1, 0)
    assert (tailed.published, tailed.dead_lettered) == (1, 0), tailed
    (picture,) = raw_records(settings, "image", expect=1)
    assert (picture.value["source"], picture.value["label"]) == ("caf\\xe9_3.png", "caf\\xe9")
    (line,) = raw_records(settings, "weblog", expect=1)
    assert line.value["source"].endswith("/acc\\xe8s.log"), line.value["source"]


def test_nginx_and_apache_logs_with_fields_after_the_request_time(settings: Settings, tmp_path: Path) -> None:
    """nginx's '$request_time $upstream_response_time', its rt=/uct= timing format and Apache's combinedio
    ('%I %O') put fields after the agent; every such line was dead-lettered as not_combined_format."""
    agent = '"-" "Mozilla/5.0 (X11; Linux x86_64)"'
    lines = [CLF.format(i=i).replace('"-" "ua"', agent).rstrip("\n") + tail + "\n" for i, tail in enumerate(
        [" 0.005 0.004", " 0.250 -", ' rt=0.005 uct="0.001" uht="0.002" urt="0.003"', " 512 1024"], 1)]
    lines.append(CLF.format(i=5).replace('"ua"', '"ua"x'))  # a broken quote still fails the line
    log = tmp_path / "nginx.log"
    log.write_bytes("".join(lines).encode())
    with Publisher(settings) as pub:
        stats = FileTailer(settings, pub, log).run()
    assert (stats.published, stats.dead_lettered) == (4, 1), stats
    got = {r.value["path"]: (r.value["latency_ms"], r.value["user_agent"])
           for r in raw_records(settings, "weblog", expect=4)}
    assert got == {"/p1": (5.0, "Mozilla/5.0 (X11; Linux x86_64)"), "/p2": (250.0, "Mozilla/5.0 (X11; Linux x86_64)"),
                   "/p3": (None, "Mozilla/5.0 (X11; Linux x86_64)"), "/p4": (None, "Mozilla/5.0 (X11; Linux x86_64)")}


def test_drop_folder_names_what_it_cannot_take_instead_of_ignoring_it(settings: Settings, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A link to /dev/zero, a dangling link and a FIFO are never read (reading /dev/zero never ends); they
    were skipped without a word, so a user saw 'published 0, rejected 0' and no reason anywhere."""
    watch = tmp_path / "in"
    watch.mkdir()
    (watch / "zero.png").symlink_to("/dev/zero")
    (watch / "gone.png").symlink_to(tmp_path / "nothing-here.png")
    os.mkfifo(watch / "pipe.png")
    (watch / "ok.png").write_bytes(png(shade=5))
    with Publisher(settings) as pub, caplog.at_level("WARNING", logger="ingest.images"):
        watcher = ImageWatcher(settings, pub, watch, settle_s=0.0)
        watcher.run(follow=False)
        watcher.close()
    assert (watcher.published, watcher.rejected_count) == (1, 0)
    named = sorted(Path(r.args[0]).name for r in caplog.records if "not a regular file" in r.getMessage())
    assert named == ["gone.png", "pipe.png", "zero.png"], caplog.text
    assert (watch / "zero.png").is_symlink() and (watch / "pipe.png").exists()


def test_drop_folder_does_not_read_a_link_to_a_file_outside_it(settings: Settings, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Whoever can write the drop folder could link any file this process can read into it; it was read,
    and, not being an image, its bytes went to the dead-letter topic. A link to an image inside the folder
    is still taken."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"SECRET-TOKEN-0123456789")
    watch = tmp_path / "in"
    (watch / "sub").mkdir(parents=True)
    (watch / "leak.png").symlink_to(secret)
    (watch / "sub" / "inner.png").write_bytes(png(shade=7))
    (watch / "alias.png").symlink_to(watch / "sub" / "inner.png")
    with Publisher(settings) as pub, caplog.at_level("WARNING", logger="ingest.images"):
        watcher = ImageWatcher(settings, pub, watch, settle_s=0.0)
        watcher.run(follow=False)
        watcher.close()
    assert (watcher.published, watcher.rejected_count) == (1, 0)  # alias.png only
    assert any("leak.png is a link to a file outside the drop folder" in r.getMessage() for r in caplog.records)
    assert (watch / "leak.png").is_symlink() and secret.read_bytes() == b"SECRET-TOKEN-0123456789"
    dead = read_topic(settings, dead_letter_topic(settings, "image"), decode=False, idle_timeout=0.5)
    assert not any(b"SECRET-TOKEN" in bytes(r.value or b"") for r in dead)


def test_a_compressed_log_or_csv_is_refused_with_what_to_do(settings: Settings, tmp_path: Path) -> None:
    """A rotated log is usually access.log.2.gz: read as text it became one not_combined_format dead
    letter per random newline in the compressed bytes, published nothing, and the run said nothing."""
    log, table = tmp_path / "access.log.2.gz", tmp_path / "readings.csv.gz"
    log.write_bytes(gzip.compress("".join(CLF.format(i=i) for i in range(200)).encode()))
    table.write_bytes(gzip.compress(b"sensor_id,timestamp,value\ns1,2024-01-01T00:00:00Z,1\n"))
    with Publisher(settings) as pub:
        with pytest.raises(SourceError, match=r"access.log.2.gz is gzip-compressed.*zcat"):
            FileTailer(settings, pub, log).run()
        with pytest.raises(SourceError, match=r"readings.csv.gz is gzip-compressed"):
            publish_csv(settings, pub, table)
    events = tmp_path / "events.jsonl.gz"
    events.write_bytes(gzip.compress(_reading(1) + b"\n"))
    done = _cli(settings, "publish", "sensor", "--file", str(events))
    assert done.returncode != 0 and b"events.jsonl.gz is gzip-compressed" in done.stderr, done.stderr[-2000:]
    assert read_topic(settings, dead_letter_topic(settings, "sensor"), decode=False, idle_timeout=0.5) == []


def test_a_key_given_twice_in_json_is_refused_at_every_json_entry(settings: Settings, tmp_path: Path) -> None:
    """``{"value": 1, "value": "x"}``: Python kept the last value silently, other parsers (a proxy, a
    validator in front of us) the first. A line is one dead letter naming the key; a body is a 400."""
    path = tmp_path / "dup.jsonl"
    line = _reading(1).replace(b'"value": 1.0', b'"value": 1.0, "value": 99.0')
    path.write_bytes(_reading(0) + b"\n" + line + b"\n")
    done = _cli(settings, "publish", "sensor", "--file", str(path))
    assert b"published 1 sensor events" in done.stdout and b"1 rejected" in done.stdout, done.stdout
    assert b"line 2: rejected (bad_json)" in done.stderr and b"key 'value' appears more than once" in done.stderr
    with client(settings) as tc:
        answer = tc.post("/ingest/sensor", content=json.dumps([sensor(0)])[:-2] + ', "unit": "K"}]',
                         headers={**AUTH, "Content-Type": "application/json"})
    assert answer.status_code == 400 and "key 'unit' appears more than once" in answer.text, answer.text


def test_gateway_publishes_a_bmp_upload_and_a_base64_tiff_as_png(settings: Settings) -> None:
    """The gateway takes the drop folder's formats: a still BMP/TIFF/GIF/WebP/ICO/AVIF/HEIC is converted to
    PNG (each was refused as unsupported_format); an animated GIF keeps its reason."""
    import base64
    import io

    from PIL import Image

    def saved(fmt: str, frames: int = 1, shade: int = 40) -> bytes:  # same pixels: same PNG, a duplicate
        imgs = [Image.new("L", (9, 7), color=shade * (i + 1)) for i in range(frames)]
        buf = io.BytesIO()
        imgs[0].save(buf, format=fmt, save_all=frames > 1, append_images=imgs[1:])
        return buf.getvalue()

    from pillow_heif import register_heif_opener

    register_heif_opener()
    phone = Image.new("RGB", (9, 7), color=(10, 120, 200))
    heic = io.BytesIO()
    phone.save(heic, format="HEIF")  # an iPhone's default photo format
    files = [("files", ("scan.bmp", saved("BMP"), "image/bmp")),
             ("files", ("moving.gif", saved("GIF", 3), "image/gif")),
             ("files", ("IMG_0001.HEIC", heic.getvalue(), "image/heic"))]
    with client(settings) as tc:
        upload = tc.post("/ingest/images", files=files, headers=AUTH)
        tiff = base64.b64encode(saved("TIFF", shade=90)).decode()
        body = tc.post("/ingest/image", json={"data": tiff, "source": "fax"}, headers=AUTH)
    assert [r["status"] for r in upload.json()["results"]] == ["accepted", "rejected", "accepted"], upload.text
    assert upload.json()["results"][1]["reason"] == "animated"
    assert body.status_code in (200, 201, 202), body.text
    records = raw_records(settings, "image", expect=3)
    assert sorted(r.value["source"] for r in records) == ["fax", "gateway:IMG_0001.HEIC", "gateway:scan.bmp"]
    for r in records:
        assert r.value["content_type"] == "PNG" and bytes(r.value["data"]).startswith(b"\x89PNG")
        assert (r.value["width"], r.value["height"]) == (9, 7)


def test_gateway_publishes_a_phone_photo_over_a_kafka_record_scaled_down(settings: Settings) -> None:
    """A 2-5 MB phone JPEG posted as base64 JSON (declaring its own size) or uploaded was refused: a Kafka
    record holds ~1 MB. It is published halved until it fits; the declared original size is accepted."""
    import base64

    from tests.test_ingest_dropfolder import _phone_photo

    photo = _phone_photo("JPEG", (2400, 1800))
    assert len(photo) > 1_000_000
    with client(settings) as tc:
        body = tc.post("/ingest/image", json={"data": base64.b64encode(photo).decode(), "source": "phone",
                                              "width": 2400, "height": 1800, "content_type": "JPEG"}, headers=AUTH)
        upload = tc.post("/ingest/images", files=[("files", ("IMG_2.JPG", photo, "image/jpeg"))], headers=AUTH)
        wrong = tc.post("/ingest/image", json={"data": base64.b64encode(photo).decode(), "width": 2000},
                        headers=AUTH)
    assert body.status_code in (200, 201, 202), body.text
    # the same photo scales to the same bytes, so the same event id: the upload is the JSON event's duplicate
    assert [r["status"] for r in upload.json()["results"]] == ["duplicate"], upload.text
    assert wrong.status_code == 422 and "width 2000 does not match the image bytes (1200)" in wrong.text, wrong.text
    records = raw_records(settings, "image", expect=1)  # the same published bytes twice: one event
    assert [(r.value["content_type"], r.value["width"], r.value["height"]) for r in records] == [("JPEG", 1200, 900)]
    assert len(bytes(records[0].value["data"])) <= 900_000


def test_sensor_csv_with_classic_mac_line_ends_is_published_row_by_row_and_resumes(settings: Settings,
                                                                                  tmp_path: Path) -> None:
    """Excel for Mac's "CSV (Macintosh)" ends lines with a lone '\\r'. Read on '\\n' the whole file was its
    header line: nothing was published and the run exited 0. Appended rows must resume after the last
    one (the checkpoint's identity is the header, not the file read as one line)."""
    import time

    now = int(time.time() * 1000)
    path = tmp_path / "mac.csv"
    path.write_bytes(b"sensor_id,timestamp,value\r" + b"".join(
        f"s{i % 3},{now - i},{i}\r".encode() for i in range(2500)))
    with Publisher(settings) as pub:
        first = publish_csv(settings, pub, path, batch_rows=1000)
    assert (first.published, first.dead_lettered) == (2500, 0), first
    with path.open("ab") as fh:
        fh.write(b"".join(f"t{i},{now},{i}\r".encode() for i in range(7)))
    with Publisher(settings) as pub:
        second = publish_csv(settings, pub, path, batch_rows=1000)
    assert (second.published, second.dead_lettered, second.from_line) == (7, 0, 2502), second
    values = [r.value["value"] for r in raw_records(settings, "sensor", expect=2507)]
    assert sorted(values) == sorted([float(i) for i in range(2500)] + [float(i) for i in range(7)])


def test_sensor_csv_rewritten_in_place_under_the_same_header_is_read_from_its_start(settings: Settings,
                                                                                   tmp_path: Path) -> None:
    """A logger that truncates its CSV and writes it again keeps the inode and the header line (the
    fingerprint), and the new content soon passes the old offset: the next run resumed there, mid-row of
    the new content, and lost every row before it. The bytes before the saved offset tell."""
    import time

    now = int(time.time() * 1000)
    path = tmp_path / "logger.csv"
    path.write_text("sensor_id,timestamp,value\n" + "".join(f"a{i},{now - i},{i}\n" for i in range(30)))
    inode = path.stat().st_ino
    with Publisher(settings) as pub:
        assert publish_csv(settings, pub, path).published == 30
    with path.open("r+b") as fh:  # in place: same inode, same header
        fh.truncate(0)
        fh.write(("sensor_id,timestamp,value\n" + "".join(f"b{i},{now - i},{100 + i}\n" for i in range(40))).encode())
    assert path.stat().st_ino == inode
    with Publisher(settings) as pub:
        again = publish_csv(settings, pub, path)
    assert (again.published, again.from_line) == (40, 2), again
    ids = sorted(r.value["sensor_id"] for r in raw_records(settings, "sensor", expect=70))
    assert ids == sorted([f"a{i}" for i in range(30)] + [f"b{i}" for i in range(40)])


@pytest.mark.parametrize("body", [
    b"sensor_id,timestamp,value\ra,{t},1\nb,{t},2\nc,{t},3\rd,{t},4\r",  # lone CR header, then LF and CR rows
    b"sensor_id,timestamp,value\ra,{t},1\rb,{t},2\r\nc,{t},3\rd,{t},4\r",  # a CRLF row among CR rows
    b"sensor_id,timestamp,value\r\na,{t},1\rb,{t},2\rc,{t},3\rd,{t},4\r",  # CRLF header, CR rows
    b"sensor_id,timestamp,value\na,{t},1\rb,{t},2\rc,{t},3\nd,{t},4\n",  # lone CRs inside LF lines
])
def test_sensor_csv_with_mixed_line_ends_gives_every_row_its_own_id(body: bytes, tmp_path: Path) -> None:
    """Mixed line ends lost rows silently (b and c of the first file), read a CRLF-headed CR file as one
    over-long row, or gave rows split inside one LF line a single event id (so a restart's read-back could
    take them for sent). Every row is now its own line, offset and id."""
    import time

    from ingest.sensor_csv import SensorCsvSource

    path = tmp_path / "mixed.csv"
    path.write_bytes(body.replace(b"{t}", str(int(time.time() * 1000)).encode()))
    src, items = SensorCsvSource(path), []
    with pytest.raises(StopIteration):
        while True:
            items += src.next_batch()
    assert [it.record["sensor_id"] for it in items if it.record] == ["a", "b", "c", "d"], \
        [(it.raw, it.error) for it in items]
    assert len({it.event_id for it in items}) == 4


def test_a_file_run_that_refuses_every_record_exits_1_and_one_that_refuses_some_exits_0(settings: Settings,
                                                                                      tmp_path: Path) -> None:
    """1970s readings without --backfill, all dead-lettered, and a log all outside --max-age exited 0: a
    script carried on as if the load had worked. Some refused among published is still 0."""
    old = tmp_path / "old.csv"
    old.write_text("sensor_id,timestamp,value\n" + "".join(f"s{i},{80_000_000 + i * 60},{i}\n" for i in range(5)))
    done = subprocess.run(streamlearn_cmd("ingest", "sensors", "--csv", str(old), "--timestamp-unit", "s"),
                          env=subprocess_env(settings), capture_output=True, timeout=120)
    summary = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert done.returncode == 1 and (summary["published"], summary["dead_lettered"]) == (0, 5), done.stderr
    assert b"every record read was refused" in done.stderr and b"timestamp_too_old x5" in done.stderr
    log = tmp_path / "mixed.log"
    now = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(time.time() - 5))
    log.write_text(f'10.0.0.1 - - [{now}] "GET / HTTP/1.1" 200 5 "-" "curl/8"\nnot a log line\n')
    done = subprocess.run(streamlearn_cmd("ingest", "weblog", str(log)), env=subprocess_env(settings),
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_wide_csv_column_without_a_reading_is_reported(settings: Settings, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A wide export whose ``temp_2`` column is all empty (an unplugged or misspelt sensor) published the
    other column and said nothing of it; it is now named in the run's summary and a warning."""
    now = int(time.time() * 1000)
    path = tmp_path / "wide_gap.csv"
    path.write_text("time,temp_1,temp_2\n" + "".join(f"{now - i * 1000},{20 + i},{m}\n"
                                                     for i, m in enumerate(["", "NA", ""])))
    with Publisher(settings) as pub, caplog.at_level("WARNING", logger="ingest.sensor_csv"):
        stats = publish_csv(settings, pub, path)
        assert (stats.published, stats.empty_columns) == (3, ["temp_2"]), stats
        assert "['temp_2'] had no reading" in caplog.text
        assert publish_csv(settings, pub, path).empty_columns is None  # nothing read: nothing to say


def test_a_file_name_too_long_for_a_checkpoint_name_gets_a_shortened_one(tmp_path: Path) -> None:
    """`ingest sensors --csv <240 characters>.csv` ended in a "File name too long" traceback: the checkpoint
    (and its .lock) carry the file's name. Names that fit keep the checkpoint name they always had."""
    from ingest.sensor_csv import default_checkpoint_path
    from ingest.tailer import default_checkpoint_path as weblog_checkpoint
    from streaming import config

    settings = config.load({"home": tmp_path / "home", "metrics_port": -1})
    long_csv = tmp_path / ("s" * 240 + ".csv")
    long_csv.write_text("sensor_id,timestamp,value\n")
    for cp in (default_checkpoint_path(settings, long_csv), weblog_checkpoint(settings, long_csv)):
        cp.parent.mkdir(parents=True, exist_ok=True)
        for name in (cp.name + ".lock", f".{cp.name}.compact"):
            (cp.parent / name).write_text("")  # no "File name too long"
    short = tmp_path / "plain.csv"
    assert default_checkpoint_path(settings, short).name.startswith("plain.csv.")
