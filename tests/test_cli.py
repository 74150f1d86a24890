"""The command line: every command module imports, and flags name their env vars."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import streamlearn.commands as commands
from streamlearn.cli import build_parser
from tests.helpers import streamlearn_cmd


def test_every_command_module_imports_and_registers() -> None:
    for info in pkgutil.iter_modules(commands.__path__):
        module = importlib.import_module(f"streamlearn.commands.{info.name}")
        assert callable(getattr(module, "register", None)), info.name


def test_help_names_env_vars() -> None:
    text = build_parser().format_help()
    for var in ("STREAMLEARN_HOME", "STREAMLEARN_KAFKA_BOOTSTRAP", "STREAMLEARN_REGISTRY_URL"):
        assert var in text


def test_help_runs_without_tensorflow_import() -> None:
    out = subprocess.run(streamlearn_cmd("--help"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "publish" in out.stdout
    check = subprocess.run([sys.executable, "-c", "import sys; import streamlearn.cli as c; c.build_parser(); "
                            "print('tensorflow' in sys.modules)"], capture_output=True, text=True, timeout=60,
)
    assert check.stdout.strip() == "False", "building the CLI parser must not import tensorflow"


def _embedded_env(home: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLEARN_")}
    env.update(STREAMLEARN_HOME=str(home), STREAMLEARN_BROKER_PORT=str(port))
    return env


@pytest.mark.parametrize("argv", [("publish", "sensor", "--generate", "3"), ("subscribe", "sensor.raw", "--until-end"),
                                  ("topics", "create"), ("stream", "sensor")])
def test_a_kafka_command_says_at_once_that_the_embedded_broker_was_never_started(tmp_path: Path,
                                                                                 argv: tuple[str, ...]) -> None:
    """Before, each of these waited out kafka-python's 30 s bootstrap timeout in silence (the 20 s bound
    below failed), then printed the unreachable line."""
    from streaming.broker import free_port

    port = free_port()
    done = subprocess.run(streamlearn_cmd(*argv), env=_embedded_env(tmp_path / "home", port),
                          capture_output=True, text=True, timeout=20, check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: no Kafka broker is running at 127.0.0.1:{port}: the embedded broker of "), done.stderr[-2000:]
    assert "streamlearn broker start" in done.stderr and "Traceback" not in done.stderr


def test_only_a_never_started_embedded_broker_is_taken_as_away(tmp_path: Path) -> None:
    """A pid file, even a dead process's, means a broker ran here and may be coming back (a supervisor or
    a user restarting it after kill -9): commands wait for it as before. So for an external address, and
    for a port something listens on."""
    import socket

    from streaming.broker import EmbeddedBroker, free_port, not_started
    from streaming.config import load

    port = free_port()
    settings = load({"home": str(tmp_path / "home"), "broker_port": port})
    assert not_started(settings) is not None
    assert not_started(settings.with_(kafka_bootstrap=f"127.0.0.1:{port}")) is None
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert not_started(settings) is None
    pid_file = EmbeddedBroker(settings).pid_file
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(json.dumps({"pid": 999_999_999, "host": "127.0.0.1", "port": port}))
    assert not_started(settings) is None
