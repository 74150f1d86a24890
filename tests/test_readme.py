"""The README runs as written: every `streamlearn` command of its shell blocks, in order, in a fresh home.

Why a test: the README is the user's first contract. A README edit that breaks a command (a renamed flag,
a sample file that is not shipped, a fixed date that ages out) must fail CI, not a new user.

How: each ``sh`` block of README.md is a session of its own, in a fresh STREAMLEARN_HOME whose embedded
broker listens on a free port (a block that does not start the broker itself gets one started first: the
user did that in the first block). Every `streamlearn ...` line runs in order, with this interpreter,
through bash (so `$VARS` expand), in a scratch directory that holds the repository's ``examples/`` and
``tests/fixtures/`` as the README names them. Services (workers, servers) start in the background, as a
user does in a second shell, must print their readiness line and stay up until the block ends; then they
get SIGTERM. Every command must be listed in ``EXPECT`` with what its output must show, so a new README
command without a check fails here with a message saying what to add. The one path only a user has
(their own access log) is replaced by the shared real log, and that block is skipped where it is absent.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from streaming.broker import free_port
from tests.helpers import APACHE_LOGS, ROOT, wait_until

README = ROOT / "README.md"
BLOCK_RE = re.compile(r"```sh\n(.*?)```", re.S)


@dataclass(frozen=True)
class Expect:
    """What one README command must do.

    ``output``: regex the command's combined output must match (foreground: after it exits 0;
    background: before it counts as ready). ``background``: a service that keeps running while the rest
    of the block goes on. ``stop_first``: background commands (by their first words) the README tells the
    user to stop before this one.
    """

    output: str
    background: bool = False
    rc: int = 0
    timeout: float = 240.0
    stop_first: str | None = None


# Keyed by the first words after `streamlearn` (the longest key that matches wins).
EXPECT: dict[str, Expect] = {
    "broker start": Expect(r"running|listening|started"),
    "broker stop": Expect(r"broker stopped"),
    "topics create": Expect(r"\.raw"),
    "publish sensor": Expect(r"published [1-9]\d* sensor events"),
    "publish image": Expect(r"published [1-9]\d* image events"),
    "subscribe": Expect(r'"sensor_id"'),
    "schemas list": Expect(r"sensor"),
    "registry serve": Expect(r"8081", background=True),
    "ingest weblog": Expect(r'"published": [1-9]|published [1-9]'),
    "ingest sensors": Expect(r'"published": [1-9]|published [1-9]'),
    "stream sensor": Expect(r"assigned|partition", background=True),
    "stream sensor --idle-exit": Expect(r'"records": [1-9]'),
    "stream image --idle-exit": Expect(r'"records": [1-9]'),
    "stream weblog --idle-exit": Expect(r'"records": [1-9]'),
    "train": Expect(r"promot|reject"),
    "models show": Expect(r"baseline"),
    "serve": Expect(r"8501", background=True),
    "predict": Expect(r"\"model\": \"digits_cnn\".*\"error\": null"),  # an answer, not an error reply
    "replay": Expect(r"records"),
    "store promote": Expect(r"is live", stop_first="stream sensor"),
    "store gc": Expect(r"dry|would|batch"),
    "retrain": Expect(r"reproduc"),
    "models tf-serving-config": Expect(r"models.config|model_config_list"),
    "up": Expect(r"started|supervis", background=True),
    "status": Expect(r"stream|serve|train"),
}

#: Paths only a user has, and what the tour reads instead.
USER_FILES = {"/var/log/apache2/access.log": APACHE_LOGS}


def readme_blocks(text: str) -> list[list[str]]:
    """The `streamlearn` command lines of each ``sh`` block of the README, comments stripped, in order."""
    blocks = []
    for block in BLOCK_RE.findall(text):
        lines = []
        for raw in block.splitlines():
            line = re.split(r"\s+#\s", raw, maxsplit=1)[0].strip()
            if line.startswith("streamlearn "):
                lines.append(line)
        if lines:
            blocks.append(lines)
    return blocks


def expectation(line: str) -> Expect:
    words = shlex.split(line)[1:]
    for n in range(len(words), 0, -1):
        key = " ".join(words[:n])
        if key in EXPECT:
            return EXPECT[key]
    raise AssertionError(f"README command {line!r} has no expectation in tests/test_readme.py EXPECT; "
                         "add what its output must show")


def test_every_readme_command_has_an_expectation() -> None:
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    commands = [line for block in blocks for line in block]
    assert len(commands) >= 20, f"the README tour shrank to {len(commands)} commands"
    for line in commands:
        expectation(line)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _run_block(lines: list[str], tmp: Path) -> int:
    home, work = tmp / "home", tmp / "work"
    work.mkdir(parents=True)
    (work / "examples").symlink_to(ROOT / "examples")
    (work / "tests").mkdir()
    (work / "tests" / "fixtures").symlink_to(ROOT / "tests" / "fixtures")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLEARN_")}
    env.update({"STREAMLEARN_HOME": str(home), "STREAMLEARN_BROKER_PORT": str(free_port()),
                "STREAMLEARN_METRICS_PORT": "-1", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
                # every publish/ingest command settles its acks for the loss window before it exits;
                # nothing kills this broker, so 0.5 s (ledger still on) instead of 5 s per command
                "STREAMLEARN_BROKER_LOSS_WINDOW_S": "0.5",
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)})
    python = shlex.quote(sys.executable)
    background: list[tuple[str, subprocess.Popen[bytes]]] = []
    ran = 0
    if not lines[0].startswith("streamlearn broker start"):
        lines = ["streamlearn broker start", *lines]
    try:
        for i, line in enumerate(lines):
            want = expectation(line)
            for path, real in USER_FILES.items():
                line = line.replace(path, str(real))
            if want.stop_first:
                for cmd, proc in background:
                    if re.sub(r"\s+", " ", cmd).startswith(f"streamlearn {want.stop_first}"):
                        _stop(proc)
            shell = f"exec {python} -m streamlearn.cli {line.removeprefix('streamlearn ')}"
            log = tmp / f"cmd{i:02d}.log"
            if want.background:
                with log.open("wb") as fh:
                    proc = subprocess.Popen(["bash", "-c", shell], cwd=work, env=env, stdout=fh,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
                background.append((line, proc))

                def ready(proc: subprocess.Popen[bytes] = proc, log: Path = log, want: Expect = want,
                          line: str = line) -> bool:
                    text = log.read_text(errors="replace")
                    assert proc.poll() is None, f"{line!r} exited with {proc.returncode}:\n{text[-3000:]}"
                    return re.search(want.output, text, re.I) is not None

                wait_until(ready, timeout=want.timeout, interval=0.2, message=f"{line!r} to become ready")
            else:
                done = subprocess.run(["bash", "-c", shell], cwd=work, env=env, capture_output=True, text=True,
                                      timeout=want.timeout, stdin=subprocess.DEVNULL)
                text = done.stdout + done.stderr
                log.write_text(text)
                assert done.returncode == want.rc, f"{line!r} exited {done.returncode}:\n{text[-3000:]}"
                assert re.search(want.output, text, re.I), f"{line!r} printed no /{want.output}/:\n{text[-3000:]}"
            ran += 1
    finally:
        for _line, proc in reversed(background):
            _stop(proc)
        subprocess.run([sys.executable, "-m", "streamlearn.cli", "broker", "stop"], cwd=work, env=env,
                       capture_output=True, timeout=60)
    return ran


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~20 commands, TensorFlow training among them: ~90 s quiet, 340 s seen at load 10
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_as_written(index: int, tmp_path: Path) -> None:
    lines = BLOCKS[index]
    missing = [str(real) for path, real in USER_FILES.items()
               if any(path in line for line in lines) and not Path(real).exists()]
    if missing:
        pytest.skip(f"this README block reads a user's own file; the stand-in {missing} is absent "
                    "(../shared is not part of a user's clone)")
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to run README lines as a shell would")
    assert _run_block(lines, tmp_path) >= len(lines)


def _documented_settings(text: str) -> set[str]:
    """Environment names the README's configuration table covers. A row may shorten names that share a
    prefix: "`STREAMLEARN_API_HOST` / `_PORT`" stands for STREAMLEARN_API_PORT too."""
    names: set[str] = set()
    for row in (line for line in text.splitlines() if line.startswith("| `STREAMLEARN_")):
        tokens = re.findall(r"`([A-Z0-9_]+)`", row)
        full = [t for t in tokens if t.startswith("STREAMLEARN_")]
        names.update(full)
        for short in (t for t in tokens if t.startswith("_")):
            for name in full:
                parts = name.split("_")
                names.update("_".join(parts[:k]) + short for k in range(1, len(parts)))
    return names


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    """A setting a user cannot find cannot be tuned; the table fell behind the code once already."""
    from streaming import config

    wanted = {config.env_name(f) for f in config.Settings.model_fields} - {
        config.env_name(f) for f in config._NOT_FROM_ENV}
    missing = sorted(wanted - _documented_settings(README.read_text()))
    assert not missing, f"add these to README.md's configuration table: {missing}"
