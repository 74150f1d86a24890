"""Image validation (before any decoding) and the directory watcher behind ``ingest images --watch``.

Validation reads the container headers itself, so a hostile file is rejected before Pillow
allocates anything: magic bytes, extension vs. content (a ``.png`` holding JPEG bytes is
rejected), dimensions declared in the PNG IHDR / JPEG SOF header (each side <= 4096 and
<= 16 Mpx: decompression bombs), truncation (a PNG must end with its IEND chunk, a JPEG with
the FFD9 marker). Only then is the image decoded once by Pillow (with its pixel cap set) to
catch corrupt data in the middle.

Other formats are recognized by their magic bytes and rejected with a reason that names them
(``unsupported_format``: GIF, BMP, TIFF, WebP, HEIF/AVIF, PDF); a GIF's declared logical screen
is checked first (``too_many_pixels`` for a 32767x32767 screen), animated PNGs (APNG, an
``acTL`` chunk) are ``animated``, and unknown bytes are ``bad_magic``.

The drop folder is complete (docs/EVENT_TIME.md "The image drop folder"): every regular file in
it, whatever its name, ends up published (moved to ``processed/``) or dead-lettered with a reason
(moved to ``rejected/`` beside a ``<name>.reason`` file). Exceptions, all documented: names
starting with a dot (the convention for files still being written, e.g. rsync's temporaries),
sidecar ``.label`` files (they move with their image; one whose image never arrives is rejected
as ``orphan_label`` once settled), sub-directories (``processed/``, ``rejected/``), and files not
yet settled: a file is taken only once its size and mtime stayed unchanged for ``settle_s``
(also with ``--once``, which waits for them up to ``max_settle_wait_s`` and then logs each file
it leaves in place).

Exactly-once watcher (see :class:`ImageWatcher`): a journal (``ingest.checkpoint.HashJournal``)
records each file's sha256 with ``I`` (intent, before publishing), ``P`` (published, after the
ack) or ``R`` (rejected, after the dead letter's ack); the file is moved to ``processed/`` or
``rejected/`` (with a ``.reason`` file) only after that. On restart a ``P``/``R`` file is only
moved; an ``I`` file (killed between send and journal) is looked up in the topics by its id
(``sl.event_id`` header / dead-letter key) from the offsets recorded before the send, and is
published only when it is not there. So kill -9 at any point gives no loss and no duplicate.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest import checkpoint as readback
from ingest.checkpoint import EVENT_ID_HEADER, HashJournal, read_json, write_json
from ingest.exceptions import ImageValidationError, SourceError
from ingest.image_formats import other_format, png_animated
from schemas.exceptions import SchemaError
from streaming.eventtime import EventTimePolicy
from streaming.exceptions import RecordTooLargeError

if TYPE_CHECKING:
    from streaming.config import Settings
    from streaming.producer import Publisher

log = logging.getLogger(__name__)

MAX_SIDE = 4096
MAX_PIXELS = 16_000_000
MAX_FILE_BYTES = 20 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class ImageInfo:
    content_type: str  # "PNG" or "JPEG"
    width: int
    height: int


def sniff(data: bytes) -> str | None:
    """Content type from the magic bytes, or None."""
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    return None


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 33 or data[12:16] != b"IHDR" or struct.unpack(">I", data[8:12])[0] != 13:
        raise ImageValidationError("PNG does not start with a 13-byte IHDR chunk", "bad_header")
    if zlib.crc32(data[12:29]) != struct.unpack(">I", data[29:33])[0]:
        raise ImageValidationError("PNG IHDR chunk fails its CRC check", "bad_header")
    width, height = struct.unpack(">II", data[16:24])
    if not data.endswith(PNG_IEND):
        raise ImageValidationError("PNG is truncated: it does not end with the IEND chunk", "truncated")
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i, n = 2, len(data)
    size: tuple[int, int] | None = None
    while i < n:
        if data[i] != 0xFF:
            raise ImageValidationError(f"JPEG marker expected at byte {i}", "bad_header")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9:
            raise ImageValidationError("JPEG ends (EOI) before any image scan", "bad_header")
        if i + 2 > n:
            break
        seg_len = struct.unpack(">H", data[i : i + 2])[0]
        if seg_len < 2 or i + seg_len > n:
            break
        if marker in _SOF:
            if seg_len < 8:
                raise ImageValidationError("JPEG SOF segment is too short", "bad_header")
            height, width = struct.unpack(">HH", data[i + 3 : i + 7])
            size = (width, height)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            if size is None:
                raise ImageValidationError("JPEG has no SOF header before its scan", "bad_header")
            if not data.endswith(b"\xff\xd9"):
                raise ImageValidationError("JPEG is truncated: it does not end with the FFD9 marker", "truncated")
            return size
        i += seg_len
    raise ImageValidationError("JPEG is truncated inside its headers (no scan found)", "truncated")


def inspect(
    data: bytes,
    filename: str | None = None,
    *,
    max_side: int = MAX_SIDE,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_FILE_BYTES,
    decode: bool = True,
) -> ImageInfo:
    """Validate an encoded image; return its type and declared size or raise ImageValidationError.

    ``filename``'s extension, when given, must match the content. ``decode`` runs Pillow once
    after the header checks passed (set False where only headers matter, e.g. benchmarks).
    """
    if len(data) == 0:
        raise ImageValidationError("image is empty", "empty")
    if len(data) > max_bytes:
        raise ImageValidationError(f"image is {len(data)} bytes, over the {max_bytes}-byte limit", "too_large")
    kind = sniff(data)
    if kind is None:
        other = other_format(data, max_side, max_pixels)
        if other is not None:
            raise other
        raise ImageValidationError("not a PNG or JPEG: unknown magic bytes", "bad_magic")
    if filename is not None:
        ext = os.path.splitext(filename)[1].lower()
        expected = EXTENSIONS.get(ext)
        if expected is None:
            raise ImageValidationError(f"extension {ext!r} is not .png, .jpg or .jpeg", "wrong_extension")
        if expected != kind:
            raise ImageValidationError(
                f"file name says {expected} ({ext}) but the bytes are {kind}; rename it", "wrong_extension"
            )
    width, height = _png_size(data) if kind == "PNG" else _jpeg_size(data)
    if width < 1 or height < 1:
        raise ImageValidationError(f"declared size {width}x{height} is empty", "bad_dimensions")
    if width > max_side or height > max_side or width * height > max_pixels:
        raise ImageValidationError(
            f"declared size {width}x{height} exceeds the cap {max_side}x{max_side} / {max_pixels} pixels "
            "(possible decompression bomb); downscale it before ingesting",
            "too_many_pixels",
        )
    if kind == "PNG" and png_animated(data):
        raise ImageValidationError("animated PNG (APNG) is not supported; send one frame as a PNG", "animated")
    if decode:
        _decode_check(data, width, height, max_pixels)
    return ImageInfo(kind, width, height)


def _decode_check(data: bytes, width: int, height: int, max_pixels: int) -> None:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size != (width, height):
                raise ImageValidationError(
                    f"decoder sees {img.size[0]}x{img.size[1]}, header declared {width}x{height}",
                    "bad_header",
                )
            img.load()
    except ImageValidationError:
        raise
    except Exception as exc:  # Pillow raises many unrelated types for corrupt data
        raise ImageValidationError(f"image does not decode: {type(exc).__name__}: {exc}", "corrupt") from exc


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def label_for(path: Path) -> str | None:
    """Label of an image file: sidecar ``x.png.label``, else ``x.label``, else ``label_rest.png``."""
    for sidecar in (path.with_name(path.name + ".label"), path.with_suffix(".label")):
        try:
            text = sidecar.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, IsADirectoryError):
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise ImageValidationError(f"label file {sidecar.name} cannot be read: {exc}", "bad_label") from exc
        if text:
            return text
    stem = path.stem
    if "_" in stem and stem.split("_", 1)[0]:
        return stem.split("_", 1)[0]
    return None


def image_record(data: bytes, info: ImageInfo, *, label: str | None, source: str, timestamp: int) -> dict[str, Any]:
    """The ImageEvent dict of a validated image (image_id = sha256 of the bytes)."""
    return {
        "image_id": hashlib.sha256(data).hexdigest(),
        "timestamp": int(timestamp),
        "content_type": info.content_type,
        "width": info.width,
        "height": info.height,
        "data": data,
        "label": label,
        "source": source,
    }


@dataclass
class _Item:
    path: Path
    data: bytes
    digest: str
    record: dict[str, Any] | None
    error: ImageValidationError | None


class ImageWatcher:
    """Publish each new image of ``directory`` once, then move it to processed/ or rejected/."""

    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        directory: Path,
        *,
        state_path: Path | None = None,
        batch_size: int = 32,
        settle_s: float = 1.0,
        max_settle_wait_s: float = 60.0,
        policy: EventTimePolicy | None = None,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.directory = Path(directory).absolute()
        if not self.directory.is_dir():
            raise SourceError(f"--watch {directory}: not a directory; create it or pass an existing one")
        self.processed = self.directory / "processed"
        self.rejected = self.directory / "rejected"
        self.processed.mkdir(exist_ok=True)
        self.rejected.mkdir(exist_ok=True)
        key = hashlib.sha1(str(self.directory).encode()).hexdigest()[:16]
        base = state_path or settings.state_dir / "images" / key
        self.journal = HashJournal(base.with_suffix(".journal"))
        self.floors_path = base.with_suffix(".floors.json")
        self.batch_size = batch_size
        self.settle_s = settle_s
        self.max_settle_wait_s = max_settle_wait_s
        #: Window for the event time of a file (its mtime): the shared event-time policy.
        self.policy = policy or EventTimePolicy()
        self.unsettled: list[Path] = []
        self._seen: dict[Path, tuple[int, int]] = {}
        self._readback = readback
        self._topics = readback.source_topics(settings, "image")
        self.published = 0
        self.rejected_count = 0
        self._recover()

    # -- recovery -------------------------------------------------------------------------
    def _recover(self) -> None:
        """Resolve intents of a previous run that was killed between send and journal."""
        pending = [d for d, tag in self.journal.items() if tag == "I"]
        floors = (read_json(self.floors_path) or {}).get("floors")
        if pending:
            if floors is None:
                raise SourceError(
                    f"journal has in-flight images but {self.floors_path} is missing; "
                    "delete the journal to re-publish (may duplicate)"
                )
            found = self._readback.published_ids(self.settings, self._topics, floors)
            done = [(found[d], d) for d in pending if d in found]
            self.journal.add_many(done)
            log.info("recovered %d of %d in-flight images from the topics", len(done), len(pending))
        self._floors = self._readback.end_offsets(self.settings, self._topics)
        self._save_floors()

    def _save_floors(self) -> None:
        write_json(self.floors_path, {"floors": self._floors})

    def _raise_floors(self, futures: list[Any]) -> None:
        """After a batch is acked and journaled: nothing later can land below these offsets
        (a partition keeps send order), so a restart reads back only what came after."""
        for fut in futures:
            md = fut.value
            parts = self._floors.setdefault(md.topic, {})
            parts[str(md.partition)] = max(parts.get(str(md.partition), 0), md.offset + 1)
        self._save_floors()

    # -- scanning -------------------------------------------------------------------------
    def candidates(self, *, wait_settle: bool = True) -> list[Path]:
        """Files ready to take, in name order: every regular file but dot-files and ``.label``
        sidecars (an orphan sidecar is taken, to be rejected), each once it has settled: its mtime
        at least ``settle_s`` old and its size and mtime unchanged since the previous scan.

        Files not yet settled are listed in ``self.unsettled``. ``wait_settle=False`` takes every
        file at once (tests, and callers that know the writers are done).
        """
        now = time.time()
        ready: list[Path] = []
        current: dict[Path, tuple[int, int]] = {}
        self.unsettled = []
        entries = sorted((e for e in os.scandir(self.directory) if e.is_file() and not e.name.startswith(".")),
                         key=lambda e: e.name)
        names = {e.name for e in entries}
        stems = {os.path.splitext(n)[0] for n in names if not n.endswith(".label")}
        for entry in entries:
            if entry.name.endswith(".label") and (entry.name[: -len(".label")] in names
                                                   or entry.name[: -len(".label")] in stems):
                continue  # a sidecar: it moves with its image
            st = entry.stat()
            sig = (st.st_size, st.st_mtime_ns)
            path = Path(entry.path)
            current[path] = sig
            previous = self._seen.get(path)
            age = now - st.st_mtime
            # An mtime ahead of the clock cannot age: unchanged over one scan interval has to do
            # (such a file is then rejected for its event time, see _load).
            if not wait_settle or (age >= self.settle_s and previous in (None, sig)) or (age < 0 and previous == sig):
                ready.append(path)
            else:
                self.unsettled.append(path)
        self._seen = current
        return ready

    def _load(self, path: Path) -> _Item | None:
        try:
            st = path.stat()
            if st.st_size > MAX_FILE_BYTES:  # never read a huge file whole: keep its head as the dead letter
                digest = _file_sha256(path)
                with path.open("rb") as fh:
                    head = fh.read(64 * 1024)
                return _Item(path, head, digest, None, ImageValidationError(
                    f"file is {st.st_size} bytes, over the {MAX_FILE_BYTES}-byte image limit", "too_large"))
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:  # e.g. permissions: left in place and retried on the next scan
            log.warning("%s: cannot read (%s); leaving it in place", path, exc)
            return None
        digest = hashlib.sha256(data).hexdigest()
        if path.name.endswith(".label"):
            return _Item(path, data, digest, None, ImageValidationError(
                f"label file {path.name} has no image beside it (x.png.label or x.label labels x.png)",
                "orphan_label"))
        try:
            info = inspect(data, path.name)
            timestamp = int(st.st_mtime * 1000)
            problems = self.policy.problems(timestamp)
            if problems:
                raise ImageValidationError(f"file time (mtime): {problems[0]}", problems[0].reason)
            rec = image_record(data, info, label=label_for(path), source=path.name, timestamp=timestamp)
            return _Item(path, data, digest, rec, None)
        except ImageValidationError as exc:
            return _Item(path, data, digest, None, exc)

    def process(self, paths: list[Path]) -> int:
        """Publish/reject one batch of files durably, then move them. Returns files handled."""
        items = [it for it in (self._load(p) for p in paths) if it is not None]
        todo: list[_Item] = []
        for it in items:  # two files with the same bytes are one image: publish it once
            if self.journal.get(it.digest) not in ("P", "R") and all(t.digest != it.digest for t in todo):
                todo.append(it)
        # Intent first, so a kill after the send is resolved from the topics, not re-sent blindly.
        self.journal.add_many([("I", it.digest) for it in todo if self.journal.get(it.digest) != "I"])
        futures = []
        for it in todo:
            if it.record is not None:
                try:
                    fut = self.publisher.publish(
                        "image",
                        it.record,
                        key=it.record["image_id"],
                        headers=[(EVENT_ID_HEADER, it.digest.encode()), *self.policy.headers()],
                    )
                    futures.append((it, "P", fut))
                    continue
                except (RecordTooLargeError, SchemaError) as exc:  # over the record size limit, bad label
                    it.record = None
                    it.error = ImageValidationError(f"cannot be published: {exc}", "unpublishable")
            if it.record is None:
                assert it.error is not None
                fut = self.publisher.dead_letter(
                    "image",
                    it.data,
                    stage="validate",
                    error=it.error,
                    source={"file": str(it.path), "reason": it.error.reason},
                    key=it.digest,
                )
                futures.append((it, "R", fut))
        self.publisher.flush()
        for _it, _tag, fut in futures:
            fut.get(timeout=60)  # raises: nothing is journaled or moved, the restart resolves it
        self.journal.add_many([(tag, it.digest) for it, tag, _ in futures])
        self.published += sum(1 for _, tag, _ in futures if tag == "P")
        self.rejected_count += sum(1 for _, tag, _ in futures if tag == "R")
        for it in items:
            self._move(it)
        if futures:
            self._raise_floors([fut for _, _, fut in futures])
        return len(items)

    def _move(self, it: _Item) -> None:
        tag = self.journal.get(it.digest)
        target_dir = self.processed if tag == "P" else self.rejected
        if it.path.name.endswith(".label"):  # an orphan sidecar: it has no sidecars of its own
            (target_dir / (it.path.name + ".reason")).write_text(f"orphan_label: {it.error}\n", encoding="utf-8")
            self._replace(it, target_dir)
            return
        if tag == "R":
            if it.error is None:  # recorded rejected by an older run with other limits: keep that verdict
                it.error = ImageValidationError("rejected by an earlier run", "rejected_earlier")
            (target_dir / (it.path.name + ".reason")).write_text(f"{it.error.reason}: {it.error}\n", encoding="utf-8")
        for sidecar in (it.path.with_name(it.path.name + ".label"), it.path.with_suffix(".label")):
            if sidecar.exists() and sidecar != it.path:
                os.replace(sidecar, target_dir / sidecar.name)
        self._replace(it, target_dir)

    def _replace(self, it: _Item, target_dir: Path) -> None:
        target = target_dir / it.path.name
        if target.exists():  # same name processed before (other content): keep both
            target = target_dir / f"{it.path.stem}.{it.digest[:12]}{it.path.suffix}"
        try:
            os.replace(it.path, target)
        except FileNotFoundError:
            log.warning("%s vanished before it could be moved to %s", it.path, target_dir.name)

    def run(
        self, *, follow: bool = True, poll_s: float = 0.5, stop: Any = None, idle_exit_s: float | None = None
    ) -> None:
        """Scan and process until ``stop`` (a threading.Event) is set; once when not ``follow``.

        Once (not ``follow``) still waits for files that are being written, up to
        ``max_settle_wait_s``; a file that does not settle by then is logged and left in place.
        """
        last_work = started = time.monotonic()
        while True:
            ready = self.candidates()
            for i in range(0, len(ready), self.batch_size):
                self.process(ready[i : i + self.batch_size])
            if ready:
                last_work = time.monotonic()
            if stop is not None and stop.is_set():
                return
            if not follow:
                if not self.unsettled:
                    return
                if time.monotonic() - started > self.max_settle_wait_s:
                    for path in self.unsettled:
                        log.warning("%s is still being written after %.0f s; left in place for the next run",
                                    path, self.max_settle_wait_s)
                    return
            if idle_exit_s is not None and time.monotonic() - last_work > idle_exit_s:
                return
            if stop is not None:
                stop.wait(poll_s)
            else:
                time.sleep(poll_s)  # poll interval of a directory watcher, not a test wait

    def close(self) -> None:
        self.journal.close()
