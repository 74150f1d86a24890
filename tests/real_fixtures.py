"""Small public-data-like fixtures made here (not the project's generators): series and a log.

* :func:`weekly_series`: a CO2-like weekly series from 1974 to 2000, read at 00:00 UTC every week,
  with a trend, a yearly cycle, autocorrelated noise, missing weeks (gaps) and ``nan`` values;
* :func:`yearly_series`: a sunspot-like yearly series from 1700 (an ~11-year cycle), one reading
  per 1 January;
* :data:`COMBINED_LOG`: real-format combined-log lines without any label (a browser, a crawler, a
  probe for ``/wp-login.php`` answered 404, a server error, a common-format line with no agent).
"""

from __future__ import annotations

import calendar
import math
from datetime import UTC, datetime
from typing import Any

import numpy as np

WEEK_MS = 7 * 86_400_000


def _ms(dt: datetime) -> int:
    return calendar.timegm(dt.utctimetuple()) * 1000


def weekly_series(start_year: int = 1974, end_year: int = 2000, seed: int = 3) -> list[dict[str, Any]]:
    """Records of one sensor; about 3% of readings are ``nan`` and about 4% of weeks are missing."""
    rng = np.random.default_rng(seed)
    t = _ms(datetime(start_year, 5, 19, tzinfo=UTC))
    end = _ms(datetime(end_year, 1, 1, tzinfo=UTC))
    out: list[dict[str, Any]] = []
    noise = 0.0
    while t < end:
        years = (t - _ms(datetime(start_year, 1, 1, tzinfo=UTC))) / (365.2425 * 86_400_000)
        noise = 0.6 * noise + rng.normal(0.0, 0.12)
        value = 330.0 + 1.5 * years + 3.0 * math.sin(2 * math.pi * years) + noise
        if rng.random() >= 0.04:  # a missing week: no record at all
            v = float("nan") if rng.random() < 0.03 else round(value, 2)
            out.append({"sensor_id": "mlo-co2-weekly", "timestamp": t, "value": v, "values": {},
                        "unit": "ppm", "label": None, "event_id": f"co2:{t}"})
        t += WEEK_MS
    return out


def yearly_series(start_year: int = 1700, end_year: int = 2020, seed: int = 5) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    for year in range(start_year, end_year + 1):
        phase = 2 * math.pi * (year - start_year) / 11.0
        value = max(0.0, 80.0 + 70.0 * math.sin(phase) + rng.normal(0.0, 4.0))
        t = _ms(datetime(year, 1, 1, tzinfo=UTC))
        out.append({"sensor_id": "sunspots-yearly", "timestamp": t, "value": round(value, 1), "values": {},
                    "unit": "count", "label": None, "event_id": f"ss:{year}"})
    return out


COMBINED_LOG = [
    '83.149.9.216 - - [17/May/2015:10:05:03 +0000] "GET /presentations/logstash/images/kibana.png HTTP/1.1" 200 '
    '203023 "http://semicomplete.com/presentations/" "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_9_1) '
    'AppleWebKit/537.36 (KHTML, like Gecko) Chrome/32.0.1700.77 Safari/537.36"',
    '66.249.73.135 - - [17/May/2015:10:05:40 +0000] "GET /blog/tags/ipv6 HTTP/1.1" 200 12251 "-" '
    '"Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"',
    '93.114.45.13 - - [17/May/2015:10:05:14 +0000] "GET /wp-login.php HTTP/1.1" 404 326 "-" '
    '"Mozilla/5.0 (X11; Linux x86_64; rv:25.0) Gecko/20100101 Firefox/25.0"',
    '10.0.0.7 - frank [17/May/2015:10:06:01 +0000] "POST /search?q=logstash HTTP/1.1" 500 0 "-" "curl/7.35.0"',
    '10.0.0.8 - - [17/May/2015:10:06:02 +0000] "GET /index.html HTTP/1.0" 304 -',
]
