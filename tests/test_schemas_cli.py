"""`streamlearn schemas ...` and `streamlearn registry serve` end to end (no broker needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from schemas import catalog
from schemas.exceptions import RegistryUnavailableError
from schemas.http_client import HttpRegistryClient
from schemas.registry import FileRegistry
from streaming import config
from streaming.broker import free_port
from streaming.topics import raw_topic
from streamlearn.cli import main
from streamlearn.commands.schemas import register_builtin
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("STREAMLEARN_REGISTRY_URL", "STREAMLEARN_HOME", "STREAMLEARN_TOPIC_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


def _run(home: Path, *argv: str) -> int:
    return main(["--home", str(home), *argv])


def test_register_show_list_check(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(home, "schemas", "register", "s-value", "SensorReading") == 0
    assert capsys.readouterr().out.strip() == "1"
    v2 = catalog.load_schema("SensorReading")
    v2["fields"].append({"name": "site", "type": "string"})  # no default: not BACKWARD compatible
    path = tmp_path / "v2.avsc"
    path.write_text(json.dumps(v2))
    assert _run(home, "schemas", "check", "s-value", str(path)) == 1
    out = capsys.readouterr().out
    assert "incompatible with s-value (BACKWARD)" in out
    assert "reader field 'site' of SensorReading has no default" in out
    assert _run(home, "schemas", "register", "s-value", str(path)) == 1
    assert "incompatible" in capsys.readouterr().err
    assert _run(home, "schemas", "list") == 0
    assert capsys.readouterr().out.split("\t")[:3] == ["s-value", "version=1", "id=1"]
    assert _run(home, "schemas", "show", "s-value", "--version", "1") == 0
    shown = capsys.readouterr().out
    assert shown.startswith("# subject=s-value version=1 id=1")
    assert json.loads(shown.split("\n", 1)[1]) == catalog.load_schema("SensorReading")
    assert _run(home, "schemas", "show", "nope") == 1
    assert "Subject 'nope' not found" in capsys.readouterr().err
    assert _run(home, "schemas", "register", "x", "NoSuchFile.avsc") == 1
    assert "neither an existing .avsc file nor a built-in schema" in capsys.readouterr().err
    primitive = tmp_path / "p.avsc"
    primitive.write_text('"string"')
    assert _run(home, "schemas", "register", "p-value", str(primitive)) == 0
    capsys.readouterr()
    assert _run(home, "schemas", "list") == 0
    listed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [row[-1] for row in listed if row[0] == "p-value"] == ["string"], listed  # was shown as "union"


def test_register_builtin_is_idempotent(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = config.load({"home": home, "topic_prefix": "p."})
    registry = FileRegistry(settings.registry_dir)
    first = register_builtin(registry, settings)
    assert register_builtin(registry, settings) == first
    subject = catalog.value_subject(raw_topic(settings, "sensor"))
    assert json.loads(registry.latest(subject).schema) == catalog.load_schema("SensorReading")
    assert not any("deadletter" in s for s in first)  # dead letters keep original bytes
    assert _run(home, "--topic-prefix", "p.", "schemas", "register-builtin") == 0
    assert f"{subject}\tid={first[subject]}" in capsys.readouterr().out


def test_registry_serve_answers_confluent_clients(home: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLEARN_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlearn.cli", "--home", str(home), "registry", "serve", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        client = HttpRegistryClient(f"http://127.0.0.1:{port}", timeout=2)

        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                return client.subjects() == []
            except RegistryUnavailableError:
                return False

        wait_until(up, timeout=60, message="registry serve to answer")
        assert client.register("w-value", catalog.load_schema("WebLogEvent")) == 1
        # the server writes the same machine-wide store the file registry reads
        assert FileRegistry(config.load({"home": home}).registry_dir).latest("w-value").id == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
