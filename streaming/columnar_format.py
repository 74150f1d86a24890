"""The columnar store's layout: Arrow schemas, partition paths, manifests and durable Parquet writes.

Split from :mod:`streaming.columnar` (which decides *what* to compact) so the on-disk contract lives in
one place that the query side (:mod:`streaming.query`) reads too. Layout (docs/COLUMNAR.md)::

    <columnar_dir>/features/namespace=<ns>/kind=<kind>/_manifest.json
    <columnar_dir>/features/namespace=<ns>/kind=<kind>/date=<YYYY-MM-DD>/part-<digest>.parquet
    <columnar_dir>/predictions/model=<model>/_manifest.json
    <columnar_dir>/predictions/model=<model>/date=<YYYY-MM-DD>/part-<digest>.parquet

Hive-style directory names, so pyarrow.dataset, DuckDB (``hive_partitioning=true``) and pandas read the
tree as it is; partition values are not repeated inside the files. ``_manifest.json`` (ignored by those
readers: leading ``_``) is the commit point: a Parquet file exists for our queries iff the manifest
lists it. A file on disk that the manifest does not list is the leftover of a crashed step and is
deleted by the next compaction (:func:`remove_orphans`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streaming.config import Settings
from streaming.exceptions import ColumnarError
from streaming.fsutil import fsync_dir, write_json_atomic, write_synced

MANIFEST_NAME = "_manifest.json"
MANIFEST_FORMAT = 1
#: Rows per Parquet row group: the unit of min/max pruning of a time-range query.
ROW_GROUP_ROWS = 16_384
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_DAY_MS = 86_400_000

#: One feature row. ``labels`` is a map (label name -> value, null when absent) so every kind and every
#: featurizer version share one schema; ``x`` keeps the featurizer's float32 values.
FEATURE_SCHEMA = pa.schema([
    ("event_time_ms", pa.int64()),
    ("key", pa.string()),
    ("topic", pa.string()),
    ("partition", pa.int32()),
    ("offset", pa.int64()),
    ("batch_id", pa.string()),
    ("featurizer_version", pa.string()),
    ("labels", pa.map_(pa.string(), pa.float64())),
    ("x", pa.list_(pa.float32())),
])
FEATURE_PARTITIONING = pa.schema([("namespace", pa.string()), ("kind", pa.string()), ("date", pa.string())])

#: One answer of a model. ``model`` is the partition directory; ``answer_time_ms`` is the Kafka
#: timestamp of the prediction record, ``request_time_ms`` that minus its ``latency_ms``.
PREDICTION_SCHEMA = pa.schema([
    ("answer_time_ms", pa.int64()),
    ("request_time_ms", pa.int64()),
    ("request_id", pa.string()),
    ("model_version", pa.int32()),
    ("outputs", pa.list_(pa.float64())),
    ("predicted_label", pa.string()),
    ("latency_ms", pa.float64()),
    ("error", pa.string()),
    ("input_topic", pa.string()),
    ("input_partition", pa.int32()),
    ("input_offset", pa.int64()),
    ("topic", pa.string()),
    ("partition", pa.int32()),
    ("offset", pa.int64()),
])
PREDICTION_PARTITIONING = pa.schema([("model", pa.string()), ("date", pa.string())])


def columnar_root(settings: Settings) -> Path:
    """``STREAMLEARN_COLUMNAR_DIR``, else ``HOME/columnar`` (``HOME/tenants/<tenant>/columnar`` for a tenant's
    process, so two tenants sharing a HOME never read or write each other's copy)."""
    if settings.columnar_dir:
        return Path(settings.columnar_dir).expanduser().absolute()
    if settings.tenant:
        return settings.home / "tenants" / settings.tenant / "columnar"
    return settings.home / "columnar"


def check_name(what: str, value: str, error: type[Exception] = ColumnarError) -> str:
    """A name that becomes a directory: letters, digits, ``.``, ``_``, ``-`` (no ``/``, no ``..``)."""
    if not isinstance(value, str) or not _NAME_RE.match(value) or value in (".", ".."):
        raise error(f"{what}: {value!r} must be 1-100 letters, digits, '.', '_' or '-', starting with a letter "
                    "or digit")
    return value


def features_dir(root: Path, namespace: str, kind: str) -> Path:
    return root / "features" / f"namespace={check_name('namespace', namespace)}" / f"kind={check_name('kind', kind)}"


def predictions_dir(root: Path, model: str) -> Path:
    return root / "predictions" / f"model={check_name('model', model)}"


def day_of(ms: int) -> str:
    """The UTC date of an epoch-ms time, as its partition value ``YYYY-MM-DD``."""
    return str(np.datetime64(int(ms) // _DAY_MS, "D"))


def days_of(times: np.ndarray) -> np.ndarray:
    """:func:`day_of` of an int64 array (vectorised)."""
    return (np.asarray(times, dtype=np.int64) // _DAY_MS).astype("datetime64[D]").astype(str)


def new_manifest(**fields: Any) -> dict[str, Any]:
    """An empty manifest: no files yet."""
    return {"format": MANIFEST_FORMAT, "files": [], **fields}


def load_manifest(directory: Path, **empty: Any) -> dict[str, Any]:
    """The manifest of a partition directory, or a new empty one (``empty`` are its extra fields)."""
    path = directory / MANIFEST_NAME
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return new_manifest(**empty)
    except (OSError, ValueError) as exc:
        raise ColumnarError(f"columnar manifest {path} is unreadable ({exc}); delete the directory {directory} "
                            "and run `streamlearn store compact` again to rebuild it from the store") from exc
    if data.get("format") != MANIFEST_FORMAT:
        raise ColumnarError(f"columnar manifest {path}: format {data.get('format')!r} is not {MANIFEST_FORMAT}; "
                            f"delete {directory} and compact again")
    return data


def save_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """The commit point of a compaction step: temp file, fsync, rename, directory fsync."""
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / MANIFEST_NAME, manifest, indent=None)


def table_bytes(table: pa.Table) -> bytes:
    """The Parquet bytes of ``table`` (zstd, dictionary-encoded strings, small row groups for pruning)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS, write_statistics=True)
    return buf.getvalue()


def write_parquet(directory: Path, relpath: str, table: pa.Table) -> dict[str, Any]:
    """Write ``table`` durably at ``directory/relpath`` (temp file + fsync + rename + directory fsync);
    returns its manifest entry fields ``path``, ``sha256``, ``size_bytes``, ``rows``.

    The bytes are built in memory first (one step's rows, bounded by the caller), so the sha256 is the
    one of exactly what was renamed into place.
    """
    data = table_bytes(table)
    final = directory / relpath
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        write_synced(tmp, data)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(final.parent)
    return {"path": relpath, "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data),
            "rows": table.num_rows}


def remove_orphans(directory: Path, manifest: dict[str, Any]) -> int:
    """Delete Parquet and temp files under ``directory`` that ``manifest`` does not list: what a step
    killed before its manifest left. Returns how many went. Run under :func:`compaction_lock`."""
    listed = {f["path"] for f in manifest.get("files", [])}
    removed = 0
    if not directory.is_dir():
        return 0
    for sub in directory.iterdir():
        if not (sub.is_dir() and sub.name.startswith("date=")):
            continue
        for path in sub.iterdir():
            rel = f"{sub.name}/{path.name}"
            if (path.name.endswith(".parquet") and rel not in listed) or path.name.endswith(".tmp"):
                path.unlink()
                removed += 1
    return removed


@contextlib.contextmanager
def compaction_lock(directory: Path) -> Iterator[None]:
    """One compactor per partition directory at a time (an ``flock``, released by the kernel when the
    process dies, so a crashed compactor never blocks the next run)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ColumnarError(f"another compaction is running on {directory}; wait for it to finish "
                                "(runs are incremental: the next one picks up what it missed)") from exc
        yield
    finally:
        os.close(fd)


def part_name(sources: list[str], day: str) -> str:
    """Deterministic file name of one step's rows of one day: a re-run of a crashed step writes the same name."""
    digest = hashlib.sha256(("\n".join(sorted(sources)) + "\n" + day).encode()).hexdigest()[:24]
    return f"date={day}/part-{digest}.parquet"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
