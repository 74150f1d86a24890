"""Durable positions of the file sources: atomic JSON documents and an append-only hash journal.

Why two shapes:

* :func:`write_json` / :func:`read_json` hold a *small* document that is replaced as a whole (a
  source's snapshot beside the runner's floors, ``ingest/runner.py``). It is written to a temp file
  in the same directory, fsync'd, renamed over the old one and the directory fsync'd, so after a
  crash (kill -9, power loss) the file is either the old or the new document, never a torn mix.
* :class:`HashJournal` holds a *growing set* (sha256 of every image already published or
  rejected). Rewriting a growing set on every image would be O(n) per file, so it is an
  append-only text file, one ``<tag> <hash>`` per line, fsync'd after each batch. A crash can
  only leave a torn last line (no trailing newline); it is ignored on load and cut off before
  the next append, which is safe because an entry is only relied upon after its fsync.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.exceptions import CheckpointError
from streaming.fsutil import write_json_atomic

if TYPE_CHECKING:
    from streaming.config import Settings


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically and durably with ``data`` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data, indent=None)


def read_json(path: Path) -> dict[str, Any] | None:
    """The document at ``path``, or None when there is none yet.

    A file that exists but is not a JSON object cannot come from :func:`write_json`; it is
    reported instead of silently restarting from zero (which would re-publish everything).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read ({exc}); check its permissions") from exc
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(
            f"checkpoint {path} is not valid JSON ({exc}); restore it, or delete it to start over"
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} must hold a JSON object; delete it to start over")
    return data


class HashJournal:
    """An append-only, fsync'd set of ``(tag, hash)`` entries, e.g. ``("P", sha256)``.

    ``tag`` records what happened to the item (published, rejected) so a restart can finish
    the interrupted step (move the file) without redoing the acknowledged one (publish).
    """

    #: Digests kept in memory (oldest forgotten first; ~200 bytes each, so ~100 MB at the bound).
    #: A file older than the newest MAX_ENTRIES distinct ones would be published again if it came
    #: back; consumers de-duplicate by image id.
    MAX_ENTRIES = 500_000

    def __init__(self, path: Path, max_entries: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries or self.MAX_ENTRIES
        self._entries: dict[str, str] = {}
        self._lines = 0
        self._load()
        if self._lines > 2 * self.max_entries:
            self._compact()
        self._fh = open(self.path, "ab")

    def _trim(self) -> None:
        while len(self._entries) > self.max_entries:
            del self._entries[next(iter(self._entries))]

    def _compact(self) -> None:
        """Rewrite the journal with the kept entries only (atomically), so the file stays bounded too."""
        tmp = self.path.with_name(f".{self.path.name}.compact")
        with open(tmp, "wb") as fh:
            fh.write(b"".join(f"{tag} {digest}\n".encode() for digest, tag in self._entries.items()))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._lines = len(self._entries)

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        complete, _, torn = raw.rpartition(b"\n")
        if torn:
            # A crash mid-append: the entry was never fsync'd, hence never relied upon.
            with open(self.path, "r+b") as fh:
                fh.truncate(len(complete) + (1 if complete else 0))
                fh.flush()
                os.fsync(fh.fileno())
        for n, line in enumerate(complete.split(b"\n"), 1):
            if not line.strip():
                continue
            parts = line.decode("ascii", "replace").split()
            if len(parts) != 2:
                raise CheckpointError(
                    f"journal {self.path} line {n} is not '<tag> <hash>'; repair or delete the journal"
                )
            self._entries.pop(parts[1], None)  # re-insert: the latest entry is the newest
            self._entries[parts[1]] = parts[0]
            self._lines += 1
        self._trim()

    def get(self, digest: str) -> str | None:
        """The tag recorded for ``digest``, or None."""
        return self._entries.get(digest)

    def __contains__(self, digest: object) -> bool:
        return digest in self._entries

    def items(self) -> list[tuple[str, str]]:
        """``(digest, tag)`` pairs, latest tag per digest."""
        return list(self._entries.items())

    def __len__(self) -> int:
        return len(self._entries)

    def add_many(self, items: list[tuple[str, str]]) -> None:
        """Record ``(tag, digest)`` pairs durably (one fsync for the whole batch)."""
        if not items:
            return
        for tag, digest in items:
            if not tag.isalnum() or not digest.isalnum():
                raise CheckpointError(f"journal entry ({tag!r}, {digest!r}) must be two alphanumeric tokens")
        self._fh.write(b"".join(f"{tag} {digest}\n".encode() for tag, digest in items))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        for tag, digest in items:
            self._entries.pop(digest, None)
            self._entries[digest] = tag
        self._lines += len(items)
        self._trim()

    def close(self) -> None:
        self._fh.close()


# -- Kafka floors: where to look for records a killed run may have published -------------------
#
# A source records the end offsets of its topics ("floors") durably *before* it sends records
# it has not checkpointed yet. After a kill -9 it reads its topics from the floors to the end
# and collects the ids it finds (header ``sl.event_id`` on raw records, the key on dead
# letters), so it skips exactly what was acked but not checkpointed: no gap, no duplicate.

EVENT_ID_HEADER = "sl.event_id"


def source_topics(settings: Settings, kind: str) -> list[str]:
    """The topics a source of ``kind`` writes: its raw topic and its dead-letter topic."""
    from streaming.topics import dead_letter_topic, raw_topic

    return [raw_topic(settings, kind), dead_letter_topic(settings, kind)]


def end_offsets(settings: Settings, topics: list[str]) -> dict[str, dict[str, int]]:
    """``{topic: {partition: end offset}}`` now (JSON-friendly: partition as str)."""
    from streaming.consumer import Subscriber

    out: dict[str, dict[str, int]] = {}
    for topic in topics:
        with Subscriber(settings, topic, start="end", decode=False) as sub:
            ends = sub.consumer.end_offsets(list(sub.assignment()))
            out[topic] = {str(tp.partition): int(off) for tp, off in ends.items()}
    return out


def published_ids(settings: Settings, topics: list[str], floors: dict[str, dict[str, int]]) -> dict[str, str]:
    """Ids found in ``topics`` from ``floors`` to the current end: ``{id: "P"|"R"}``.

    ``"P"`` = found on a raw topic (header ``sl.event_id``), ``"R"`` = found on a dead-letter
    topic (the key). A partition missing from ``floors`` (added later) is read from offset 0.
    """
    from streaming.consumer import Subscriber

    found: dict[str, str] = {}
    for topic in topics:
        tag = "R" if topic.endswith(".deadletter") else "P"
        starts = {int(p): int(o) for p, o in floors.get(topic, {}).items()}
        with Subscriber(settings, topic, start={"offsets": starts}, until="end", decode=False) as sub:
            while not sub.finished:
                for item in sub.poll_batch(timeout_ms=500):
                    ident: bytes | None = None
                    if tag == "P":
                        ident = next((v for k, v in item.headers if k == EVENT_ID_HEADER), None)
                    else:
                        ident = item.key
                    if ident:
                        found[ident.decode("utf-8", "replace")] = tag
    return found
