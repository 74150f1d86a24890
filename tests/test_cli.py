"""The command line: every command module imports, and flags name their env vars."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

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
