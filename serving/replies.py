"""Where and how big the serving worker's answers may be: the reply-topic allow-list and answer cutting.

Why: a request is written by whoever can produce to the requests topic. Without a boundary it could
make the worker write Prediction records into any topic (another model's predictions,
``models.updates``), register a schema subject per topic, or make an answer larger than the broker
takes, which used to abort and redo the same batch forever (issue 12, item 1).

* :class:`ReplyTopics` allows the model's predictions topic and the configured patterns only
  (``reply_topics``, default ``{predictions}.*``, i.e. ``<prefix><model>.predictions.<suffix>``);
  an allowed topic must also exist (topics are never created for a request). Anything else is that
  request's error: the worker answers on the default topic and dead-letters the request.
* :class:`SerializerCache` is a bounded LRU of Avro serializers (one per reply topic).
* :func:`cut_answer` replaces an answer that would not fit the broker with an error answer that
  keeps the sha256 and size of what was cut.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from schemas.catalog import load_schema
from schemas.registry import SchemaRegistry
from schemas.serde import AvroSerializer
from streaming import tenancy
from streaming.config import Settings
from streaming.kafka_security import kafka_security
from streaming.limits import short

log = logging.getLogger(__name__)

#: Kafka's own rule for topic names (kafka-python raises ValueError for anything else).
LEGAL_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
#: Serializers kept (one per reply topic in use); the least recently used is dropped beyond this.
MAX_SERIALIZERS = 32
#: How often the list of existing topics is refreshed when a request names an unknown one.
TOPIC_REFRESH_S = 5.0
#: Longest error text put into an answer (messages may quote hostile values).
MAX_ERROR_CHARS = 1000


class ReplyTopics:
    """Decides whether a request may be answered on the topic it names."""

    def __init__(self, settings: Settings, model: str, predictions: str,
                 list_topics: Callable[[], set[str]] | None = None) -> None:
        self.predictions = predictions
        self.patterns = [p.strip().replace("{predictions}", predictions).replace("{model}", model)
                         for p in settings.reply_topics.split(",") if p.strip()]
        self._bootstrap = settings.bootstrap
        self._settings = settings
        self._list_topics = list_topics or self._admin_topics
        self._known: set[str] = set()
        self._refreshed_at = float("-inf")

    def problem(self, topic: Any) -> str | None:
        """None when ``topic`` may be answered on; else the reason, for the request's error answer."""
        if topic is None or topic == "" or topic == self.predictions:
            return None
        if not isinstance(topic, str) or not LEGAL_TOPIC.match(topic) or topic in (".", ".."):
            return (f"reply_topic: {short(repr(topic), 80)} is not a legal topic name; use the model's "
                    f"predictions topic {self.predictions!r} or leave it null")
        if not tenancy.allowed(self._settings, topic):
            return (f"reply_topic: {topic!r} is outside tenant {self._settings.tenant!r}'s topics "
                    f"({self._settings.namespace!r}...); use the model's predictions topic {self.predictions!r}")
        if not any(fnmatch.fnmatchcase(topic, p) for p in self.patterns):
            return (f"reply_topic: {topic!r} is not allowed for this model; allowed: {self.predictions!r} "
                    f"and {self.patterns} (setting reply_topics, env STREAMLEARN_REPLY_TOPICS)")
        if not self._exists(topic):
            return f"reply_topic: {topic!r} does not exist; create it first (topics are never created for a request)"
        return None

    def _exists(self, topic: str) -> bool:
        if topic in self._known:
            return True
        now = time.monotonic()
        if now - self._refreshed_at >= TOPIC_REFRESH_S:
            self._refreshed_at = now
            try:
                self._known = set(self._list_topics())
            except Exception as exc:  # the broker will tell the send; until then the topic is unknown
                log.warning("cannot list topics to check reply topics: %s", exc)
        return topic in self._known

    def forget(self, topic: str) -> None:
        """A send to ``topic`` failed: check it again before the next use."""
        self._known.discard(topic)

    def _admin_topics(self) -> set[str]:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=self._bootstrap, request_timeout_ms=5000,
                                 **kafka_security(self._settings))
        try:
            return set(admin.list_topics())
        finally:
            admin.close()


class SerializerCache:
    """Bounded LRU of Prediction serializers per topic (subject ``<topic>-value``)."""

    def __init__(self, registry: SchemaRegistry, capacity: int = MAX_SERIALIZERS) -> None:
        self.registry = registry
        self.capacity = capacity
        self._items: OrderedDict[str, AvroSerializer] = OrderedDict()

    def __call__(self, topic: str) -> AvroSerializer:
        ser = self._items.get(topic)
        if ser is None:
            ser = self._items[topic] = AvroSerializer(self.registry, f"{topic}-value", load_schema("Prediction"))
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(topic)
        return ser

    def __len__(self) -> int:
        return len(self._items)

    def drop(self, topic: str) -> None:
        """Forget ``topic``'s serializer (its subject refused the schema; ask again next time)."""
        self._items.pop(topic, None)


def error_text(error: BaseException) -> str:
    """The ``error`` field of an answer: class and message, cut to MAX_ERROR_CHARS."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + f"...({len(text)} chars)"


def cut_id(text: str, max_chars: int) -> str:
    """An id too long to echo: its head plus the sha256 of the whole (so the client can match it)."""
    if len(text) <= max_chars:
        return text
    head = text[:64]
    return f"{head}...#sha256:{hashlib.sha256(text.encode('utf-8', 'replace')).hexdigest()}"


def cut_answer(pred: dict[str, Any], encoded_size: int, budget: int) -> dict[str, Any]:
    """An error answer in place of ``pred`` whose encoding (``encoded_size`` bytes) is over ``budget``."""
    body = repr(sorted(pred.items())).encode("utf-8", "replace")
    return {**pred, "outputs": [], "predicted_label": None,
            "error": (f"AnswerTooLargeError: the answer is {encoded_size} bytes, over the {budget} bytes the "
                      f"broker takes; cut (sha256 of the answer {hashlib.sha256(body).hexdigest()}, "
                      f"{len(pred.get('outputs') or [])} outputs)")}
