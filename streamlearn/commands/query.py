"""`streamlearn query features|predictions ...`: read the columnar store (docs/COLUMNAR.md).

The same functions as the control API's ``GET /query`` (:mod:`streaming.query`), so the CLI and the HTTP
route page, filter and refuse alike. Output: JSON lines (one row per line) on stdout by default, the
next page's cursor on stderr; ``--format parquet|arrow --output FILE`` writes the rows as one file.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from streaming import config
from streaming.timeargs import HELP as TIME_HELP
from streaming.timeargs import time_arg
from streamlearn.argtypes import count_arg


def _common(p: argparse.ArgumentParser) -> None:
    # event_time: backfilled rows go back to 1678, so a bound before 1970 is kept (not clamped to 0)
    p.add_argument("--start", type=time_arg("--start", event_time=True), metavar="T",
                   help=f"rows at or after T: {TIME_HELP}")
    p.add_argument("--end", type=time_arg("--end", event_time=True), metavar="T",
                   help=f"rows before T (exclusive): {TIME_HELP}")
    p.add_argument("--limit", type=count_arg, default=1000, help="rows per page (default 1000)")
    p.add_argument("--cursor", help="next_cursor of the previous page")
    p.add_argument("--all", action="store_true", help="follow next_cursor until the last page")
    p.add_argument("--format", choices=["json", "parquet", "arrow"], default="json",
                   help="json lines on stdout (default), or one Parquet / Arrow IPC stream file (needs --output)")
    p.add_argument("--output", metavar="FILE", help="write the rows here instead of stdout")
    p.add_argument("--max-rows", type=int, default=None, help=config.flag_help("query_max_rows"))
    p.add_argument("--max-scan-rows", type=int, default=None, help=config.flag_help("query_max_scan_rows"))
    p.add_argument("--max-bytes", type=int, default=None, help=config.flag_help("query_max_bytes"))
    p.add_argument("--timeout-s", type=float, default=None, help=config.flag_help("query_timeout_s"))


def register(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("query", help="query feature rows or predictions from the columnar (Parquet) store; "
                                     "fill it with `streamlearn store compact`")
    qsub = q.add_subparsers(dest="query_cmd", metavar="WHAT")
    qsub.required = True
    f = qsub.add_parser("features", help="feature rows by kind, namespace, time range, key and batch")
    f.add_argument("--kind", required=True, help="event kind (weblog, sensor, image, or a plugin's)")
    f.add_argument("--namespace", default="live", help="store namespace (default live)")
    f.add_argument("--key", help="only rows of this key (client ip, sensor id, image id)")
    f.add_argument("--batch", help="only rows of this feature batch id")
    _common(f)
    f.set_defaults(func=_features)
    p = qsub.add_parser("predictions", help="answers of a model by version, time range (answer time) and request id")
    p.add_argument("--model", required=True)
    p.add_argument("--version", type=count_arg, help="only answers of this model version")
    p.add_argument("--request-id", help="only the answer(s) to this request id")
    _common(p)
    p.set_defaults(func=_predictions)


def _limits(args: argparse.Namespace, settings: config.Settings) -> Any:
    from streaming.query import QueryLimits

    changes = {name: getattr(args, flag) for name, flag in (("query_max_rows", "max_rows"),
                                                            ("query_max_scan_rows", "max_scan_rows"),
                                                            ("query_max_bytes", "max_bytes"),
                                                            ("query_timeout_s", "timeout_s"))
               if getattr(args, flag) is not None}
    return QueryLimits.from_settings(settings.with_(**changes) if changes else settings)


class _Sink:
    """Where pages go, one at a time (memory holds one page, also with --all): JSON lines, or one
    Parquet / Arrow IPC stream file whose writer opens with the first page's schema."""

    def __init__(self, fmt: str, output: str | None) -> None:
        self.fmt, self.output = fmt, output
        self.text = (open(output, "w", encoding="utf-8") if output else sys.stdout) if fmt == "json" else None  # noqa: SIM115
        self.binary: Any = None
        self.writer: Any = None

    def write(self, page: Any) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.text is not None:
            for row in page.to_json()["rows"]:
                self.text.write(json.dumps(row, sort_keys=True) + "\n")
            return
        if self.writer is None:
            self.binary = open(str(self.output), "wb")  # noqa: SIM115
            self.writer = (pq.ParquetWriter(self.binary, page.table.schema, compression="zstd")
                           if self.fmt == "parquet" else pa.ipc.new_stream(self.binary, page.table.schema))
        self.writer.write_table(page.table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.binary is not None:
            self.binary.close()
        if self.text is not None and self.text is not sys.stdout:
            self.text.close()


def _emit(args: argparse.Namespace, fetch: Any) -> int:
    from streaming.query import QueryError

    if args.format != "json" and not args.output:
        raise QueryError(f"--output: --format {args.format} writes a binary file; name it with --output FILE")
    cursor = args.cursor
    sink = _Sink(args.format, args.output)
    try:
        while True:
            page = fetch(cursor)
            sink.write(page)
            cursor = page.next_cursor
            if cursor is None or not args.all:
                break
    finally:
        sink.close()
    if cursor is not None:
        print(f"next cursor (more rows): --cursor {cursor}", file=sys.stderr)
    return 0


def _features(args: argparse.Namespace, settings: config.Settings) -> int:
    from streaming.query import query_features

    limits = _limits(args, settings)
    return _emit(args, lambda cursor: query_features(
        settings, kind=args.kind, namespace=args.namespace, start_ms=args.start, end_ms=args.end, key=args.key,
        batch=args.batch, limit=args.limit, cursor=cursor, limits=limits))


def _predictions(args: argparse.Namespace, settings: config.Settings) -> int:
    from streaming.query import query_predictions

    limits = _limits(args, settings)
    return _emit(args, lambda cursor: query_predictions(
        settings, model=args.model, version=args.version, start_ms=args.start, end_ms=args.end,
        request_id=args.request_id, limit=args.limit, cursor=cursor, limits=limits))
