"""Web-log featurizer ``weblog-v1``: one HTTP request (``WebLogEvent``) -> 64 floats.

Feature layout (``feature_names`` lists them; the order is part of the version):

* ``method_<M>`` one-hot over GET POST HEAD PUT DELETE OPTIONS PATCH CONNECT TRACE + ``method_other``
  (exact, case-sensitive match: HTTP methods are case-sensitive and ``get`` is not a method);
* ``status_1xx`` .. ``status_5xx`` one-hot (a status outside 100..599 is a validation error);
* ``path_depth`` (non-empty segments before ``?``), ``log1p_path_len``, ``has_query``,
  ``suspicious_path`` (1.0 when the target contains a traversal/injection/probe pattern);
* ``path_hash_00`` .. ``path_hash_31``: signed hashing trick (CRC-32, see hashing.py) over the
  lowercased path segments (all-digit segments become ``<num>`` so ids do not flood buckets), the
  file extension (``ext:php``) and query parameter names (``q:id``); at most 16 of each;
* ``log1p_bytes``, ``log1p_latency_ms`` and ``latency_missing`` (latency is optional in the schema;
  0.0 plus the indicator when absent, so "unknown" is not confused with "instant");
* ``ua_browser``/``ua_bot``/``ua_tool``/``ua_other``/``ua_empty``: user-agent class one-hot (bots,
  crawlers and feed readers by self-declared name, scripted tools like curl or python-requests by
  leading product token, browsers by a leading ``Mozilla/``/``Opera``);
* ``log1p_client_rate_60s``: requests of this client within the last 60 s of *event* time
  (including this one), ``log1p_secs_since_prev`` (capped at one hour) and ``client_first_seen``;
* ``hour_sin``/``hour_cos`` of the event's UTC hour of day.

Labels: ``is_bot_or_attack`` is 1.0 for source label ``bot``/``attack``, 0.0 for ``normal``, None
when the record has no label; ``is_error`` is 1.0 when status >= 500, else 0.0.

State: per-client sorted deque of recent event times, kept in LRU order and bounded both in
clients (``max_clients``; least recently seen evicted) and in events per client
(``max_events_per_client``, default 256; the rate saturates there, still far above any human), so
memory and the checkpoint size cannot grow without bound whatever the traffic. Keys of one
client arrive in order on one partition (the topic is keyed by ``client_ip``); a slightly
out-of-order event is still counted correctly within the window.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left, bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from streaming.exceptions import FeatureValidationError
from streaming.features.base import (
    FeatureRow,
    FeatureStateError,
    Featurizer,
    check_finite,
    check_key,
    hour_of_day_sin_cos,
    register,
    short_repr,
)
from streaming.features.hashing import cached_hash_bucket

VERSION = "weblog-v1"
RECORD = "WebLogEvent"

METHODS = ("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE")
UA_CLASSES = ("browser", "bot", "tool", "other", "empty")
N_PATH_BUCKETS = 32
PATH_HASH_SEED = "weblog-path"
MAX_TOKENS = 16
GAP_CAP_S = 3600.0
#: A request that took longer than a day is a unit error or a hostile value (1e308 is finite).
MAX_LATENCY_MS = 86_400_000.0
#: Longest request target / user agent accepted (Apache's own request-line limit is 8190 bytes);
#: both feed LRU caches, so their length bounds the caches' memory.
MAX_PATH_CHARS = 8192
MAX_UA_CHARS = 4096

_BOT_RE = re.compile(
    r"bot|crawl|spider|slurp|archiver|facebookexternalhit|mediapartners|feedfetcher|bingpreview"
    r"|yandex|baiduspider|semrush|ahrefs|headless|feed|\brss\b",
    re.IGNORECASE,
)
_TOOL_RE = re.compile(
    r"^\s*(curl|wget|python-requests|python-urllib|python/|python-httpx|aiohttp|httpx|go-http-client"
    r"|java/|libwww-perl|lwp-|okhttp|apache-httpclient|httpie|scrapy|axios|node-fetch|php/|ruby"
    r"|perl/|powershell|winhttp|nikto|sqlmap|nmap|masscan|zgrab|chef client|ansible|puppet)",
    re.IGNORECASE,
)
_SUSPICIOUS_RE = re.compile(
    r"\.\./|\.\.\\|%2e%2e|%00|<script|%3cscript|union(\s|\+|%20)+select|/etc/passwd|cmd\.exe|wp-login"
    r"|phpmyadmin|/\.env|/\.git|xmlrpc\.php|'|%27|\$\{jndi",
    re.IGNORECASE,
)


def _feature_names() -> list[str]:
    names = [f"method_{m}" for m in METHODS] + ["method_other"]
    names += [f"status_{c}xx" for c in range(1, 6)]
    names += ["path_depth", "log1p_path_len", "has_query", "suspicious_path"]
    names += [f"path_hash_{i:02d}" for i in range(N_PATH_BUCKETS)]
    names += ["log1p_bytes", "log1p_latency_ms", "latency_missing"]
    names += [f"ua_{c}" for c in UA_CLASSES]
    names += ["log1p_client_rate_60s", "log1p_secs_since_prev", "client_first_seen"]
    names += ["hour_sin", "hour_cos"]
    return names


FEATURE_NAMES = _feature_names()
_IDX = {name: i for i, name in enumerate(FEATURE_NAMES)}
_METHOD_IDX = {m: _IDX[f"method_{m}"] for m in METHODS}
_METHOD_OTHER = _IDX["method_other"]
_STATUS0 = _IDX["status_1xx"]
_DEPTH = _IDX["path_depth"]
_PATH_LEN = _IDX["log1p_path_len"]
_HAS_QUERY = _IDX["has_query"]
_SUSPICIOUS = _IDX["suspicious_path"]
_HASH0 = _IDX["path_hash_00"]
_BYTES = _IDX["log1p_bytes"]
_LATENCY = _IDX["log1p_latency_ms"]
_LATENCY_MISSING = _IDX["latency_missing"]
_UA_IDX = {c: _IDX[f"ua_{c}"] for c in UA_CLASSES}
_RATE = _IDX["log1p_client_rate_60s"]
_GAP = _IDX["log1p_secs_since_prev"]
_FIRST = _IDX["client_first_seen"]
_HOUR_SIN = _IDX["hour_sin"]
_HOUR_COS = _IDX["hour_cos"]

_LABELS = {"bot": 1.0, "attack": 1.0, "normal": 0.0}


def path_tokens(path: str) -> tuple[int, tuple[str, ...], bool]:
    """Split a request target into (depth, hashing tokens, has_query). Public for docs and tests."""
    target = path.split("#", 1)[0]
    p, sep, query = target.partition("?")
    segments = [s for s in p.split("/") if s]
    tokens: list[str] = []
    for seg in segments[:MAX_TOKENS]:
        s = seg.lower()
        tokens.append("<num>" if s.isdigit() else s)
    if segments and "." in segments[-1]:
        ext = segments[-1].rsplit(".", 1)[1].lower()
        if ext:
            tokens.append("ext:" + ext[:10])
    if query:
        for part in query.split("&")[:MAX_TOKENS]:
            name = part.split("=", 1)[0].lower()
            if name:
                tokens.append("q:" + name)
    return len(segments), tuple(tokens), bool(sep)


@lru_cache(maxsize=16384)
def _path_info(path: str) -> tuple[float, float, float, float, tuple[tuple[int, float], ...]]:
    """Everything a path contributes, cached: real traffic repeats a small set of paths."""
    depth, tokens, has_query = path_tokens(path)
    hashed = tuple(cached_hash_bucket(t, N_PATH_BUCKETS, PATH_HASH_SEED) for t in tokens)
    suspicious = 1.0 if _SUSPICIOUS_RE.search(path) else 0.0
    return float(depth), math.log1p(len(path)), 1.0 if has_query else 0.0, suspicious, hashed


@lru_cache(maxsize=4096)
def user_agent_class(user_agent: str | None) -> str:
    """Classify a User-Agent header into one of UA_CLASSES (cached: few distinct agents per site)."""
    if user_agent is None:
        return "empty"
    ua = user_agent.strip()
    if not ua or ua == "-":
        return "empty"
    if _BOT_RE.search(ua):
        return "bot"
    if _TOOL_RE.match(ua):
        return "tool"
    if ua.startswith(("Mozilla/", "Opera/", "Opera ")):
        return "browser"
    return "other"


#: Estimated checkpoint bytes (JSON) of one client entry and of one event time in it; used to bound
#: the state by bytes (``max_state_bytes``), so every batch manifest's state has a known ceiling.
CLIENT_ENTRY_BYTES = 16
EVENT_BYTES = 14
#: Default byte bound of one state (estimated JSON size); see docs/SECURITY.md.
MAX_STATE_BYTES = 8 * 1024 * 1024


def entry_bytes(client: str, events: int) -> int:
    return CLIENT_ENTRY_BYTES + len(client.encode("utf-8", "replace")) + events * EVENT_BYTES


def request_fields(record: dict[str, Any], *, any_status: bool = False
                   ) -> tuple[str, str, int, str, int, float | None, str | None]:
    """The fields of one request as the features need them: ``(client_ip, method, status, path, bytes_sent,
    latency_ms, user_agent)``, or FeatureValidationError naming the first unusable one.

    Why a function of its own: ingestion calls it too (``ingest/weblog.py``), so a line is refused where it
    is read, with its reason, not published and then dead-lettered by every stream worker (a negative
    size, a latency of 1e400 read as infinity, a 200,000-character path, an empty client address).
    ``any_status``: ingestion keeps any three-digit status (000 and 999 are in real logs; the raw topic is
    the log as written), which the features refuse outside 100..599."""
    client = check_key(record, RECORD, "client_ip")
    method = record.get("method")
    if not isinstance(method, str):
        raise FeatureValidationError(f"{RECORD}.method: expected a string, got {short_repr(method)}")
    status = record.get("status")
    if isinstance(status, bool) or not isinstance(status, int) or not (any_status or 100 <= status <= 599):
        raise FeatureValidationError(f"{RECORD}.status: expected an HTTP status 100..599, got {status!r}")
    path = record.get("path")
    if not isinstance(path, str):
        raise FeatureValidationError(f"{RECORD}.path: expected a string, got {short_repr(path)}")
    if len(path) > MAX_PATH_CHARS:
        raise FeatureValidationError(
            f"{RECORD}.path: {len(path)} characters, over the limit of {MAX_PATH_CHARS}")
    nbytes = record.get("bytes_sent", 0)
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise FeatureValidationError(f"{RECORD}.bytes_sent: expected a non-negative int, got {nbytes!r}")
    latency = record.get("latency_ms")
    if latency is not None:
        latency = check_finite(latency, RECORD, "latency_ms", MAX_LATENCY_MS)
        if latency < 0:
            raise FeatureValidationError(f"{RECORD}.latency_ms: negative latency {latency!r}")
    ua = record.get("user_agent")
    if ua is not None and not isinstance(ua, str):
        raise FeatureValidationError(f"{RECORD}.user_agent: expected a string or null, got {short_repr(ua)}")
    if ua is not None and len(ua) > MAX_UA_CHARS:
        raise FeatureValidationError(
            f"{RECORD}.user_agent: {len(ua)} characters, over the limit of {MAX_UA_CHARS}")
    return client, method, status, path, nbytes, latency, ua


class WeblogState:
    """Per-client sliding windows of event times (oldest client first, LRU order); ``nbytes``
    estimates the checkpoint size."""

    __slots__ = ("clients", "nbytes")

    def __init__(self) -> None:
        self.clients: OrderedDict[str, deque[int]] = OrderedDict()
        self.nbytes = 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WeblogState):
            return NotImplemented
        return list(self.clients.items()) == list(other.clients.items())

    def __repr__(self) -> str:
        return f"WeblogState(clients={len(self.clients)})"


class WeblogFeaturizer(Featurizer[WeblogState]):
    """See the module docstring for the feature layout and state."""

    kind = "weblog"
    version = VERSION
    input_shape: tuple[int, ...] = (len(FEATURE_NAMES),)
    label_names = ["is_bot_or_attack", "is_error"]
    feature_names = FEATURE_NAMES

    def __init__(
        self,
        *,
        rate_window_ms: int = 60_000,
        max_clients: int = 10_000,
        max_events_per_client: int = 256,
        max_state_bytes: int = MAX_STATE_BYTES,
        clock_ms: Callable[[], int] | None = None,
        max_future_ms: int | None = None,
    ) -> None:
        super().__init__(clock_ms, max_future_ms)
        if rate_window_ms <= 0 or max_clients <= 0 or max_events_per_client <= 0:
            raise ValueError("rate_window_ms, max_clients and max_events_per_client must be positive")
        self.rate_window_ms = rate_window_ms
        self.max_clients = max_clients
        self.max_events_per_client = max_events_per_client
        self.max_state_bytes = max_state_bytes
        self._n = len(FEATURE_NAMES)

    def new_state(self) -> WeblogState:
        return WeblogState()

    def featurize(self, record: dict[str, Any], state: WeblogState) -> FeatureRow:
        return self._row(record, state, None)

    def featurize_backfill(self, record: dict[str, Any], state: WeblogState, run: str) -> FeatureRow:
        """A backfill run's request: counted in the run's own per-client window (docs/EVENT_TIME.md),
        so history does not inflate live client rates and live traffic does not hide history."""
        return self._row(record, state, run)

    def _row(self, record: dict[str, Any], state: WeblogState, run: str | None) -> FeatureRow:
        t = self.check_event_time(record, RECORD)
        client, method, status, path, nbytes, latency, ua = request_fields(record)
        raw_label = record.get("label")
        if raw_label is None:
            attack: float | None = None
        else:
            attack = _LABELS.get(raw_label) if isinstance(raw_label, str) else None
            if attack is None:
                raise FeatureValidationError(
                    f"{RECORD}.label: expected 'normal', 'bot', 'attack' or null, got {short_repr(raw_label)}"
                )

        x = [0.0] * self._n
        x[_METHOD_IDX.get(method, _METHOD_OTHER)] = 1.0
        x[_STATUS0 + status // 100 - 1] = 1.0
        depth, path_len, has_query, suspicious, hashed = _path_info(path)
        x[_DEPTH] = depth
        x[_PATH_LEN] = path_len
        x[_HAS_QUERY] = has_query
        x[_SUSPICIOUS] = suspicious
        for bucket, sign in hashed:
            x[_HASH0 + bucket] += sign
        x[_BYTES] = math.log1p(nbytes)
        if latency is None:
            x[_LATENCY_MISSING] = 1.0
        else:
            x[_LATENCY] = math.log1p(latency)
        x[_UA_IDX[user_agent_class(ua)]] = 1.0
        count, gap_ms, first = self._update_client(
            state, client if run is None else f"\x00backfill\x00{run}\x00{client}", t)
        x[_RATE] = math.log1p(count)
        x[_GAP] = math.log1p(min(gap_ms / 1000.0, GAP_CAP_S))
        x[_FIRST] = first
        x[_HOUR_SIN], x[_HOUR_COS] = hour_of_day_sin_cos(t)
        labels: dict[str, float | None] = {
            "is_bot_or_attack": attack,
            "is_error": 1.0 if status >= 500 else 0.0,
        }
        return FeatureRow(np.array(x, dtype=np.float32), labels, t, client)

    def _update_client(self, state: WeblogState, client: str, t: int) -> tuple[int, float, float]:
        """Record event time ``t`` of ``client``; return (events in window, ms since previous, first?)."""
        clients = state.clients
        times = clients.get(client)
        if times is None:
            clients[client] = deque([t], maxlen=self.max_events_per_client)
            state.nbytes += entry_bytes(client, 1)
            self._evict(state)
            return 1, 0.0, 1.0
        clients.move_to_end(client)
        before = len(times)
        try:
            return self._update_times(times, t)
        finally:
            state.nbytes += (len(times) - before) * EVENT_BYTES
            if len(times) > before:
                self._evict(state)

    def _evict(self, state: WeblogState) -> None:
        """Forget least recently seen clients beyond ``max_clients`` or ``max_state_bytes``."""
        clients = state.clients
        while len(clients) > 1 and (len(clients) > self.max_clients or state.nbytes > self.max_state_bytes):
            old_client, old = clients.popitem(last=False)
            state.nbytes -= entry_bytes(old_client, len(old))

    def _update_times(self, times: deque[int], t: int) -> tuple[int, float, float]:
        low = t - self.rate_window_ms
        latest = times[-1]
        if t >= latest:  # the common, in-order case
            times.append(t)
            while times[0] < low:
                times.popleft()
            return len(times), float(t - latest), 0.0
        # Out of order: count what the window holds around t, insert t in event-time order.
        i = bisect_right(times, t)
        gap = float(t - times[i - 1]) if i > 0 else GAP_CAP_S * 1000.0
        count = i - bisect_left(times, low, 0, i) + 1
        # Kept when inside the rate window of the latest event, that latest capped at the clock's
        # now: an event from a clock running ahead (accepted within max_future_ms) must not push
        # later real events out of the client's window.
        if t >= min(latest, self._clock_ms()) - self.rate_window_ms:
            if len(times) == times.maxlen:
                if i == 0:
                    return count, gap, 0.0
                times.popleft()
                i -= 1
            times.insert(i, t)
        return count, gap, 0.0

    def state_settings(self) -> dict[str, Any]:
        return {"rate_window_ms": self.rate_window_ms}  # a smaller max_events_per_client just trims

    def state_to_json(self, state: WeblogState) -> str:
        return self.dump_state({"max_events_per_client": self.max_events_per_client,
                                "clients": [[c, list(ts)] for c, ts in state.clients.items()]})

    def state_from_json(self, text: str) -> WeblogState:
        return self.load_state(text, self._restore)

    def _restore(self, doc: dict[str, Any]) -> WeblogState:
        state = WeblogState()
        for client, times in doc["clients"][-self.max_clients :]:
            if not isinstance(client, str) or not all(type(v) is int for v in times) or times != sorted(times):
                raise FeatureStateError(f"state: bad window for client {client!r}")
            state.clients[client] = window = deque(times, maxlen=self.max_events_per_client)
            state.nbytes += entry_bytes(client, len(window))
        self._evict(state)
        return state


register("weblog", VERSION, WeblogFeaturizer, current=True)
