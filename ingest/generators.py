"""Deterministic demo data: labelled web traffic and the scikit-learn handwritten digits as PNGs.

The demo and the tests need data with ground truth that looks like production traffic, so:

* :func:`web_traffic` yields ``WebLogEvent`` dicts from a population of human visitors
  (browsers, site paths weighted like a blog, mostly 200/304 with some 404s, log-normal
  latency), interleaved with labelled **bot** bursts (crawler user agents fetching many pages
  fast, robots.txt, sitemap) and **attack** bursts (one address probing admin/login paths,
  path traversal and SQL injection strings, mostly 401/403/404, tiny responses).
  ``label`` is ``'normal'``, ``'bot'`` or ``'attack'``.
* :func:`digits` yields ``ImageEvent`` dicts of the 1,797 8x8 digits shipped inside
  scikit-learn (``load_digits``; no download), in their natural order, rendered to 8-bit
  grayscale PNG with Pillow, label = the digit as a string.

The sensor generator lives with the sensor source (:func:`ingest.sensors.generate`).
Everything is a function of the arguments (``seed``, ``start_ms``): same arguments, same records.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

_PAGES = [
    ("/", 30),
    ("/blog/", 20),
    ("/articles/{slug}", 60),
    ("/blog/{year}/{slug}.html", 40),
    ("/about", 5),
    ("/contact", 3),
    ("/search?q={word}", 10),
    ("/static/css/site.css", 25),
    ("/static/js/app.js", 25),
    ("/images/{slug}.png", 30),
    ("/favicon.ico", 12),
    ("/feed.xml", 6),
    ("/api/v1/items/{n}", 15),
    ("/products/{n}", 20),
    ("/cart", 4),
    ("/login", 3),
]
_WORDS = ["kafka", "python", "logstash", "avro", "tensorflow", "nginx", "docker", "linux", "puppet", "ruby"]
_BROWSERS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 "
    "Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Mobile Safari/537.36",
]
_BOTS = [
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "Mozilla/5.0 (compatible; Baiduspider/2.0; +http://www.baidu.com/search/spider.html)",
    "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
    "python-requests/2.31.0",
    "curl/8.4.0",
    "Wget/1.21.4",
]
_ATTACK_PATHS = [
    "/wp-login.php",
    "/wp-admin/",
    "/admin",
    "/phpmyadmin/index.php",
    "/.env",
    "/.git/config",
    "/cgi-bin/../../../../etc/passwd",
    "/index.php?id=1%27%20OR%20%271%27=%271",
    "/login?user=admin%27--",
    "/api/v1/users?id=1;DROP%20TABLE%20users",
    "/shell.php",
    "/xmlrpc.php",
    "/server-status",
    "/search?q=%3Cscript%3Ealert(1)%3C/script%3E",
    "/../../windows/win.ini",
    "/actuator/env",
]
_ATTACK_AGENTS = [
    "sqlmap/1.7.2#stable (https://sqlmap.org)",
    "Nikto/2.5.0",
    "masscan/1.3",
    None,
    "Mozilla/5.0 zgrab/0.x",
    _BROWSERS[0],
]
_REFERRERS = [None, None, "https://www.google.com/", "https://example.com/", "https://news.ycombinator.com/"]


def _ip(rng: np.random.Generator) -> str:
    a = int(rng.choice([23, 45, 66, 81, 93, 104, 151, 176, 185, 203]))
    return f"{a}.{rng.integers(0, 256)}.{rng.integers(0, 256)}.{rng.integers(1, 255)}"


def _fill(template: str, rng: np.random.Generator) -> str:
    return template.format(
        slug=f"{_WORDS[rng.integers(len(_WORDS))]}-{rng.integers(1, 400)}",
        year=int(rng.integers(2015, 2026)),
        word=_WORDS[rng.integers(len(_WORDS))],
        n=int(rng.integers(1, 5000)),
    )


def _event(
    seq: int,
    seed: int,
    ts: float,
    ip: str,
    method: str,
    path: str,
    status: int,
    size: Any,
    referrer: str | None,
    agent: str | None,
    latency: float,
    label: str,
) -> dict[str, Any]:
    return {
        "event_id": hashlib.sha1(f"web_traffic:{seed}:{seq}".encode()).hexdigest(),
        "client_ip": ip,
        "ident": None,
        "user": None,
        "timestamp": int(ts),
        "method": method,
        "path": path,
        "protocol": "HTTP/1.1",
        "status": int(status),
        "bytes_sent": int(size),
        "referrer": referrer,
        "user_agent": agent,
        "latency_ms": round(float(latency), 3),
        "label": label,
        "source": f"generator:web_traffic:{seed}",
    }


def web_traffic(
    n: int,
    seed: int = 0,
    start_ms: int = 1_700_000_000_000,
    *,
    bot_rate: float = 0.08,
    attack_rate: float = 0.04,
) -> Iterator[dict[str, Any]]:
    """``n`` labelled WebLogEvent dicts, deterministic given ``seed`` and ``start_ms``.

    About ``bot_rate`` / ``attack_rate`` of the events belong to bursts of 20-80 requests from
    one bot or attacker address, interleaved with normal traffic (about 20 requests/s overall).
    """
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    rng = np.random.default_rng(seed)
    weights = np.array([w for _, w in _PAGES], dtype=float)
    weights /= weights.sum()
    visitors = [(_ip(rng), _BROWSERS[rng.integers(len(_BROWSERS))]) for _ in range(200)]
    ts = float(start_ms)
    burst: dict[str, Any] | None = None
    # A burst has ~50 burst requests spread over ~100 events (it takes every other slot), so a
    # fraction r of burst events needs a gap of 50/r - 100 normal events between bursts.
    total_rate = bot_rate + attack_rate
    if not 0 <= total_rate < 0.5:
        raise ValueError(f"bot_rate + attack_rate = {total_rate} must be in [0, 0.5)")
    p_start = 0.0 if total_rate == 0 else 1.0 / (50.0 / total_rate - 100.0)
    for seq in range(n):
        ts += rng.exponential(50.0)
        if burst is None and p_start > 0:
            u = rng.random()
            if u < p_start * bot_rate / total_rate:
                burst = {
                    "label": "bot",
                    "left": int(rng.integers(20, 81)),
                    "ip": _ip(rng),
                    "agent": _BOTS[rng.integers(len(_BOTS))],
                }
            elif u < p_start:
                burst = {
                    "label": "attack",
                    "left": int(rng.integers(20, 81)),
                    "ip": _ip(rng),
                    "agent": _ATTACK_AGENTS[rng.integers(len(_ATTACK_AGENTS))],
                }
        # A burst request replaces a normal one with probability 0.5, so bursts interleave.
        if burst is not None and rng.random() < 0.5:
            burst["left"] -= 1
            label = burst["label"]
            if label == "bot":
                path = (
                    "/robots.txt" if rng.random() < 0.05 else _fill(_PAGES[rng.choice(len(_PAGES), p=weights)][0], rng)
                )
                status = int(rng.choice([200, 200, 200, 301, 404]))
                event = _event(
                    seq,
                    seed,
                    ts,
                    burst["ip"],
                    "GET",
                    path,
                    status,
                    rng.integers(200, 30000),
                    None,
                    burst["agent"],
                    rng.lognormal(2.5, 0.5),
                    label,
                )
            else:
                path = _ATTACK_PATHS[rng.integers(len(_ATTACK_PATHS))]
                method = "POST" if "login" in path or rng.random() < 0.2 else "GET"
                status = int(rng.choice([401, 403, 404, 404, 404, 400, 500]))
                event = _event(
                    seq,
                    seed,
                    ts,
                    burst["ip"],
                    method,
                    path,
                    status,
                    rng.integers(0, 600),
                    None,
                    burst["agent"],
                    rng.lognormal(1.5, 0.7),
                    label,
                )
            if burst["left"] <= 0:
                burst = None
            yield event
            continue
        ip, agent = visitors[rng.integers(len(visitors))]
        path = _fill(_PAGES[rng.choice(len(_PAGES), p=weights)][0], rng)
        method = "POST" if path in ("/login", "/cart") and rng.random() < 0.5 else "GET"
        status = int(rng.choice([200] * 85 + [304] * 8 + [404] * 4 + [301] * 2 + [500]))
        size = 0 if status == 304 else int(rng.lognormal(8.5, 1.2))
        yield _event(
            seq,
            seed,
            ts,
            ip,
            method,
            path,
            status,
            size,
            _REFERRERS[rng.integers(len(_REFERRERS))],
            agent,
            rng.lognormal(3.5, 0.8),
            "normal",
        )


def render_png(pixels: np.ndarray) -> bytes:
    """8-bit grayscale PNG of a 2-D array (values are clipped to 0..255)."""
    from PIL import Image

    arr = np.clip(np.asarray(pixels), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def digits(n: int | None = None, seed: int = 0, start_ms: int = 1_700_000_000_000) -> Iterator[dict[str, Any]]:
    """ImageEvent dicts of the scikit-learn digits (8x8, 0..16 scaled to 0..255), natural order.

    ``n`` limits the count (None = all 1,797). ``seed`` only shifts the event timestamps (one
    image per second from ``start_ms + seed``), so streams from different seeds do not collide
    in time while the images and their order stay the dataset's own.
    """
    from sklearn.datasets import load_digits

    ds = load_digits()
    total = len(ds.images) if n is None else min(int(n), len(ds.images))
    if total < 0:
        raise ValueError(f"n={n} must be >= 0 or None")
    for i in range(total):
        data = render_png(ds.images[i] * (255.0 / 16.0))
        yield {
            "image_id": hashlib.sha256(data).hexdigest(),
            "timestamp": int(start_ms + seed + i * 1000),
            "content_type": "PNG",
            "width": 8,
            "height": 8,
            "data": data,
            "label": str(int(ds.target[i])),
            "source": f"sklearn.digits:{i}",
        }


def web_traffic_lines(n: int, seed: int = 0, start_ms: int = 1_700_000_000_000) -> Iterator[str]:
    """:func:`web_traffic` rendered as combined-log lines (with ``%D`` latency), newline included.

    For the demo: append these to an access.log that ``streamlearn ingest weblog --follow`` tails.
    The labels do not survive the log format (a real access log has none).
    """
    from ingest.weblog import format_combined

    for rec in web_traffic(n, seed=seed, start_ms=start_ms):
        yield format_combined(rec) + "\n"


def write_digit_files(directory: Path, n: int | None = None, *, start: int = 0) -> list[Path]:
    """Write digits ``start .. start+n`` as ``<label>_<index>.png`` into ``directory`` (watcher input).

    Each file is written under a dot-name and renamed into place, so a watcher never sees a
    half-written image; the label travels in the file name (``7_0042.png`` -> "7").
    """
    directory.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    stop = None if n is None else start + n
    for i, rec in enumerate(digits(stop), 0):
        if i < start:
            continue
        target = directory / f"{rec['label']}_{i:04d}.png"
        tmp = directory / f".{target.name}.tmp"
        tmp.write_bytes(rec["data"])
        os.replace(tmp, target)
        out.append(target)
    return out
