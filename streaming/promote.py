"""Make a rebuilt namespace live: swap its batches in and move the live group's offsets to match.

``streamlearn store promote <kind> --from <namespace>``. After ``streamlearn replay ... --into rebuild``
the rebuilt batches sit in ``<store>/rebuild/<kind>``; the live stream workers own
``<store>/live/<kind>`` and the group ``<prefix>stream.<kind>``. Promotion:

1. **guard** (:func:`ensure_group_idle`): refuse while the live group has members (a running worker
   would keep writing into the directory being swapped and commit over the new offsets), and refuse
   a namespace whose replay did not complete (no :data:`streaming.replay.RANGE_FILE`), that does
   not cover every partition, or that holds batches outside its recorded range;
2. **intent**: ``<store>/.promote-<kind>.json`` (temp file + fsync + rename + fsync of the directory)
   names the source, the archive namespace and the offsets to commit (the replay's ``stop``);
3. **archive**: write a range record into ``live/<kind>`` (what it covers, so it can be promoted back)
   and rename it to ``replaced-<UTC time>/<kind>`` (kept, never deleted: a namespace like any other);
4. **swap**: rename ``<namespace>/<kind>`` to ``live/<kind>``;
5. **commit**: set the group's committed offsets to the replay's ``stop`` offsets
   (``alter_group_offsets``), so the next worker reads on right after the rebuilt batches;
6. remove the intent.

Why this is crash-safe: each step is one atomic rename (or one broker request that can be repeated),
and which steps are done can be read back from the disk: the source and archive directories either
exist or not. A crash before the intent is durable leaves the old state untouched; once the intent
exists the promotion is rolled *forward* by whoever comes next: the same ``store promote`` command run
again, any ``store promote`` of that kind, or a ``streamlearn stream <kind>`` worker starting
(:func:`hold_live`, entered by :func:`streaming.worker.run_worker`), which therefore never runs
against swapped batches with the old offsets. A per-kind lock file (``flock``: shared by running live
workers, exclusive for a promotion) keeps promotions apart from each other and from the workers of
this host.

The live batches before the rebuilt range are not merged in: the kind's live directory becomes exactly
the rebuilt namespace (replay ``--from-beginning`` to keep all history); the old one stays in the archive.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, TopicPartition
from kafka.structs import OffsetAndMetadata

from streaming.clock import now_ms
from streaming.config import Settings
from streaming.exceptions import GroupActiveError, PromoteError
from streaming.fsutil import fsync_dir, write_json_atomic
from streaming.kafka_security import kafka_security
from streaming.offsets import earliest_and_end, show
from streaming.replay import RANGE_FILE, read_range, write_range
from streaming.store import FeatureStore, StoreError, parse_batch_id
from streaming.topics import raw_topic

log = logging.getLogger(__name__)

LIVE = "live"
#: Steps reported to ``on_step`` after each is durable (tests kill the process there).
STEPS = ("intent", "archived", "swapped", "committed")


@dataclass
class PromoteResult:
    kind: str
    source: str
    archive: str | None
    group: str
    topic: str
    offsets: dict[int, int]
    rolled_forward: bool = False
    #: the same command ran again after it had finished: nothing was moved or committed
    already_live: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "from": self.source, "archived_as": self.archive, "group": self.group,
                "topic": self.topic, "offsets": self.offsets, "rolled_forward": self.rolled_forward,
                "already_live": self.already_live}


def ensure_group_idle(settings: Settings, group: str, action: str) -> None:
    """Refuse (:class:`GroupActiveError`) while ``group`` has a live member. The one guard of promotion.

    Dead members of this host (a worker killed with -9 on a broker that never expires it) are removed
    first, through :func:`streaming.members.clear_for_reset`, so a crash does not block a recovery;
    a live member, or any member of another host, is refused by name (pid on this host).
    """
    from streaming import members

    try:
        members.clear_for_reset(settings, group)
    except GroupActiveError as exc:
        raise GroupActiveError(f"{exc}; {action} needs the group idle: stop its `streamlearn stream` workers "
                               "(or `streamlearn up`) and run this command again") from exc


def _intent_path(store_root: Path, kind: str) -> Path:
    return store_root / f".promote-{kind}.json"


def _lock_path(store_root: Path, kind: str) -> Path:
    return store_root / f".live-{kind}.lock"


@contextlib.contextmanager
def _exclusive(store_root: Path, kind: str) -> Iterator[None]:
    """The kind's live-store lock, exclusively; refused at once while a live worker of this host holds it."""
    store_root.mkdir(parents=True, exist_ok=True)
    with open(_lock_path(store_root, kind), "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise GroupActiveError(
                f"a `streamlearn stream {kind}` worker on this host is running (it holds "
                f"{_lock_path(store_root, kind)}), or another promotion is; stop its workers (or "
                "`streamlearn up`) and run this command again") from exc
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _rename_durably(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def _check_source(store: FeatureStore, kind: str, source: str, topic: str, partitions: list[int]) -> dict[int, int]:
    """The offsets to commit: the completed replay's ``stop``; refuses an incomplete or foreign namespace."""
    directory = store.directory(kind, source)
    if not directory.is_dir():
        raise PromoteError(f"--from: namespace {source!r} has no {kind} batches ({directory} does not exist); "
                           f"rebuild it with `streamlearn replay {kind} --from-beginning --into {source}`")
    record = read_range(directory)
    if record is None:
        raise PromoteError(f"--from: namespace {source!r} has no completed replay record ({RANGE_FILE}); the "
                           "replay was interrupted or the namespace was not written by `streamlearn replay`; "
                           "run the same replay command again to complete it")
    if record.get("topic") != topic or record.get("kind") != kind:
        raise PromoteError(f"--from: namespace {source!r} was replayed from {record.get('topic')!r}, not {topic!r}")
    stop = {int(p): int(o) for p, o in record["stop"].items()}
    start = {int(p): int(o) for p, o in record["start"].items()}
    missing = sorted(set(partitions) - set(stop))
    if missing:
        raise PromoteError(f"--from: namespace {source!r} covers partitions {sorted(stop)} of {topic!r}, not "
                           f"{missing}; the live directory is swapped whole, so replay every partition "
                           "(--from-beginning, --from-timestamp, or --from-offset with all of them)")
    for bid in store.batch_ids(kind, source):
        try:
            t, p, first, last = parse_batch_id(bid)
        except StoreError:
            continue
        if t != topic or p not in stop or first < start[p] or last >= stop[p]:
            raise PromoteError(f"--from: batch {bid} of namespace {source!r} lies outside its recorded replay "
                               f"range (partition {p}: [{start.get(p)}, {stop.get(p)})); the namespace mixes "
                               "several replays; replay into a fresh namespace")
    return stop


def _already_live(store: FeatureStore, kind: str, source: str, topic: str, group: str) -> PromoteResult | None:
    """The result of a promotion of ``source`` that already finished, or None.

    Why: the rule is "run the same command again" after a crash, and a crash (or a lost terminal) can come
    after the last step, when nothing says whether it finished. The source namespace is gone then and the
    live directory carries its replay record; that is reported as done (the offsets it committed back then;
    none are committed again: a worker may have moved on since), not as a namespace to rebuild.
    """
    if store.directory(kind, source).exists():
        return None
    record = read_range(store.directory(kind, LIVE))
    if not record or record.get("namespace") != source or record.get("topic") != topic:
        return None
    stop = {int(p): int(o) for p, o in dict(record.get("stop") or {}).items()}
    return PromoteResult(kind, source, None, group, topic, stop, already_live=True)


def _commit_offsets(settings: Settings, group: str, topic: str, offsets: dict[int, int]) -> None:
    ensure_group_idle(settings, group, "moving its offsets")
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap, **kafka_security(settings))
    try:
        result = admin.alter_group_offsets(
            group, {TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})
    finally:
        admin.close()
    failed = {tp.partition: err.__name__ for tp, err in result.items() if err.__name__ != "NoError"}
    if failed:
        raise GroupActiveError(f"group: {group!r} refused the offset commit for partitions {failed}; a member "
                               "probably joined meanwhile; stop it and run the command again")


