"""The featurizer contract, the version registry and validation helpers shared by every kind.

A featurizer turns one decoded Avro record (a dict, see ``schemas/*.avsc``) plus an explicit,
caller-owned ``state`` (sliding windows) into a :class:`FeatureRow`. The same object is used by the
stream worker (training rows) and by serving (prediction inputs), so a model and the features it
was trained on cannot drift apart. Every featurizer is versioned (``"<kind>-v<n>"``); older
versions stay registered so a model trained on v1 keeps being served with v1.

Featurizer objects themselves hold no per-stream data, only configuration and caches, so one
instance can serve many partitions, each with its own state.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

# FeatureStateError and UnknownFeaturizerError live in streaming.exceptions and are re-exported here.
from streaming import eventtime
from streaming.clock import now_ms
from streaming.exceptions import (  # noqa: F401
    FeatureStateError,
    FeatureValidationError,
    UnknownFeaturizerError,
    UnknownKindError,
)

#: Event times before this are rejected: 1678-01-01T00:00:00Z (see streaming/eventtime.py). Unit
#: mistakes are caught where records enter (one unit per input, a live age window); featurizers
#: must accept history published on purpose (``--backfill``).
MIN_EVENT_TIME_MS = eventtime.MIN_EVENT_TIME_MS
#: Kept as a name for the featurizers written to take history (sensor-v2): the same 1678 floor, the
#: first whole year that epoch nanoseconds in an int64 (pandas, Arrow) can hold.
HISTORICAL_MIN_EVENT_TIME_MS = MIN_EVENT_TIME_MS
#: The default future-skew allowance; each featurizer uses the configured one (``max_future_ms``),
#: the same window every entry applies (setting ``max_future_skew_s``).
MAX_FUTURE_MS = eventtime.DEFAULT_MAX_FUTURE_MS

S = TypeVar("S")




@dataclass(frozen=True, slots=True)
class FeatureRow:
    """One featurized event.

    ``x`` is a fresh float32 array of shape ``(n_features,)`` owned by the row (never a view into
    a reused buffer, because batchers keep rows). ``labels`` maps every name of the featurizer's
    ``label_names`` to a float, or None when the source does not say. ``key`` is the record's
    partitioning key (client ip, sensor id, image id).
    """

    x: np.ndarray
    labels: dict[str, float | None]
    event_time_ms: int
    key: str


@dataclass(frozen=True, slots=True)
class DeferredRow:
    """A training row whose ``x`` is computed later, for many rows at once (:meth:`Featurizer.finish_rows`).

    ``inputs`` is what the featurizer needs for ``x`` (a copy, so later records cannot change it);
    the other fields are final. Why: the stream worker featurizes a whole micro-batch with array
    operations instead of one record at a time, while validation and state stay per record.
    """

    inputs: Any
    labels: dict[str, float | None]
    event_time_ms: int
    key: str


class Featurizer(ABC, Generic[S]):
    """Base class of every featurizer; see docs/ARCHITECTURE.md "Featurizers".

    Subclasses set ``kind``, ``version``, ``input_shape``, ``label_names`` and ``feature_names``;
    ``n_features`` derives from ``feature_names`` so the two cannot disagree.
    """

    kind: str
    version: str
    input_shape: tuple[int, ...]
    label_names: list[str]
    feature_names: list[str]
    #: event times before this are rejected (a class attribute so a version can accept history).
    min_event_time_ms: int = MIN_EVENT_TIME_MS

    def __init__(self, clock_ms: Callable[[], int] | None = None, max_future_ms: int | None = None) -> None:
        # Injected so tests (and replays in a fixed "now") can pin the future-timestamp check.
        self._clock_ms: Callable[[], int] = clock_ms or now_ms
        #: Event times further ahead of the clock are rejected before they touch any state, so a
        #: reading from a wrong clock can never make later real readings "late".
        self.max_future_ms = eventtime.max_future_ms() if max_future_ms is None else max_future_ms

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @abstractmethod
    def new_state(self) -> S:
        """Return an empty state for one stream (e.g. one partition)."""

    @abstractmethod
    def featurize(self, record: dict[str, Any], state: S) -> FeatureRow:
        """Featurize a record for training; pure apart from mutating ``state``.

        Raises FeatureValidationError (naming the field) for records that must be dead-lettered.
        """

    def featurize_backfill(self, record: dict[str, Any], state: S, run: str) -> FeatureRow:
        """Featurize a record of the declared backfill ``run`` (its ``sl.backfill`` header).

        Kinds whose state holds per-key event-time windows override this to keep each run's keys
        apart from the live ones, without the live lateness rules (docs/EVENT_TIME.md); for the
        others a backfilled record is featurized like any other.
        """
        return self.featurize(record, state)

    def featurize_event(self, record: dict[str, Any], state: S, backfill_run: str | None = None) -> FeatureRow:
        """The stream pipeline's entry: live records to :meth:`featurize`, backfill runs to
        :meth:`featurize_backfill`."""
        if backfill_run is None:
            return self.featurize(record, state)
        return self.featurize_backfill(record, state, backfill_run)

    def featurize_event_deferred(self, record: dict[str, Any], state: S,
                                 backfill_run: str | None = None) -> FeatureRow | DeferredRow:
        """:meth:`featurize_event` that may leave ``x`` for :meth:`finish_rows`: the same validation,
        errors and state change now, the same ``x`` later. The default defers nothing."""
        return self.featurize_event(record, state, backfill_run)

    def finish_rows(self, rows: Sequence[DeferredRow]) -> np.ndarray:
        """``x`` of rows this featurizer deferred, float32 ``(len(rows), n_features)``, bit-identical
        to what :meth:`featurize_event` would have returned for each."""
        raise NotImplementedError(f"rows: featurizer {self.version} defers no rows, so it has none to finish")

    def prepare_many(self, records: Sequence[Any]) -> None:
        """Work ahead on a poll's decoded records, before :meth:`featurize_event_deferred` sees them one
        by one in the same order. Only stateless work (the same result whatever came before), and the
        result must be the one the per-record call would have computed, errors included. Default: none."""

    def release_prepared(self) -> None:
        """Drop what :meth:`prepare_many` kept and the records did not take (the run ended early)."""

    def featurize_for_prediction(self, record: dict[str, Any], state: S) -> FeatureRow:
        """Featurize a record for serving. Same feature function as :meth:`featurize`.

        Kinds whose training row looks backwards (the sensor forecaster) override this; for the
        others a prediction input is exactly a training row, so serving can call this uniformly.
        """
        return self.featurize(record, state)

    @abstractmethod
    def state_to_json(self, state: S) -> str:
        """Serialize ``state`` so that :meth:`state_from_json` restores it exactly."""

    @abstractmethod
    def state_from_json(self, text: str) -> S:
        """Restore a state written by :meth:`state_to_json` (raises FeatureStateError)."""

    # -- checkpoint documents: one header format and one set of checks for every featurizer ---------

    def state_settings(self) -> dict[str, Any]:
        """Settings a checkpoint must have been written with to be restored here (name -> value).

        Why: a window of 8 restored into a featurizer of 16 would silently compute different
        features from the same records; a mismatch is refused instead.
        """
        return {}

    def dump_state(self, body: dict[str, Any]) -> str:
        """A checkpoint document: the version and :meth:`state_settings` as its header, then ``body``."""
        return json.dumps({"featurizer": self.version, **self.state_settings(), **body},
                          separators=(",", ":"), allow_nan=False)

    def load_state(self, text: str, restore: Callable[[dict[str, Any]], S]) -> S:
        """Parse a document written by :meth:`dump_state`, check its version and settings, and hand
        it to ``restore``; whatever goes wrong is a FeatureStateError naming what to do."""
        try:
            doc = json.loads(text)
            if doc["featurizer"] != self.version:
                raise FeatureStateError(
                    f"state: written by {doc['featurizer']!r}, cannot restore into {self.version!r}")
            for name, mine in self.state_settings().items():
                if doc[name] != mine:
                    raise FeatureStateError(
                        f"state: written with {name}={doc[name]!r}, this featurizer has {name}={mine!r}; "
                        "use the same settings or start from new_state()")
            return restore(doc)
        except FeatureStateError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise FeatureStateError(f"state: not a {self.version} state document ({exc})") from exc

    def describe(self) -> dict[str, Any]:
        """What a model's metadata should record about the featurizer it was trained with."""
        return {
            "kind": self.kind,
            "version": self.version,
            "n_features": self.n_features,
            "input_shape": list(self.input_shape),
            "label_names": list(self.label_names),
            "feature_names": list(self.feature_names),
        }

    # -- shared validation -------------------------------------------------------------------

    def check_event_time(self, record: dict[str, Any], record_name: str, field: str = "timestamp") -> int:
        """Return the record's event time in ms, or raise if it is missing, not an int or implausible."""
        ts = record.get(field)
        if isinstance(ts, bool) or not isinstance(ts, int):
            raise FeatureValidationError(
                f"{record_name}.{field}: expected int epoch milliseconds, got {type(ts).__name__} {ts!r}"
            )
        if ts < self.min_event_time_ms:
            raise FeatureValidationError(
                f"{record_name}.{field}: {ts} ({eventtime.iso(ts)}) is before 1678-01-01, the earliest "
                "event time streamlearn holds; check the source's --timestamp-unit"
            )
        now = self._clock_ms()
        if ts > now + self.max_future_ms:
            raise FeatureValidationError(
                f"{record_name}.{field}: {ts} ({eventtime.iso(ts)}) is more than "
                f"{eventtime.format_duration(self.max_future_ms)} ahead of now {now} (setting max_future_skew_s); "
                "fix the producer's clock or units"
            )
        return ts


