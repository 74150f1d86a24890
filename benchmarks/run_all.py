"""`make bench`: run every benchmark against one broker, write one JSON and a markdown table.

Each benchmark module exposes ``run(settings) -> dict`` and reports ratios against a baseline
measured in the same run. A benchmark that fails is recorded with its error; the others still run.

    python -m benchmarks.run_all [--only sdk,stream]
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import REPORT_DIR, bench_settings, fresh, machine

BENCHMARKS = ["bench_sdk", "bench_ingest_tailer", "bench_gateway", "bench_stream", "bench_serving",
              "bench_learning", "bench_platform", "bench_broker_crash"]


def _rows(name: str, result: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(benchmark, figure, value, baseline, ratio/goal) rows from the ``table`` a benchmark returns."""
    rows = []
    for row in result.get("table", []):
        rows.append((name, str(row.get("figure")), str(row.get("value")), str(row.get("baseline")),
                     f"{row.get('ratio')} (goal {row.get('goal')})"))
    return rows


def _auto_table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A table for benchmarks that return nested ``*_ratio`` fields rather than a ``table``."""
    out = []

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k.endswith("ratio") and isinstance(v, (int, float)):
                    goal = node.get(k.replace("ratio", "goal"))
                    out.append({"figure": f"{prefix}{k}", "value": v, "baseline": "same run", "ratio": v,
                                "goal": goal})
                else:
                    walk(f"{prefix}{k}.", v)

    walk("", result)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", help="comma-separated benchmark names (e.g. bench_sdk,bench_stream)")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",")] if args.only else BENCHMARKS
    results: dict[str, Any] = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "benchmarks": {}}
    rows: list[tuple[str, str, str, str, str]] = []
    with bench_settings() as settings:
        for name in names:
            started = time.monotonic()
            try:
                module = importlib.import_module(f"benchmarks.{name}")
            except ImportError as exc:
                results["benchmarks"][name] = {"error": f"not available: {exc}"}
                continue
            try:
                result = module.run(fresh(settings))
            except Exception as exc:  # noqa: BLE001 - one failing benchmark must not hide the others
                results["benchmarks"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                               "traceback": traceback.format_exc()}
                rows.append((name, "error", type(exc).__name__, "", ""))
                continue
            result.setdefault("seconds", round(time.monotonic() - started, 1))
            if "table" not in result:
                result["table"] = _auto_table(result)
            results["benchmarks"][name] = result
            rows += _rows(name, result)
            print(f"{name}: done in {result['seconds']} s", flush=True)
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    (REPORT_DIR / "all.json").write_text(json.dumps(results, indent=2, default=str))
    table = ["| benchmark | figure | value | baseline | ratio (goal) |", "|---|---|---|---|---|"]
    table += [f"| {' | '.join(r)} |" for r in rows]
    Path(REPORT_DIR / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"\nwritten: {REPORT_DIR / 'all.json'} and {REPORT_DIR / 'table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
