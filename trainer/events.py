"""ModelUpdate events (schemas/ModelUpdate.avsc) on ``streaming.topics.model_updates_topic``.

Published only after the registry change they announce is durable, keyed by model name so the
updates of one model stay ordered (the topic is compacted: the last update per model survives).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from schemas.exceptions import StreamlearnError
from streaming.config import Settings
from streaming.topics import model_updates_topic
from trainer.exceptions import EventPublishError


def update_record(name: str, version: int, action: str, path: Path, *, reason: str | None = None,
                  primary_metric: str | None = None, candidate_score: float | None = None,
                  current_score: float | None = None) -> dict[str, Any]:
    return {"model": name, "version": int(version), "action": action, "path": str(path),
            "timestamp": int(time.time() * 1000), "primary_metric": primary_metric,
            "candidate_score": candidate_score, "current_score": current_score, "reason": reason}


def publish_update(settings: Settings, record: dict[str, Any], publisher: Any = None,
                   timeout_s: float = 30.0) -> None:
    """Send one ModelUpdate and wait for the broker's acknowledgement."""
    own = publisher is None
    try:
        if publisher is None:
            from streaming.producer import Publisher

            publisher = Publisher(settings)
        future = publisher.publish_to(model_updates_topic(settings), "ModelUpdate", record, key=record["model"])
        future.get(timeout=timeout_s)
    except StreamlearnError:
        raise
    except Exception as exc:  # kafka-python errors: the registry change is already durable, say so
        raise EventPublishError(
            f"ModelUpdate {record['action']} of {record['model']}/{record['version']}: not acknowledged by "
            f"Kafka at {settings.bootstrap} ({exc}); the registry already holds the change, so serving "
            "still sees it; re-announce with `streamlearn models promote` if needed"
        ) from exc
    finally:
        if own and publisher is not None:
            publisher.close()
