"""The one wall clock in epoch milliseconds.

Why a module of one function: ``now_ms`` was written four times (event time, the gateway, the
sensor source, serving), two as ``int(time.time() * 1000)`` and two as
``time.time_ns() // 1_000_000``, which disagree by a millisecond now and then (float rounding).
One definition keeps every "is this in the future?" check on the same clock, and gives tests one
thing to patch.
"""

from __future__ import annotations

import time


def now_ms() -> int:
    """Current wall-clock time as integer epoch milliseconds (exact: integer nanoseconds // 10**6)."""
    return time.time_ns() // 1_000_000
