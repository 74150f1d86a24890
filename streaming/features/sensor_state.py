"""Sensor featurizer state: per-sensor reading buffers and their checkpoint-size estimate.

Why a module of its own: the containers (and the byte estimate that bounds a state's checkpoint,
``max_state_bytes``) are plain data shared by sensor-v1, v2 and v3 and by the peer benchmark, while
:mod:`streaming.features.sensor` holds the featurizer logic (window features, lateness, insertion,
eviction). Names are re-exported from :mod:`streaming.features.sensor`, their historical home.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class SensorBuffer:
    """Recent readings of one sensor in event-time order (parallel lists, cheap to append/trim)."""

    __slots__ = ("anomalies", "times", "trimmed", "values")

    def __init__(self) -> None:
        self.times: list[int] = []
        self.values: list[float] = []
        self.anomalies: list[float | None] = []
        self.trimmed = False  # True once older readings were dropped (history is no longer complete)

    def as_json(self) -> dict[str, Any]:
        return {"t": self.times, "v": self.values, "a": self.anomalies, "trimmed": self.trimmed}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SensorBuffer):
            return NotImplemented
        return self.as_json() == other.as_json()


#: Estimated checkpoint bytes (JSON) of one sensor entry and of one reading in it; used to bound the
#: state by bytes (``max_state_bytes``), so the state in every batch manifest has a known ceiling.
SENSOR_ENTRY_BYTES = 48
READING_BYTES = 44
#: Default byte bound of one state (estimated JSON size); see docs/SECURITY.md.
MAX_STATE_BYTES = 8 * 1024 * 1024


def entry_bytes(sid: str, readings: int) -> int:
    """Estimated checkpoint size of one sensor's entry (UTF-8 of the id may be up to 4x its length)."""
    return SENSOR_ENTRY_BYTES + len(sid.encode("utf-8", "replace")) + readings * READING_BYTES


class SensorState:
    """Per-sensor buffers, least recently seen sensor first; ``nbytes`` estimates its checkpoint size."""

    __slots__ = ("nbytes", "sensors")

    def __init__(self) -> None:
        self.sensors: OrderedDict[str, SensorBuffer] = OrderedDict()
        self.nbytes = 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SensorState):
            return NotImplemented
        return list(self.sensors.items()) == list(other.sensors.items())

    def __repr__(self) -> str:
        return f"SensorState(sensors={len(self.sensors)})"