def _roll_forward(settings: Settings, store: FeatureStore, intent: dict[str, Any],
                  on_step: Callable[[str], None] | None) -> None:
    """Finish the steps an intent names; each is skipped when the disk shows it done (idempotent)."""
    kind, source, archive = intent["kind"], intent["source"], intent["archive"]
    live_dir = store.directory(kind, LIVE)
    source_dir = store.directory(kind, source)
    archive_dir = store.directory(kind, archive) if archive else None
    if source_dir.exists():  # not swapped yet
        if archive_dir is not None and live_dir.exists() and not archive_dir.exists():
            if intent.get("archive_range"):  # so the archive can be promoted back like a replay
                write_range(live_dir, intent["archive_range"])
            _rename_durably(live_dir, archive_dir)
        if on_step:
            on_step("archived")
        if live_dir.exists():
            raise PromoteError(f"promote: {live_dir} and {archive_dir} both exist while {source_dir} is not "
                               "swapped in; the store was changed by hand; move one aside and retry")
        _rename_durably(source_dir, live_dir)
        with contextlib.suppress(OSError):
            source_dir.parent.rmdir()  # the namespace is empty now (other kinds keep it)
    elif not live_dir.exists():
        raise PromoteError(f"promote: neither {source_dir} nor {live_dir} exists; the store was changed by "
                           f"hand; the previous live batches are in {archive_dir}")
    if on_step:
        on_step("swapped")
    offsets = {int(p): int(o) for p, o in intent["offsets"].items()}
    _commit_offsets(settings, intent["group"], intent["topic"], offsets)
    if on_step:
        on_step("committed")
    _intent_path(store.root, kind).unlink()
    fsync_dir(store.root)


