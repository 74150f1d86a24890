"""Command-line consistency: model/version everywhere, quiet closed pipes, dead letters with reasons."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from streaming import config
from streaming.producer import Publisher
from streaming.topics import dead_letter_topic, raw_topic
from streamlearn.cli import build_parser, main
from streamlearn.modelref import ModelRef, parse_ref
from tests.helpers import ROOT, streamlearn_cmd


def cli(settings: config.Settings, *args: str) -> int:
    return main(["--home", str(settings.home), "--bootstrap", settings.bootstrap,
                 "--topic-prefix", settings.topic_prefix, *args])


def test_one_model_version_syntax() -> None:
    assert parse_ref("digits_cnn/3") == ModelRef("digits_cnn", 3)
    assert parse_ref("digits_cnn") == ModelRef("digits_cnn", None)
    parser = build_parser()
    args = parser.parse_args(["models", "diff", "digits_cnn/3", "digits_cnn/5"])
    assert args.a == ModelRef("digits_cnn", 3) and args.b == "digits_cnn/5"
    assert parser.parse_args(["models", "promote", "digits_cnn/4"]).ref == ModelRef("digits_cnn", 4)
    assert parser.parse_args(["retrain", "--reproduce", "digits_cnn/2"]).reproduce == ModelRef("digits_cnn", 2)


@pytest.mark.parametrize("argv", [["models", "diff", "digits_cnn", "3"], ["models", "promote", "digits_cnn"],
                                  ["retrain", "--reproduce", "digits_cnn/x"], ["models", "show", "a/b/c"]])
def test_malformed_references_fail_with_the_expected_form(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "e.g. digits_cnn/3" in capsys.readouterr().err


def test_diff_refuses_two_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--home", str(tmp_path), "models", "diff", "a/1", "b/2"]) == 2
    assert "both versions must be of one model" in capsys.readouterr().err


def test_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "STREAMLEARN_HOME": str(tmp_path)}
    reg = subprocess.run(streamlearn_cmd("schemas", "register", "x-value", "WebLogEvent"), env=env, cwd=tmp_path,
                         capture_output=True, timeout=120)
    assert reg.returncode == 0, reg.stderr
    proc = subprocess.Popen(streamlearn_cmd("schemas", "show", "x-value"), env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the command writes (`... | head` that already exited)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_subscribe_shows_dead_letters_with_their_reasons(settings: config.Settings,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with Publisher(settings) as pub:
        pub.dead_letter("weblog", b"not a log line", stage="parse", error=ValueError("no request line"),
                        source={"file": "access.log", "line": 12}).get(timeout=10)
    topic = dead_letter_topic(settings, "weblog").removeprefix(settings.topic_prefix)
    assert cli(settings, "subscribe", topic, "--from-beginning", "--until-end") == 0
    out = capsys.readouterr()
    assert "stage=parse ValueError: no request line (file access.log, line 12) | 'not a log line'" in out.out
    assert "BadMagicByte" not in out.out + out.err
    assert cli(settings, "subscribe", topic, "--from-beginning", "--until-end", "--json") == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["headers"]["dl.stage"] == "parse"


def test_subscribe_dead_letter_view_escapes_terminal_control_characters(
        settings: config.Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """A dead letter's reason and source come from hostile input (a file name, a quoted value): an escape
    sequence in them used to reach the operator's terminal as one (here: retitle it, clear the screen)."""
    with Publisher(settings) as pub:
        pub.dead_letter("weblog", b"x", stage="parse", error=ValueError("bad value '\x1b[2J'"),
                        source={"file": "evil\x1b]0;pwned\x07.log", "line": 1}).get(timeout=10)
    topic = dead_letter_topic(settings, "weblog").removeprefix(settings.topic_prefix)
    assert cli(settings, "subscribe", topic, "--from-beginning", "--until-end") == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out, repr(out)
    assert "bad value '\\x1b[2J'" in out and "file evil\\x1b]0;pwned\\x07.log" in out, out


def test_subscribe_exits_1_when_records_cannot_be_decoded(settings: config.Settings,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=settings.bootstrap)
    producer.send(raw_topic(settings, "sensor"), b"plain bytes, no schema id").get(timeout=10)
    producer.close()
    topic = raw_topic(settings, "sensor").removeprefix(settings.topic_prefix)
    assert cli(settings, "subscribe", topic, "--from-beginning", "--until-end") == 1
    assert "1 could not be decoded" in capsys.readouterr().err


