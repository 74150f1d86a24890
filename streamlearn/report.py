"""The demo's report: ``reports/<timestamp>/summary.json`` and PNG plots.

Plots: prequential score of each model version over time (the gate's held-out score, marked by
its decision), prediction latency over time with the swaps marked, throughput per topic.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from streaming.config import Settings  # noqa: E402
from streaming.topics import KINDS, MODELS, dead_letter_topic, predictions_topic, raw_topic  # noqa: E402
from streamlearn.observe import Observer, percentile  # noqa: E402


def write_report(settings: Settings, observer: Observer, supervisor: Any, generators: list[Any],
                 requesters: list[Any], exit_codes: dict[str, int | None], started: float,
                 root: Path = Path("reports")) -> Path:
    out = root / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    out.mkdir(parents=True, exist_ok=True)
    last = observer.samples[-1]
    rows = observer.predictions.rows
    swaps = observer.predictions.swaps()
    models: dict[str, Any] = {}
    for model in MODELS:
        lat = [r[3] for r in rows if r[1] == model]
        info = last.models.get(model, {})
        models[model] = {
            "versions": info.get("versions", []), "promoted": info.get("promoted"),
            "gate": info.get("detail", []), "predictions": len(lat),
            "errors": sum(1 for r in rows if r[1] == model and r[4]),
            "latency_p50_ms": percentile(lat, 50), "latency_p99_ms": percentile(lat, 99),
            "versions_answering": sorted({r[2] for r in rows if r[1] == model}),
            "swaps": sum(1 for s in swaps if s[1] == model),
            "requests_sent": next((r.sent for r in requesters if r.name == f"requests-{model}"), 0),
        }
    summary = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "bootstrap": settings.bootstrap,
        "events_published": {g.name: g.sent for g in generators},
        "events_on_topics": {k: last.end_offsets.get(raw_topic(settings, k), 0) for k in KINDS},
        "batches": last.batches,
        "stream_lag_at_end": last.lag,
        "dead_letters": {k: last.end_offsets.get(dead_letter_topic(settings, k), 0) for k in KINDS}
        | {"serving": last.end_offsets.get(dead_letter_topic(settings, "serving"), 0)},
        "models": models,
        "duplicated_predictions": observer.predictions.duplicates,
        "worker_restarts": sum(s["restarts"] for s in supervisor.status()),
        "restart_events": supervisor.events,
        "worker_exit_codes": exit_codes,
        "plots": ["scores.png", "latency.png", "throughput.png"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _plot_scores(last.models, out / "scores.png")
    _plot_latency(rows, swaps, out / "latency.png")
    _plot_throughput(observer, settings, out / "throughput.png")
    return out


def _plot_scores(models: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, len(MODELS), figsize=(5 * len(MODELS), 4), squeeze=False)
    for ax, model in zip(axes[0], MODELS, strict=True):
        detail = [d for d in models.get(model, {}).get("detail", []) if d.get("candidate") is not None]
        xs = [int(d["version"]) for d in detail]
        ax.plot(xs, [d["candidate"] for d in detail], "-", color="grey", alpha=0.5)
        for x, d in zip(xs, detail, strict=True):
            promoted = str(d.get("decision", "")).lower().startswith("promot")
            ax.scatter([x], [d["candidate"]], color="tab:green" if promoted else "tab:red", zorder=3)
            ax.annotate(f"v{d['version']}", (x, d["candidate"]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)
        metric = next((d.get("metric") for d in detail if d.get("metric")), "score")
        ax.set_title(f"{model}: prequential {metric} per version")
        ax.set_xlabel("version (green promoted, red rejected)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(str(metric))
        if not detail:
            ax.text(0.5, 0.5, "no version trained", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_latency(rows: list[tuple[float, str, int, float, bool]], swaps: list[tuple[float, str, int]],
                  path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 4))
    t0 = rows[0][0] if rows else time.time()
    for model in MODELS:
        pts = [(r[0] - t0, r[3]) for r in rows if r[1] == model]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=4, label=model, alpha=0.6)
    for t, model, version in swaps:
        ax.axvline(t - t0, color="black", alpha=0.3, linestyle="--")
        ax.annotate(f"{model} v{version}", (t - t0, ax.get_ylim()[1] * 0.9), rotation=90, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("seconds")
    ax.set_ylabel("latency ms (request → prediction produced)")
    ax.set_title("prediction latency, dashed lines = model swaps")
    if rows:
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_throughput(observer: Observer, settings: Settings, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 4))
    samples = observer.samples
    if len(samples) >= 2:
        t0 = samples[0].t
        topics = [raw_topic(settings, k) for k in KINDS] + [predictions_topic(settings, m) for m in MODELS]
        for topic in topics:
            xs, ys = [], []
            for a, b in zip(samples, samples[1:], strict=False):
                dt = max(1e-6, b.t - a.t)
                xs.append(b.t - t0)
                ys.append((b.end_offsets.get(topic, 0) - a.end_offsets.get(topic, 0)) / dt)
            ax.plot(xs, ys, label=topic.removeprefix(settings.topic_prefix))
        ax.legend(fontsize=7, ncol=2)
    ax.set_xlabel("seconds")
    ax.set_ylabel("records/s")
    ax.set_title("throughput per topic")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
