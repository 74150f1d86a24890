"""Page-Hinkley drift detection on the live error of the promoted model (pure Python).

The trainer feeds it the per-row error of the promoted model on each *new* batch (prequential: the
model has not trained on it). A sustained upward shift of the mean error means the world changed;
the trainer then retrains before its timer would. Page-Hinkley (Page 1954; Hinkley 1971) keeps the
cumulative deviation ``m_t = sum(x_i - mean_i - delta)`` and its running minimum ``M_t``; it alarms
when ``m_t - M_t > threshold``. ``delta`` is the magnitude of change tolerated as noise, and
``min_instances`` avoids alarms while the mean estimate is still unstable. Only increases of the
error are detected (a model getting *better* is no reason to retrain).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class PageHinkley:
    """Streaming Page-Hinkley test for an increase of the mean of ``x``."""

    delta: float = 0.005
    threshold: float = 50.0
    min_instances: int = 30
    alpha: float = 1.0  # forgetting factor of the cumulative sum (1.0 = classic test)

    def __post_init__(self) -> None:
        if self.threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        self.reset()

    def reset(self) -> None:
        """Forget everything (called after a retrain: the new model has a new error level)."""
        self.n = 0
        self.mean = 0.0
        self.cumulative = 0.0
        self.minimum = 0.0
        self.drift_detected = False

    @property
    def statistic(self) -> float:
        """``m_t - M_t``: how far the cumulative deviation rose above its minimum."""
        return self.cumulative - self.minimum

    def update(self, x: float) -> bool:
        """Add one observation; returns True when drift is detected at this observation."""
        x = float(x)
        if x != x:  # NaN errors (unknown labels) carry no information
            return False
        self.n += 1
        self.mean += (x - self.mean) / self.n
        self.cumulative = self.alpha * self.cumulative + (x - self.mean - self.delta)
        self.minimum = min(self.minimum, self.cumulative)
        self.drift_detected = self.n >= self.min_instances and self.statistic > self.threshold
        return self.drift_detected

    def update_many(self, xs: Iterable[float]) -> bool:
        """Feed several observations; True when any of them triggered the alarm."""
        fired = False
        for x in xs:
            fired = self.update(x) or fired
        return fired
