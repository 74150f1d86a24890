"""The demo report's PNGs, drawn from ``observations.json`` alone (see streamlearn/report.py).

Rules the plots keep, because a person reads them at a glance: one time axis (seconds since the demo
started, the same limits in every time plot); legends outside the data; every model version shown,
with the candidate, the model it would replace and the baseline side by side and the direction of
"better" in the title; rates drawn as steps over the interval they were measured on, so nothing is
interpolated between samples (no invented ramp to 0 at the end).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from streaming.topics import MODELS  # noqa: E402

COLORS = {m: f"C{i}" for i, m in enumerate(MODELS)}
DPI = 90


def render_plots(obs: dict[str, Any], out: Path) -> list[Path]:
    paths = [out / "scores.png", out / "latency.png", out / "throughput.png"]
    plot_scores(obs, paths[0])
    plot_latency(obs, paths[1])
    plot_throughput(obs, paths[2])
    return paths


def _time_axis(ax: Any, obs: dict[str, Any]) -> None:
    """The shared time axis: 0 = demo start, to the end of the run; traffic stop marked."""
    ax.set_xlim(0, max(1.0, float(obs["ended_s"])))
    ax.set_xlabel("seconds since the demo started")
    stop = obs.get("traffic_stopped_s")
    if stop is not None:
        ax.axvspan(stop, float(obs["ended_s"]), color="0.85", alpha=0.5, lw=0)
    ax.grid(True, alpha=0.3)


def _stop_handle() -> Any:
    return plt.Rectangle((0, 0), 1, 1, color="0.85", alpha=0.5, label="traffic stopped, workers draining")


def plot_scores(obs: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, len(MODELS), figsize=(5.2 * len(MODELS), 4.6), squeeze=False)
    seen: set[str] = set()
    for ax, model in zip(axes[0], MODELS, strict=True):
        versions = sorted(obs["versions"].get(model, []), key=lambda d: int(d["version"]))
        metric = next((d.get("metric") for d in versions if d.get("metric")), "score")
        direction = next((d.get("direction") for d in versions if d.get("direction")), None)
        better = {"max": "higher is better ↑", "min": "lower is better ↓"}.get(str(direction), "direction unknown")
        ax.set_title(f"{model}\n{metric} on held-out rows — {better}", fontsize=10)
        if not versions:
            ax.text(0.5, 0.5, "no version trained", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            continue
        xs = [int(d["version"]) for d in versions]
        cand = [d.get("candidate") for d in versions]
        pts = [(x, c) for x, c in zip(xs, cand, strict=True) if c is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color="0.6", lw=1, zorder=1)
        for d, x in zip(versions, xs, strict=True):
            c = d.get("candidate")
            if c is None:
                ax.annotate("no score", (x, 0.5), xycoords=("data", "axes fraction"), ha="center", fontsize=7,
                            rotation=90, color="0.4")
                continue
            decision = str(d.get("decision") or "").upper()
            seen.add("promoted" if decision.startswith("PROMOT") else "rejected" if decision.startswith("REJECT")
                     else "undecided")
            if decision.startswith("PROMOT"):
                ax.scatter([x], [c], marker="o", s=46, color="tab:green", zorder=3)
            elif decision.startswith("REJECT"):
                ax.scatter([x], [c], marker="X", s=52, color="tab:red", zorder=3)
            else:
                ax.scatter([x], [c], marker="o", s=40, color="0.5", zorder=3)
        cur = [(x, d["current"]) for x, d in zip(xs, versions, strict=True) if d.get("current") is not None]
        base = [(x, d["baseline"]) for x, d in zip(xs, versions, strict=True) if d.get("baseline") is not None]
        notes = []
        if cur:
            seen.add("current")
        elif len(versions) == 1:
            notes.append("first version: no current model to compare with")
        if base:
            seen.add("baseline")
        else:
            notes.append("no baseline score in the versions' metadata")
        if cur:
            ax.scatter([p[0] for p in cur], [p[1] for p in cur], marker="s", s=46, facecolors="none",
                       edgecolors="black", zorder=2)
        if base:
            ax.plot([p[0] for p in base], [p[1] for p in base], "--^", color="tab:blue", ms=5, lw=1, zorder=2)
        values = [v for v in cand if v is not None] + [p[1] for p in cur] + [p[1] for p in base]
        if values:
            lo, hi = min(values), max(values)
            pad = (hi - lo) * 0.15 or max(abs(hi) * 0.05, 0.05)
            ax.set_ylim(lo - pad, hi + pad)
            if len({round(v, 9) for v in cand if v is not None}) == 1 and len(pts) > 1:
                notes.append(f"every version scored {pts[0][1]:.4g}: the metric cannot tell them apart")
        if notes:
            ax.text(0.5, 0.04, "\n".join(notes), ha="center", va="bottom", transform=ax.transAxes, fontsize=8,
                    color="0.35")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"v{d['version']}" + (f"\n{d['created_s']:.0f}s" if d.get("created_s") is not None
                                                   else "") for d in versions], fontsize=8)
        if len(xs) == 1:
            ax.set_xlim(xs[0] - 1, xs[0] + 1)
        ax.set_xlabel("version (trained at, seconds since the demo started)", fontsize=8)
        ax.set_ylabel(str(metric))
        ax.grid(True, axis="y", alpha=0.3)
    kinds = {"promoted": Line2D([], [], marker="o", ls="", color="tab:green", label="candidate, promoted"),
             "rejected": Line2D([], [], marker="X", ls="", color="tab:red", label="candidate, rejected by the gate"),
             "undecided": Line2D([], [], marker="o", ls="", color="0.5", label="candidate, no gate decision"),
             "current": Line2D([], [], marker="s", ls="", mfc="none", mec="black",
                               label="current model on the same rows"),
             "baseline": Line2D([], [], marker="^", ls="--", color="tab:blue", label="baseline (trivial model)")}
    handles = [h for k, h in kinds.items() if k in seen]
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False, fontsize=9)
    fig.suptitle("model quality per version: candidate vs the model it would replace vs a baseline", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_latency(obs: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(12, 4.8))
    first = obs.get("first_answer_s", {})
    handles: list[Any] = []
    for model in MODELS:
        rows = [r for r in obs["predictions"] if r[1] == model]
        f = first.get(model)
        steady = [(r[0], r[3] * 1000) for r in rows if f is None or r[0] - r[3] >= f]
        cold = [(r[0], r[3] * 1000) for r in rows if f is not None and r[0] - r[3] < f]
        color = COLORS[model]
        if steady:
            ax.scatter([p[0] for p in steady], [p[1] for p in steady], s=5, color=color, alpha=0.6, lw=0)
        if cold:
            ax.scatter([p[0] for p in cold], [p[1] for p in cold], s=14, marker="x", color=color, alpha=0.6, lw=0.8)
        for t, m, _ in obs["swaps"]:
            if m == model:
                ax.axvline(t, color=color, ls=":", lw=1, alpha=0.7)
        if f is not None:
            ax.axvline(f, color=color, ls="-", lw=1.5, alpha=0.8)
        handles.append(Line2D([], [], marker="o", ls="", color=color, label=f"{model} ({len(rows)} predictions)"))
    handles += [Line2D([], [], marker="x", ls="", color="0.3", label="queued before the model's first answer"),
                Line2D([], [], ls="-", lw=1.5, color="0.3", label="model's first answer"),
                Line2D([], [], ls=":", color="0.3", label="model version swap"), _stop_handle()]
    if obs["predictions"]:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no predictions", ha="center", va="center", transform=ax.transAxes)
    _time_axis(ax, obs)
    ax.set_ylabel("latency, ms (request sent → prediction produced)")
    ax.set_title("prediction latency per request")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_throughput(obs: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(12, 4.8))
    samples = obs["samples"]
    series = [(f"{k} events", t, f"C{i + len(MODELS)}", "-") for i, (k, t) in enumerate(obs["raw_topics"].items())]
    series += [(f"{m} predictions", t, COLORS[m], "--") for m, t in obs["prediction_topics"].items()]
    handles: list[Any] = []
    if len(samples) >= 2:
        edges = [float(s["t_s"]) for s in samples]
        for label, topic, color, ls in series:
            rates = [max(0.0, (b["end_offsets"].get(topic, 0) - a["end_offsets"].get(topic, 0))
                         / max(1e-6, float(b["t_s"]) - float(a["t_s"]))) for a, b in zip(samples, samples[1:],
                                                                                          strict=False)]
            ax.stairs(rates, edges, color=color, ls=ls, lw=1.3, baseline=None)
            handles.append(Line2D([], [], color=color, ls=ls, label=label))
    else:
        ax.text(0.5, 0.5, "fewer than two samples", ha="center", va="center", transform=ax.transAxes)
    handles.append(_stop_handle())
    _time_axis(ax, obs)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("records/s (mean over each sampling interval)")
    ax.set_title("throughput per topic")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