def _live_range(settings: Settings, store: FeatureStore, kind: str, group: str, topic: str,
                archive: str) -> dict[str, Any]:
    """The range the live batches cover, as a replay record: per partition from its first batch to
    max(committed offset, last batch + 1), so promoting the archive back resumes where live stood."""
    start: dict[str, int] = {}
    stop: dict[str, int] = {}
    for pos in show(settings, group, topic):
        ranges = store.ranges(kind, topic, pos.partition, LIVE)
        first = ranges[0][0] if ranges else (pos.committed if pos.committed is not None else pos.earliest)
        end = max(ranges[-1][1] + 1 if ranges else first, pos.committed or 0)
        start[str(pos.partition)], stop[str(pos.partition)] = first, end
    return {"format": 1, "kind": kind, "topic": topic, "namespace": archive, "start": start, "stop": stop,
            "archived_live": True, "completed_at_ms": now_ms()}


def promote(settings: Settings, kind: str, source: str, *, group: str | None = None,
            on_step: Callable[[str], None] | None = None) -> PromoteResult:
    """Swap namespace ``source`` in as ``kind``'s live batches and commit its end offsets for the
    live group. A half-done promotion of ``kind`` (any source) is finished first; re-running the
    same command after a crash finishes it and reports ``rolled_forward``."""
    from streaming.worker import default_group

    store = FeatureStore(settings.feature_store)
    if source == LIVE:
        raise PromoteError("--from: 'live' is already live; name the namespace a replay wrote (--into)")
    store.directory(kind, source)  # validates the names
    with _exclusive(store.root, kind):
        pending = _read_intent(store.root, kind)
        if pending is not None:
            log.info("finishing the interrupted promotion of %s from %r", kind, pending["source"])
            _roll_forward(settings, store, pending, on_step)
            result = _result(pending, rolled_forward=True)
            if pending["source"] == source:
                return result
            if not store.directory(kind, source).exists():
                return result
        group = group or default_group(settings, kind)
        topic = raw_topic(settings, kind)
        done = _already_live(store, kind, source, topic, group)
        if done is not None:
            return done
        ensure_group_idle(settings, group, "promotion")
        begins, _ends = earliest_and_end(settings, topic)
        offsets = _check_source(store, kind, source, topic, sorted(begins))
        live_batches = len(store.batch_ids(kind, LIVE)) if store.directory(kind, LIVE).exists() else 0
        if live_batches and not store.batch_ids(kind, source):
            # A replay of a range with no records ("records": 0) swapped in: the live store was left empty
            # and the group's offsets moved. Nothing a user means; refused, the live batches untouched.
            raise PromoteError(f"--from: namespace {source!r} holds no {kind} batches (its replay read no records), "
                               f"and promoting it would replace the {live_batches} live batches with none; replay a "
                               "range that holds records into a fresh namespace")
        archive = "replaced-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        n = 1
        while store.directory(kind, archive).exists() or (store.root / archive).exists():
            n += 1
            archive = "replaced-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{n}"
        had_live = store.directory(kind, LIVE).exists()
        archive_range = _live_range(settings, store, kind, group, topic, archive) if had_live else None
        intent = {"format": 1, "kind": kind, "source": source, "archive": archive if had_live else None,
                  "group": group,
                  "topic": topic, "offsets": {str(p): o for p, o in sorted(offsets.items())},
                  "archive_range": archive_range,
                  "created_at_ms": now_ms()}
        write_json_atomic(_intent_path(store.root, kind), intent, indent=1)
        if on_step:
            on_step("intent")
        _roll_forward(settings, store, intent, on_step)
        return _result(intent, rolled_forward=False)