#: Longest key (sensor_id, client_ip, image_id) a featurizer accepts; keys live in featurizer state,
#: so an unbounded key is unbounded state in every checkpoint (docs/SECURITY.md).
MAX_KEY_CHARS = 256


def check_key(record: dict[str, Any], record_name: str, field: str, max_chars: int = MAX_KEY_CHARS) -> str:
    """Return the record's non-empty string key field (at most ``max_chars``) or raise FeatureValidationError."""
    key = record.get(field)
    if not isinstance(key, str) or not key:
        raise FeatureValidationError(
            f"{record_name}.{field}: expected a non-empty string, got {short_repr(key)}")
    if len(key) > max_chars:
        raise FeatureValidationError(
            f"{record_name}.{field}: {len(key)} characters, over the limit of {max_chars}; use a shorter id")
    return key


def short_repr(value: Any, max_chars: int = 80) -> str:
    """``repr(value)`` cut for error messages (hostile values must not become megabyte messages)."""
    text = repr(value)
    return text if len(text) <= max_chars else f"{text[:max_chars]}...({len(text)} chars)"


def check_finite(value: Any, record_name: str, field: str, max_abs: float | None = None) -> float:
    """Return ``value`` as float if it is a finite number (and within ``max_abs``), else raise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FeatureValidationError(
            f"{record_name}.{field}: expected a number, got {type(value).__name__} {short_repr(value)}"
        )
    f = float(value)
    if math.isnan(f):
        raise FeatureValidationError(f"{record_name}.{field}: NaN is not a valid measurement")
    if math.isinf(f):
        raise FeatureValidationError(f"{record_name}.{field}: {f} (infinite) is not a valid measurement")
    if max_abs is not None and abs(f) > max_abs:
        raise FeatureValidationError(
            f"{record_name}.{field}: absurd magnitude {f!r} (|value| > {max_abs:g}); check units or sensor"
        )
    return f


def hour_of_day_sin_cos(event_time_ms: int) -> tuple[float, float]:
    """Encode the UTC hour of day of an event time on the unit circle (23:59 is next to 00:00)."""
    seconds_of_day = (event_time_ms // 1000) % 86_400
    angle = 2.0 * math.pi * seconds_of_day / 86_400.0
    return math.sin(angle), math.cos(angle)


# -- registry ---------------------------------------------------------------------------------

_FACTORIES: dict[str, dict[str, Callable[[], Featurizer[Any]]]] = {}
_CURRENT: dict[str, str] = {}


def register(kind: str, version: str, factory: Callable[[], Featurizer[Any]], *, current: bool) -> None:
    """Register a featurizer version; ``current=True`` makes it what ``version=None`` resolves to."""
    if not version.startswith(kind + "-"):
        raise ValueError(f"version {version!r} must start with the kind, e.g. {kind}-v1")
    _FACTORIES.setdefault(kind, {})[version] = factory
    if current:
        _CURRENT[kind] = version


def available_versions(kind: str) -> list[str]:
    """Every registered version of ``kind``, sorted."""
    _check_kind(kind)
    return sorted(_FACTORIES[kind])


def current_version(kind: str) -> str:
    """The version ``get_featurizer(kind)`` returns."""
    _check_kind(kind)
    return _CURRENT[kind]


def get_featurizer(kind: str, version: str | None = None) -> Featurizer[Any]:
    """Return a featurizer of ``kind`` at ``version`` (None: the current one).

    ``version`` may be given in full (``"sensor-v1"``) or short (``"v1"``). A new instance is
    returned each time; instances are cheap and hold no stream state.
    """
    _check_kind(kind)
    wanted = _CURRENT[kind] if version is None else version
    if not wanted.startswith(kind + "-"):
        wanted = f"{kind}-{wanted}"
    factory = _FACTORIES[kind].get(wanted)
    if factory is None:
        raise UnknownFeaturizerError(
            f"version: no featurizer {wanted!r} for kind {kind!r}; "
            f"registered versions are {sorted(_FACTORIES[kind])}"
        )
    return factory()


def _check_kind(kind: str) -> None:
    if kind not in _FACTORIES:
        raise UnknownKindError(f"kind: unknown featurizer kind {kind!r}; use one of {sorted(_FACTORIES)}")
