"""A TF Serving ``models.config`` that serves what the registry promoted, never what the gate rejected.

Why: the registry publishes every candidate as a numbered version directory, rejected ones included
(their lineage and scores are kept for ``models diff`` and reproduction). TF Serving pointed at the
registry with its default policy ("latest") would serve the newest directory: often a rejected
candidate. The config written here pins TF Serving to specific versions and labels them:

* ``stable`` -> the promoted version (``models promote``/``rollback`` and the trainer's gate move it);
* ``canary`` -> the version under canary, when the registry state names one (key ``canary``).

It is regenerated on every promotion and rollback (``ModelRegistry`` calls :func:`write_config`)
and on demand by ``streamlearn models tf-serving-config``. The text is protobuf text format of
``tensorflow.serving.ModelServerConfig``; tests parse it with the ``tensorflow-serving-api`` protos.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streaming.model_registry import ModelRegistry

CONFIG_FILE = "models.config"


def served_versions(registry: ModelRegistry, name: str) -> tuple[list[int], dict[str, int]]:
    """(versions TF Serving should load, labels) of one model, from its registry state.

    Only versions whose directory still exists are listed: TF Serving refuses a label that points
    at a version it cannot load.
    """
    state = registry.state(name)
    present = set(registry.versions(name))
    labels: dict[str, int] = {}
    promoted = state.get("promoted")
    if promoted is not None and int(promoted) in present:
        labels["stable"] = int(promoted)
    canary = state.get("canary")
    if isinstance(canary, dict):  # tolerate {"version": V, "share": S}
        canary = canary.get("version")
    if canary is not None and int(canary) in present and int(canary) != labels.get("stable"):
        labels["canary"] = int(canary)
    return sorted(set(labels.values())), labels


def render_config(registry: ModelRegistry, *, base_path: str | None = None) -> str:
    """The ``models.config`` text for every model with a servable version.

    ``base_path``: the registry root as TF Serving sees it (e.g. ``/models`` inside its container);
    default: this registry's absolute path.
    """
    root = base_path.rstrip("/") if base_path else str(Path(registry.root).absolute())
    blocks = []
    for name in registry.names():
        versions, labels = served_versions(registry, name)
        if not versions:
            continue  # nothing promoted yet: TF Serving must not pick a candidate by itself
        lines = ["  config {", f"    name: {json.dumps(name)}", f"    base_path: {json.dumps(f'{root}/{name}')}",
                 '    model_platform: "tensorflow"', "    model_version_policy {", "      specific {"]
        lines += [f"        versions: {v}" for v in versions]
        lines += ["      }", "    }"]
        for label, version in sorted(labels.items(), key=lambda kv: (kv[0] != "stable", kv[0])):
            lines += ["    version_labels {", f"      key: {json.dumps(label)}", f"      value: {version}", "    }"]
        lines.append("  }")
        blocks.append("\n".join(lines))
    if not blocks:
        return "model_config_list {\n}\n"
    return "model_config_list {\n" + "\n".join(blocks) + "\n}\n"


def write_config(registry: ModelRegistry, path: Path | None = None, *, base_path: str | None = None) -> Path:
    """Regenerate the config atomically under a registry-wide lock (trainers of several models and
    the CLI may promote at once; the last writer must not write a view older than another's)."""
    root = Path(registry.root)
    root.mkdir(parents=True, exist_ok=True)
    target = path or root / CONFIG_FILE
    with (root / ".tf-serving-config.lock").open("a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            text = render_config(registry, base_path=base_path)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            try:
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, target)
            except OSError:
                tmp.unlink(missing_ok=True)
                raise
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return target


def refresh_quietly(registry: ModelRegistry) -> Any:
    """Regenerate after a promotion; a failure is logged, never fails the promotion itself."""
    import logging

    from streaming.exceptions import ModelRegistryError

    try:
        return write_config(registry)
    except (OSError, ModelRegistryError) as exc:  # another model's damaged state.json must not fail this one
        logging.getLogger(__name__).warning("could not rewrite %s: %s", Path(registry.root) / CONFIG_FILE, exc)
        return None
