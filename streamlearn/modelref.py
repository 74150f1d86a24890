"""The one ``model/version`` syntax of the command line (``digits_cnn/3``), for every command.

Used as an argparse ``type=`` so a malformed reference fails at parse time with usage and a hint,
the same way in ``models show|diff|promote``, ``retrain --reproduce`` and anything added later.
"""

from __future__ import annotations

import argparse
import re
from typing import NamedTuple

_REF = re.compile(r"^(?P<model>[A-Za-z0-9_.-]+)(/(?P<version>\d+))?$")


class ModelRef(NamedTuple):
    model: str
    version: int | None

    def __str__(self) -> str:
        return self.model if self.version is None else f"{self.model}/{self.version}"


def parse_ref(text: str, *, need_version: bool = False) -> ModelRef:
    """``name`` or ``name/version``; raises ``argparse.ArgumentTypeError`` with the expected form."""
    m = _REF.match(text.strip())
    if m is None or (need_version and m.group("version") is None):
        form = "<model>/<version>" if need_version else "<model> or <model>/<version>"
        raise argparse.ArgumentTypeError(f"{text!r} must be {form}, e.g. digits_cnn/3")
    version = m.group("version")
    return ModelRef(m.group("model"), int(version) if version is not None else None)


def model_ref(text: str) -> ModelRef:
    """argparse type: ``model`` or ``model/version``."""
    return parse_ref(text)


def versioned_ref(text: str) -> ModelRef:
    """argparse type: ``model/version`` (the version is required)."""
    return parse_ref(text, need_version=True)
