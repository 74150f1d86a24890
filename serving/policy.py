"""Version policy (latest | pinned:V | canary:V:SHARE) and the canary's live-error judge.

Canary routing uses ``zlib.crc32`` of the request id (never Python's salted ``hash()``), so the
same request id goes to the same version in every worker and after every restart.
"""

from __future__ import annotations

import threading
import zlib
from collections import deque
from dataclasses import dataclass

from serving.exceptions import PolicyError


@dataclass(frozen=True)
class Policy:
    """Which version(s) to serve. ``mode`` is ``latest``, ``pinned`` or ``canary``."""

    mode: str = "latest"
    version: int | None = None
    share: float = 0.0

    @classmethod
    def parse(cls, text: str | None) -> Policy:
        """Parse ``latest``, ``pinned:V`` or ``canary:V:SHARE`` (SHARE in (0, 1], e.g. 0.1)."""
        if text is None or text.strip() in ("", "latest"):
            return cls()
        parts = text.strip().split(":")
        try:
            if parts[0] == "pinned" and len(parts) == 2:
                return cls("pinned", int(parts[1]))
            if parts[0] == "canary" and len(parts) == 3:
                share = float(parts[2])
                if not 0.0 < share <= 1.0:
                    raise ValueError(share)
                return cls("canary", int(parts[1]), share)
        except ValueError:
            pass
        raise PolicyError(
            f"policy: {text!r} is not understood; use 'latest', 'pinned:<version>' or "
            "'canary:<version>:<share>' with 0 < share <= 1 (e.g. canary:4:0.1)"
        )

    def __str__(self) -> str:
        if self.mode == "pinned":
            return f"pinned:{self.version}"
        if self.mode == "canary":
            return f"canary:{self.version}:{self.share:g}"
        return "latest"


def canary_bucket(request_id: str) -> float:
    """A stable number in [0, 1) for a request id; ids below the share go to the candidate."""
    return (zlib.crc32(request_id.encode("utf-8")) & 0xFFFFFFFF) / 2**32


class CanaryJudge:
    """Bounded windows of live errors per version, and the rollback rule.

    Rollback when both versions have at least ``min_samples`` errors in their windows and the
    candidate's mean error exceeds ``stable_mean * (1 + rel_threshold) + abs_threshold``.
    Why both thresholds: the relative one scales with the task, the absolute one keeps a near-zero
    stable error from turning noise into a rollback.
    """

    def __init__(self, window: int = 200, min_samples: int = 30, rel_threshold: float = 0.2,
                 abs_threshold: float = 0.02) -> None:
        self.window = window
        self.min_samples = min_samples
        self.rel_threshold = rel_threshold
        self.abs_threshold = abs_threshold
        self._errors: dict[int, deque[float]] = {}
        self._lock = threading.Lock()

    def record(self, version: int, error: float) -> None:
        with self._lock:
            self._errors.setdefault(version, deque(maxlen=self.window)).append(error)

    def stats(self, version: int) -> tuple[int, float | None]:
        """(samples in the window, mean error or None)."""
        with self._lock:
            errs = list(self._errors.get(version, ()))
        return len(errs), (sum(errs) / len(errs) if errs else None)

    def verdict(self, stable: int, candidate: int) -> str | None:
        """A reason to roll back, or None while the candidate is not (yet) shown to be worse."""
        n_s, m_s = self.stats(stable)
        n_c, m_c = self.stats(candidate)
        if m_s is None or m_c is None or n_s < self.min_samples or n_c < self.min_samples:
            return None
        limit = m_s * (1.0 + self.rel_threshold) + self.abs_threshold
        if m_c > limit:
            return (f"candidate v{candidate} mean live error {m_c:.4f} over {n_c} answers > "
                    f"limit {limit:.4f} (stable v{stable}: {m_s:.4f} over {n_s})")
        return None

    def forget(self, version: int) -> None:
        with self._lock:
            self._errors.pop(version, None)
