"""The demo's live terminal dashboard (rich), or one status line every few seconds without a TTY."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from streaming.topics import KINDS, MODELS, dead_letter_topic, predictions_topic, raw_topic
from streamlearn.observe import Observer, percentile


class Dashboard:
    def __init__(self, observer: Observer, supervisor: Any, generators: list[Any], requesters: list[Any],
                 duration: float, live: bool | None = None) -> None:
        self.o, self.sup, self.generators, self.requesters = observer, supervisor, generators, requesters
        self.duration = duration
        self.console = Console()
        self.live = self.console.is_terminal if live is None else live
        self.started = time.monotonic()

    def run(self, until: float) -> None:
        if self.live:
            with Live(self.render(), console=self.console, refresh_per_second=2, transient=False) as live:
                while time.monotonic() < until:
                    self.o.sample()
                    live.update(self.render())
                    time.sleep(1.0)  # refresh cadence of the screen
        else:
            last_line = 0.0
            while time.monotonic() < until:
                self.o.sample()
                if time.monotonic() - last_line >= 10:
                    print(self.line(), flush=True)
                    last_line = time.monotonic()
                time.sleep(1.0)  # sampling cadence

    def line(self) -> str:
        s = self.o.samples[-1]
        settings = self.o.settings
        rates = self.o.rates()
        rows = self.o.predictions.window(10, steady=True)
        lat = [r[3] for r in rows]
        versions = " ".join(f"{m}=v{s.models[m]['promoted']}" if s.models[m]["promoted"] is not None
                            else f"{m}=none" for m in MODELS)
        topics = {k: raw_topic(settings, k) for k in KINDS}
        ev = " ".join(f"{k}={s.end_offsets.get(t, 0)}({rates.get(t, 0):.0f}/s)" for k, t in topics.items())
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        return (f"[{time.monotonic() - self.started:5.0f}s] events {ev} | batches {_kv(s.batches)} | "
                f"lag {_kv(s.lag)} | "
                f"serving {versions} | predictions {len(self.o.predictions.rows)} "
                f"steady p50={_ms(p50)} p99={_ms(p99)} ms | swaps {len(self.o.predictions.swaps())} | "
                f"restarts {sum(x['restarts'] for x in self.sup.status())}")

    def render(self) -> Group:
        settings = self.o.settings
        s = self.o.samples[-1] if self.o.samples else None
        rates = self.o.rates()
        head = Table(title=f"streamlearn demo — {time.monotonic() - self.started:.0f}/{self.duration:.0f} s",
                     expand=True)
        for col in ("kind", "events", "events/s", "stream lag", "batches", "dead letters"):
            head.add_column(col, justify="right" if col != "kind" else "left")
        for kind in KINDS:
            rt, dl = raw_topic(settings, kind), dead_letter_topic(settings, kind)
            head.add_row(kind, str(s.end_offsets.get(rt, 0) if s else 0), f"{rates.get(rt, 0):.0f}",
                         str(s.lag.get(kind, "-") if s else "-"), str(s.batches.get(kind, 0) if s else 0),
                         str(s.end_offsets.get(dl, 0) if s else 0))
        models = Table(expand=True)
        for col in ("model", "versions", "promoted", "last gate decisions (metric: candidate vs current)",
                    "pred/s", "steady p50 ms", "steady p99 ms", "swaps"):
            models.add_column(col)
        window = self.o.predictions.window(10, steady=True)
        swaps = self.o.predictions.swaps()
        for model in MODELS:
            info = s.models.get(model, {}) if s else {}
            decisions = "; ".join(
                f"v{d['version']} {d['decision'] or '?'} {d['metric'] or ''} "
                f"{_num(d['candidate'])} vs {_num(d['current'])}"
                for d in info.get("detail", [])[-2:])
            lat = [r[3] for r in window if r[1] == model]
            models.add_row(model, str(len(info.get("versions", []))), str(info.get("promoted")), decisions or "-",
                           f"{rates.get(predictions_topic(settings, model), 0):.1f}", _ms(percentile(lat, 50)),
                           _ms(percentile(lat, 99)), str(sum(1 for x in swaps if x[1] == model)))
        workers = Table(expand=True)
        for col in ("worker", "state", "restarts", "uptime s"):
            workers.add_column(col)
        for w in self.sup.status():
            workers.add_row(w["name"], w["state"], str(w["restarts"]), f"{w['uptime_s']:.0f}")
        return Group(head, models, workers)

    def print_summary(self, report: Path) -> None:
        from streamlearn.report import summary_lines

        summary = json.loads((report / "summary.json").read_text())
        print("\n" + "\n".join(summary_lines(summary, report)), file=sys.stdout, flush=True)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, (int, float)) else str(v)


def _kv(d: dict[str, Any]) -> str:
    """``weblog=3 sensor=5`` instead of a Python dict in a status line."""
    return " ".join(f"{k}={v}" for k, v in d.items())
