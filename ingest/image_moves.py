"""Names and moves of the drop folder's files in ``processed/`` and ``rejected/`` (split from
``ingest/images.py``, whose watcher decides *where* a file goes; this module decides *under which
name* and moves it with its sidecars).

Why: a file whose name was taken in ``processed/`` or ``rejected/`` got a new name, but its
``.label`` and ``.reason`` were written under the old one first, overwriting the earlier file's. Here
the name is chosen first, free together with every sidecar name it could have there, and the
sidecars follow it. Where the file of each event id went is kept in the names journal (the format of
``ingest.checkpoint.HashJournal``, with :func:`names_tag` as tag), so that a copy of the same bytes
can name it and a move cut short by a kill ends under the name first planned.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: Sidecar suffixes a file ``x.png`` may have beside it: its label, its reason (rejected/), its
#: duplicate note (processed/); the label may also be ``x.label``.
SIDECARS = (".label", ".reason", ".duplicate")

#: Longest label kept whole in the names journal; a longer one is kept as its head and its sha256.
LABEL_KEPT = 200


@dataclass
class Plan:
    """Where one file goes, decided before anything moves: ``target`` (None: left in place for the next
    scan), its label files (from, to), its note (path, text) and its names-journal entry (tag, digest)."""

    source: Path
    target: Path | None
    labels: list[tuple[Path, Path]] = field(default_factory=list)
    note: tuple[Path, str] | None = None
    entry: tuple[str, str] | None = None


def label_key(label: str | None) -> str | None:
    """A label as the names journal keeps it: bounded, still distinct (a long one ends with its sha256)."""
    if label is None or len(label) <= LABEL_KEPT:
        return label
    digest = hashlib.sha256(label.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{label[:LABEL_KEPT]}... (sha256 {digest})"


def names_tag(source: str, target: str, label: str | None) -> str:
    """The names journal's tag of a file dropped as ``source``, moved to ``target`` (relative to the drop
    folder) and published with ``label``: the hex of that JSON list (alphanumeric, as the journal needs)."""
    return json.dumps([source, target, label_key(label)]).encode("ascii").hex()


def names_entry(tag: str | None) -> tuple[str, str, str | None] | None:
    """``(source, target, label)`` of a :func:`names_tag`; None for None or a tag it did not write."""
    if tag is None:
        return None
    try:
        source, target, label = json.loads(bytes.fromhex(tag))
    except (ValueError, TypeError):
        return None
    return str(source), str(target), None if label is None else str(label)


def claimed(target_dir: Path, name: str) -> list[Path]:
    """``name`` in ``target_dir`` and every sidecar name it could have there: all must be free for a file
    to take ``name`` (a label ``<stem>.label`` left by an earlier ``<stem>.jpg`` would label it too)."""
    return [target_dir / name, *(target_dir / (name + e) for e in SIDECARS),
            target_dir / (os.path.splitext(name)[0] + ".label")]


#: Longest name a moved file may take: it and every sidecar name (``<name>.duplicate``, the longest)
#: must stay within the usual 255-byte limit of a file name.
MAX_MOVED_NAME_BYTES = 255 - max(len(e) for e in SIDECARS)


def _fits(name: str) -> bool:
    return len(os.fsencode(name)) <= MAX_MOVED_NAME_BYTES


def _fitting(stem: str, suffix: str) -> tuple[str, str]:
    """``stem`` and ``suffix`` cut so that ``<stem>.<12 hex>-<n><suffix>`` fits, whatever they were."""
    suffix_b = os.fsencode(suffix)[:16]
    room = MAX_MOVED_NAME_BYTES - len(suffix_b) - 1 - 12 - 8  # ".<12 hex>" and "-<n>" with room to spare
    return os.fsdecode(os.fsencode(stem)[:room]), os.fsdecode(suffix_b)


def place(source: Path, digest: str, target_dir: Path, *, note: str | None, ext: str = ".reason",
          reserved: set[Path], own: Path | None = None) -> Plan:
    """A plan for ``source`` under the first free name in ``target_dir``: its own, else
    ``<stem>.<digest[:12]><suffix>`` (then ``-2``, ``-3``...). Free: neither the name nor any sidecar name
    it could have there exists (:func:`claimed`), and nothing this plan writes is in ``reserved`` (what
    the plans of the same batch write; this one's is added). Its label files (``x.png.label``,
    ``x.label``) follow the name; ``note`` goes in ``<name><ext>``. ``own``: the name planned for this
    very file by a run whose move was cut short (its sidecars there are its own: taken as it is)."""
    stem, suffix = os.path.splitext(source.name)
    labels = [s for s in dict.fromkeys((source.with_name(source.name + ".label"), source.with_suffix(".label")))
              if s != source and os.path.lexists(s)]  # one for README: README.label is both forms

    def writes(name: str) -> list[Path]:
        out = [target_dir / name] + ([target_dir / (name + ext)] if note is not None else [])
        for sidecar in labels:  # x.png.label -> <name>.label, x.label -> <stem of name>.label
            full = sidecar.name == source.name + ".label"
            out.append(target_dir / ((name if full else os.path.splitext(name)[0]) + ".label"))
        return out

    if own is not None and own.parent == target_dir:
        name = own.name
    else:
        short_stem, short_suffix = _fitting(stem, suffix)
        for n in itertools.count():
            if n == 0 and not _fits(source.name):
                continue  # its sidecars could not be written: a shortened name (a 250-character file
                # name ended every run of the folder in "File name too long")
            base, ext_ = (stem, suffix) if _fits(f"{stem}.{digest[:12]}-{n}{suffix}") else (short_stem, short_suffix)
            name = source.name if n == 0 else f"{base}.{digest[:12]}{'' if n == 1 else f'-{n}'}{ext_}"
            if not (any(os.path.lexists(p) for p in claimed(target_dir, name))
                    or any(p in reserved for p in writes(name))):
                break
    written = writes(name)
    reserved.update(written)
    plan = Plan(source, written[0], labels=list(zip(labels, written[2 if note is not None else 1 :], strict=True)))
    if note is not None:
        plan.note = (written[1], note + "\n")
    return plan


def carry_out(plan: Plan) -> None:
    """Note first, then the labels, then the file: a kill in between leaves the file in the drop folder,
    and the next run, with the name its names entry planned, does it again under the same names."""
    if plan.target is None:
        return
    if plan.note is not None:
        plan.note[0].write_text(plan.note[1], encoding="utf-8", errors="surrogateescape")
    for sidecar, target in plan.labels:
        try:
            os.replace(sidecar, target)
        except FileNotFoundError:
            pass  # moved by a run cut short, or taken away by its writer: nothing left to carry
    try:
        os.replace(plan.source, plan.target)
    except FileNotFoundError:
        log.warning("%s vanished before it could be moved to %s", plan.source, plan.target.parent.name)