@contextlib.contextmanager
def hold_live(settings: Settings, kind: str) -> Iterator[PromoteResult | None]:
    """Held by a live stream worker for its whole run: finishes a promotion of ``kind`` that a crash
    left half-done (yields its result, else None), then keeps new promotions out until it exits.

    A shared ``flock`` on the kind's lock file: several workers of a kind share it, ``store promote``
    needs it exclusively. The worker therefore never runs with swapped batches and the old offsets,
    and a promotion never swaps the directory under a worker of this host, even one that has not
    joined its group yet (the group check alone has that window)."""
    store = FeatureStore(settings.feature_store)
    if store.remote is not None:  # object storage: no namespace promotion exists there to hold off
        yield None
        return
    store.root.mkdir(parents=True, exist_ok=True)
    with open(_lock_path(store.root, kind), "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH)  # waits while a promotion runs
        result = None
        if _intent_path(store.root, kind).exists():
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise PromoteError(
                    f"a promotion of {kind} was interrupted and another `streamlearn stream {kind}` worker "
                    f"holds the store; stop every {kind} worker, then run `streamlearn store promote {kind} "
                    "--from <namespace>` again (or start one worker)") from exc
            pending = _read_intent(store.root, kind)
            if pending is not None:
                log.warning("a promotion of %s from %r was interrupted; finishing it before starting",
                            kind, pending["source"])
                _roll_forward(settings, store, pending, None)
                result = _result(pending, rolled_forward=True)
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
        try:
            yield result
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_intent(store_root: Path, kind: str) -> dict[str, Any] | None:
    try:
        intent: dict[str, Any] = json.loads(_intent_path(store_root, kind).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    return intent


def _result(intent: dict[str, Any], *, rolled_forward: bool) -> PromoteResult:
    return PromoteResult(intent["kind"], intent["source"], intent["archive"], intent["group"], intent["topic"],
                         {int(p): int(o) for p, o in intent["offsets"].items()}, rolled_forward)