def test_every_flag_named_in_a_message_exists() -> None:
    """Error hints and help texts may only name flags the command line has (the demo once said --port)."""
    import argparse
    import re

    def walk(p: argparse.ArgumentParser, out: set[str]) -> None:
        for a in p._actions:
            out.update(o for o in a.option_strings if o.startswith("--"))
            if isinstance(a, argparse._SubParsersAction):
                for sp in a.choices.values():
                    walk(sp, out)

    known: set[str] = set()
    walk(build_parser(), known)
    # flags of the noida-db binary, tensorboard, `docker compose` and kafka-topics.sh
    foreign = {"--data-dir", "--kafka-port", "--logdir", "--scale", "--alter", "--partitions"}
    unknown = []
    for package in ("schemas", "streaming", "ingest", "trainer", "serving", "streamlearn"):
        for f in (ROOT / package).rglob("*.py"):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if "add_argument" in line:
                    continue
                unknown += [f"{f.relative_to(ROOT)}:{i}: {m}" for m in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", line)
                            if m not in known | foreign]
    assert unknown == []


def test_broker_port_error_names_flags_that_exist(tmp_path: Path) -> None:
    import socket

    from streaming.broker import EmbeddedBroker
    from streaming.exceptions import BrokerError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        settings = config.load({"home": tmp_path, "broker_port": busy.getsockname()[1]})
        with pytest.raises(BrokerError, match=r"--broker-port \(demo, up\), --port \(broker start\)"):
            EmbeddedBroker(settings).start()
    assert build_parser().parse_args(["demo", "--broker-port", "19999"]).broker_port == 19999
    assert build_parser().parse_args(["up", "--broker-port", "19999"]).broker_port == 19999


def test_predict_file_that_is_not_utf8_or_not_there_is_one_error_line(settings: config.Settings, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A latin-1 byte in a requests file, or a missing file, ended `predict` in a traceback."""
    latin1 = tmp_path / "requests.jsonl"
    latin1.write_bytes(b'{"features": [1, 2]}\n{"path": "/caf\xe9"}\n')
    assert cli(settings, "predict", "weblog_classifier", "--file", str(latin1), "--timeout", "1") != 0
    err = capsys.readouterr().err
    assert "line 2: not UTF-8" in err and "convert the file to UTF-8" in err and "Traceback" not in err, err
    assert cli(settings, "predict", "weblog_classifier", "--file", str(tmp_path / "nothere.jsonl")) == 2
    assert "cannot read (No such file or directory)" in capsys.readouterr().err


def test_topics_describe_of_a_named_topic_that_does_not_exist_exits_1(settings: config.Settings,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """It printed "does not exist" and exited 0, so `topics describe x && ...` went on."""
    assert cli(settings, "topics", "describe", "no_such_topic") == 1
    assert "no_such_topic: does not exist" in capsys.readouterr().out
    assert cli(settings, "topics", "describe", "no_such_topic", "--json") == 1
    assert cli(settings, "topics", "describe") == 0  # declared topics not created yet are only reported


def test_subscribe_in_a_group_refuses_until_and_a_missing_topic(settings: config.Settings,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`subscribe --group G --until-end` printed the records and then read on for ever; `--group` on a topic
    that does not exist waited in silence. Both now say so at once."""
    assert cli(settings, "subscribe", "sensor.raw", "--group", "g", "--until-end") == 2
    assert "use --idle-timeout" in capsys.readouterr().err
    assert cli(settings, "subscribe", "no_such_topic", "--group", "g") == 1
    assert "no_such_topic' does not exist" in capsys.readouterr().err


def test_offsets_topic_gets_the_tenants_prefix_like_its_group(tmp_path: Path) -> None:
    """`--tenant a offsets reset --group x --topic b.sensor.raw` committed offsets on tenant b's topic: --topic
    was used as given while --group got the prefix. It is now prefixed too, as `subscribe TOPIC` is."""
    from streamlearn.commands.stream import _group_topic

    settings = config.load({"home": tmp_path, "tenant": "a", "metrics_port": -1}, environ={})
    for action in (["show"], ["reset", "--to-earliest"]):
        args = build_parser().parse_args(["offsets", *action, "--group", "x", "--topic", "b.sensor.raw"])
        assert _group_topic(args, settings) == ("a.x", "a.b.sensor.raw")
    args = build_parser().parse_args(["offsets", "show", "--kind", "sensor"])
    assert _group_topic(args, settings)[1] == raw_topic(settings, "sensor") == "a.sensor.raw"
