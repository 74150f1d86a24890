"""Web-log featurizer ``weblog-v2``: ``weblog-v1``'s 64 features plus a label every log carries.

Why a new version: v1's training label ``is_bot_or_attack`` exists only when the producer labels
events (the generator does, a real access log never does), so a real combined/common log trained
nothing. v2 adds ``is_failed`` = 1.0 when the response status is >= 400 (client or server error),
else 0.0: a target the log itself states for every line, with no rule or guess involved. The
``weblog_classifier`` spec predicts it from the request alone (method, path, query, user agent,
client rate, time) and excludes the features that *are* the answer (status class, response size,
latency), see trainer/specs/weblog.py and docs/MODELS.md.

The feature vector is exactly v1's (same names, order and values), so serving and training build
the same vector; only ``label_names`` grows. v1 stays registered for models trained on it.
"""

from __future__ import annotations

from typing import Any

from streaming.features.base import FeatureRow, register
from streaming.features.weblog import WeblogFeaturizer, WeblogState

VERSION = "weblog-v2"
#: features that describe the server's answer, not the request (a model predicting the answer
#: from the request must not see them).
OUTCOME_FEATURES = ("status_1xx", "status_2xx", "status_3xx", "status_4xx", "status_5xx", "log1p_bytes",
                    "log1p_latency_ms", "latency_missing")


class WeblogFeaturizerV2(WeblogFeaturizer):
    """v1 features; labels ``is_bot_or_attack`` (source label), ``is_error`` (>= 500), ``is_failed`` (>= 400)."""

    version = VERSION
    label_names = ["is_bot_or_attack", "is_error", "is_failed"]

    def _row(self, record: dict[str, Any], state: WeblogState, run: str | None) -> FeatureRow:
        """v1's row plus ``is_failed``. Overridden here, under both the live and the backfill entry:
        overriding ``featurize`` alone left every backfilled line (and every generated one) unlabelled."""
        row = super()._row(record, state, run)  # validates status as an int in 100..599
        labels = dict(row.labels)
        labels["is_failed"] = 1.0 if int(record["status"]) >= 400 else 0.0
        return FeatureRow(row.x, labels, row.event_time_ms, row.key)


register("weblog", VERSION, WeblogFeaturizerV2, current=True)
