"""Featurizers shared by the stream worker (training rows) and serving (prediction inputs).

``get_featurizer(kind, version=None)`` returns the featurizer a model was (or will be) trained
with; see docs/ARCHITECTURE.md "Featurizers" for the contract and each module's docstring for
its features, labels and state. Importing this package registers every built-in version.
"""

from __future__ import annotations

from streaming.features import (  # noqa: F401  (registers)
    image,
    image_v2,
    sensor,
    sensor_v2,
    sensor_v3,
    weblog,
    weblog_v2,
)
from streaming.features.base import (
    FeatureRow,
    FeatureStateError,
    Featurizer,
    UnknownFeaturizerError,
    available_versions,
    current_version,
    get_featurizer,
)

__all__ = [
    "FeatureRow",
    "FeatureStateError",
    "Featurizer",
    "UnknownFeaturizerError",
    "available_versions",
    "current_version",
    "get_featurizer",
]
