"""The demo's report: ``reports/<timestamp>/`` with ``summary.json``, ``observations.json`` and PNG plots.

Conventions, so the report reads the same everywhere:

* one time unit, the second: every instant is ``*_s`` seconds since the demo started (the start is
  given once, as ``started_utc``), every duration and latency is in seconds too;
* latency percentiles count only requests sent after their model first answered; requests that
  queued before any model existed are reported apart as the cold start;
* ``observations.json`` holds the raw series the plots are drawn from, so
  ``python -m streamlearn.report reports/<timestamp>`` redraws them without re-running the demo.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from streaming.config import Settings
from streaming.topics import KINDS, MODELS, dead_letter_topic, predictions_topic, raw_topic
from streamlearn.observe import Observer

PLOTS = ["scores.png", "latency.png", "throughput.png"]


def observations(settings: Settings, observer: Observer, supervisor: Any, started: float,
                 traffic_stopped: float | None, ended: float) -> dict[str, Any]:
    """The raw series behind the report, every instant in seconds since ``started``."""
    def rel(t: float) -> float:
        return round(t - started, 3)

    with observer.predictions.lock:
        rows = list(observer.predictions.rows)
    versions: dict[str, list[dict[str, Any]]] = {}
    for model in MODELS:
        out = []
        for v, d in sorted(observer.version_detail.get(model, {}).items()):
            item = {k: val for k, val in d.items() if k != "created_at_ms"}
            created = d.get("created_at_ms")
            item["created_s"] = rel(created / 1000.0) if isinstance(created, (int, float)) else None
            item["version"] = v
            out.append(item)
        versions[model] = out
    return {
        "started_unix_s": started,
        "traffic_stopped_s": rel(traffic_stopped) if traffic_stopped else None,
        "ended_s": rel(ended),
        "raw_topics": {k: raw_topic(settings, k) for k in KINDS},
        "prediction_topics": {m: predictions_topic(settings, m) for m in MODELS},
        "samples": [{"t_s": rel(s.t), "end_offsets": s.end_offsets} for s in observer.samples],
        "predictions": [[rel(t), m, v, round(lat / 1000.0, 6), bool(err)] for t, m, v, lat, err in rows],
        "first_answer_s": {m: rel(t) for m, t in observer.predictions.first_answers().items()},
        "swaps": [[rel(t), m, v] for t, m, v in observer.predictions.swaps()],
        "versions": versions,
        "restarts": [{**{k: v for k, v in e.items() if k != "t"}, "t_s": rel(float(e["t"]))}
                     for e in getattr(supervisor, "events", [])],
    }


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def latency_split(obs: dict[str, Any], model: str) -> tuple[list[float], list[float]]:
    """(latencies s of requests sent after ``model`` first answered, cold-start waits s)."""
    first = obs["first_answer_s"].get(model)
    steady: list[float] = []
    cold: list[float] = []
    for t, m, _, lat, _ in obs["predictions"]:
        if m == model:
            (cold if first is not None and t - lat < first else steady).append(lat)
    return steady, cold


def summarize(obs: dict[str, Any], settings: Settings, observer: Observer | None, supervisor: Any,
              generators: list[Any], requesters: list[Any], exit_codes: dict[str, int | None]) -> dict[str, Any]:
    """summary.json: the figures a person checks first, units in every name, seconds throughout."""
    last = observer.samples[-1] if observer is not None and observer.samples else None
    ends = last.end_offsets if last is not None else (obs["samples"][-1]["end_offsets"] if obs["samples"] else {})
    models: dict[str, Any] = {}
    for model in MODELS:
        steady, cold = latency_split(obs, model)
        preds = [r for r in obs["predictions"] if r[1] == model]
        info = last.models.get(model, {}) if last is not None else {}
        models[model] = {
            "versions": info.get("versions", [d["version"] for d in obs["versions"].get(model, [])]),
            "promoted_version": info.get("promoted"),
            "first_answer_s": obs["first_answer_s"].get(model),
            "predictions": len(preds),
            "prediction_errors": sum(1 for r in preds if r[4]),
            "latency_after_first_answer_s": {"count": len(steady), "p50": _pct(steady, 50), "p99": _pct(steady, 99),
                                             "max": _pct(steady, 100)},
            "cold_start_wait_s": {"requests": len(cold), "p50": _pct(cold, 50), "max": _pct(cold, 100)},
            "versions_answering": sorted({r[2] for r in preds}),
            "swaps": sum(1 for s in obs["swaps"] if s[1] == model),
            "requests_sent": next((r.sent for r in requesters if r.name == f"requests-{model}"), 0),
            "scores": obs["versions"].get(model, []),
        }
    status = supervisor.status() if supervisor is not None else []
    return {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(obs["started_unix_s"])),
        "duration_s": obs["ended_s"],
        "traffic_stopped_s": obs["traffic_stopped_s"],
        "bootstrap": settings.bootstrap,
        "events_published": {g.name: g.sent for g in generators},
        "events_publish_errors": {g.name: g.errors for g in generators if getattr(g, "errors", 0)},
        "events_on_topics": {k: ends.get(raw_topic(settings, k), 0) for k in KINDS},
        "batches": last.batches if last is not None else {},
        "stream_lag_records_at_end": last.lag if last is not None else {},
        "dead_letters": {k: ends.get(dead_letter_topic(settings, k), 0) for k in KINDS}
        | {"serving": ends.get(dead_letter_topic(settings, "serving"), 0)},
        "models": models,
        "duplicated_predictions": observer.predictions.duplicates if observer is not None else 0,
        "worker_restarts": sum(s["restarts"] for s in status),
        "restart_events": obs["restarts"],
        "worker_exit_codes": exit_codes,
        "plots": PLOTS,
    }


def write_report(settings: Settings, observer: Observer, supervisor: Any, generators: list[Any],
                 requesters: list[Any], exit_codes: dict[str, int | None], started: float,
                 root: Path = Path("reports"), traffic_stopped: float | None = None) -> Path:
    out = root / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    out.mkdir(parents=True, exist_ok=True)
    obs = observations(settings, observer, supervisor, started, traffic_stopped, time.time())
    (out / "observations.json").write_text(json.dumps(obs, default=str))
    summary = summarize(obs, settings, observer, supervisor, generators, requesters, exit_codes)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    from streamlearn.plots import render_plots

    render_plots(obs, out)
    return out


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s"


def _score_text(s: dict[str, Any] | None) -> str:
    if not s or s.get("candidate") is None:
        return "no score"
    arrow = {"max": "↑", "min": "↓"}.get(str(s.get("direction")), "")
    text = f"{s.get('metric') or 'score'}{arrow} {s['candidate']:.3g}"
    if s.get("baseline") is not None:
        text += f" (baseline {s['baseline']:.3g})"
    return text


def _kept_text(versions: list[Any]) -> str:
    """Which versions are on disk: retention keeps the newest ones (and the promoted one with its rollback
    targets), so "v19 of 15 versions" would read as a miscount; "15 kept, v5-v19" does not."""
    numbers = sorted(int(v) for v in versions)
    if not numbers:
        return "no versions kept"
    if len(numbers) == 1:
        return f"1 version kept, v{numbers[0]}"
    return f"{len(numbers)} versions kept, v{numbers[0]}-v{numbers[-1]}"


def summary_lines(summary: dict[str, Any], report: Path | None = None) -> list[str]:
    """The terminal summary: what a person needs in ten seconds (details stay in summary.json)."""
    events = sum(summary["events_on_topics"].values())
    dead = sum(summary["dead_letters"].values())
    batches = sum(summary["batches"].values()) if summary["batches"] else 0
    lines = [f"demo ran {summary['duration_s']:.0f} s: {events:,} events on topics, {batches:,} batches, "
             f"{dead:,} dead letters, {summary['duplicated_predictions']} duplicated predictions, "
             f"{summary['worker_restarts']} worker restarts"]
    for model, m in summary["models"].items():
        promoted = m.get("promoted_version")
        score = next((s for s in m["scores"] if s.get("version") == promoted), None)
        lat = m["latency_after_first_answer_s"]
        cold = m["cold_start_wait_s"]
        first = m.get("first_answer_s")
        lines.append(
            f"  {model:18} serving v{promoted if promoted is not None else '-'} "
            f"({_kept_text(m['versions'])}), "
            f"{_score_text(score)}; latency p50 {_fmt_s(lat['p50'])} p99 {_fmt_s(lat['p99'])} "
            f"(first answer at {_fmt_s(first)}, {cold['requests']} requests queued before it)")
    if report is not None:
        lines.append(f"  report: {report}/ (summary.json, {', '.join(summary['plots'])})")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Redraw a report's plots from its observations.json: ``python -m streamlearn.report DIR``."""
    from streamlearn.plots import render_plots

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m streamlearn.report reports/<timestamp>", file=sys.stderr)
        return 2
    out = Path(args[0])
    render_plots(json.loads((out / "observations.json").read_text()), out)
    summary = out / "summary.json"
    if summary.exists():
        print("\n".join(summary_lines(json.loads(summary.read_text()), out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
