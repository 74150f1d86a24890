"""The serving worker: consume requests (or raw events), batch, predict, produce answers.

Exactly once (``settings.transactions``, the default): each dynamic batch is one Kafka transaction
holding its Prediction records, its dead letters and the consumer offsets
(``send_offsets_to_transaction``), so after a crash the batch is either wholly answered and
consumed or wholly redone. The transactional id and the static group member id are stable per
worker *slot*, so a restarted worker fences its dead predecessor's open transaction and takes its
partitions back at once. Readers of the predictions topic use ``read_committed``.

At-least-once (``transactions=False``): answers are flushed before offsets are committed; a
bounded set of recently answered request ids drops re-deliveries inside one process, and the
predict client de-duplicates by request id across restarts.

Dynamic batching: a batch closes at ``settings.serve_max_batch`` records or
``settings.serve_max_wait_ms`` after its first record, whichever comes first; the whole batch goes
through the model in one signature call per version (see :mod:`serving.model`).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from kafka.errors import FencedInstanceIdError

from schemas.exceptions import RegistryUnavailableError
from schemas.registry import SchemaRegistry, open_registry
from schemas.serde import AvroDeserializer
from serving import metrics
from serving.emit import Emitter, Item
from serving.exceptions import NoModelVersionError, RequestDecodeError
from serving.heap import freeze_startup_heap
from serving.inputs import Featurization
from serving.labels import LabelJoiner
from serving.model import configure_tf_threads
from serving.policy import Policy
from serving.replies import ReplyTopics, SerializerCache, cut_id
from serving.tfimport import import_tensorflow
from serving.txn import serving_producer_overrides
from serving.versions import VersionManager
from streaming import onerror
from streaming.config import Settings
from streaming.kafka_security import kafka_security
from streaming.limits import MAX_ID_CHARS, BrokerLimits, short
from streaming.onerror import OnError
from streaming.rejoin import Rejoiner, held
from streaming.topics import (
    DAY_MS,
    KINDS,
    dead_letter_topic,
    declared_topics,
    ensure_topics,
    model_updates_topic,
    predictions_topic,
    raw_topic,
    requests_topic,
)

log = logging.getLogger(__name__)


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)[:240]


CLIENT_CLOSE_S = 5.0  # each Kafka client's close: kafka-python's producer otherwise waits for ever on a stuck batch
CLOSE_SLOW_S = 5.0  # a stop slower than this logs where its time went


class ServingWorker(Emitter):
    """One worker process slot. ``run()`` blocks until ``stop`` is set (or a fatal Kafka error)."""

    def __init__(self, settings: Settings, model: str, *, policy: Policy | None = None,
                 score_stream: str | None = None, slot: int | None = None, manager: VersionManager | None = None,
                 registry: SchemaRegistry | None = None, featurization: Featurization | None = None,
                 tf_threads: int | None = 1, on_error: OnError = onerror.dead_letter, standby: bool | None = None,
                 on_active: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.model = model
        #: warm standby (streaming.standby, docs/STANDBY.md): when the slot's active process lives, load and
        #: warm the model, then wait on its lock without any Kafka client; ``on_active`` runs once this
        #: process holds its slot (the command starts /metrics and HTTP there, so a standby binds no port).
        self.standby = settings.serve_standby if standby is None else standby
        self.on_active = on_active
        self.role = "active"  # "standby" while waiting (streamlearn status reads the member files)
        #: what a request that cannot be decoded gets (streaming/onerror.py): by default an error answer
        #: and a dead letter; "raise" stops the worker.
        self.on_error = on_error
        self.score_stream = score_stream
        if score_stream is not None and score_stream not in KINDS:
            raise RequestDecodeError(f"score_stream: {score_stream!r} is not an event kind; use one of "
                                     f"{sorted(KINDS)}")
        self.slot = slot
        self.tf_threads = tf_threads  # see serving.model.configure_tf_threads; None keeps TF's defaults
        # A standby follows the registry by polling files only; the models.updates consumer starts at takeover.
        self.manager = manager or VersionManager(settings, model, policy, poll_interval_s=settings.serve_poll_s,
                                                 follow_updates=not self.standby)
        self.schemas = registry or open_registry(settings.registry_url, settings.registry_dir)
        self.featurization = featurization or Featurization()
        self.input_topic = raw_topic(settings, score_stream) if score_stream else requests_topic(settings, model)
        suffix = f".score.{score_stream}" if score_stream else ""
        self.group = settings.group(f"serving.{model}{suffix}")
        # The slot (hence the static member id and the transactional id) is claimed when the clients are
        # made (streaming.members): the lowest free one, or ``slot`` when given.
        self.lease: Any = None
        self.member_id = ""
        self.transactional_id = ""
        self.stuck: Any = None
        self.waiting: Any = None  # the streaming.standby.Standby place while this process is a standby
        self.took_over_at: float | None = None  # monotonic: when a standby got its slot
        self.predictions = predictions_topic(settings, model)
        self.dead_letters = dead_letter_topic(settings, "serving")
        self._deserializer = AvroDeserializer(self.schemas)
        self._serializers = SerializerCache(self.schemas)
        self.replies = ReplyTopics(settings, model, self.predictions)
        self.broker_limits = BrokerLimits(settings.bootstrap, settings.max_record_bytes,
                                          security=kafka_security(settings))
        self._redo_backoff_s = 0.0
        self._answered: OrderedDict[str, None] = OrderedDict()
        self.answered = 0
        self.batches = 0
        self.consumer: Any = None
        self.poller: Any = None
        self.labels: LabelJoiner | None = None
        self.producer: Any = None
        self.stop_event = threading.Event()
        self._models_error: BaseException | None = None
        self.first_batch_at: float | None = None  # monotonic: first batch received, last one committed
        self.last_batch_at: float | None = None
        source = "stream" if score_stream else "requests"
        self._m_ok = metrics.REQUESTS.labels(model, "ok", source)  # bound once: no label lookups per record
        self._m_err = metrics.REQUESTS.labels(model, "error", source)
        self._m_latency = metrics.LATENCY.labels(model)
        self._m_batch = metrics.BATCH_SIZE.labels(model)

    # -- setup ---------------------------------------------------------------------------------
    def _topics(self) -> None:
        wanted = {self.input_topic, self.predictions, self.dead_letters, model_updates_topic(self.settings)}
        specs = [s for s in declared_topics(self.settings, [self.model]) if s.name in wanted]
        ensure_topics(self.settings, specs)

    def _clients(self) -> None:
        from kafka import KafkaConsumer, KafkaProducer

        from streaming import members
        from streaming.consumer import IdlePoller, consumer_config
        from streaming.producer import producer_config

        role = f"serve-{self.model}"
        if self.lease is None:  # a standby holds its slot already (serving.takeover)
            self.lease = members.claim(self.settings, self.group, role, slot=self.slot)
        self.slot = int(self.lease.slot)
        self.member_id = self.lease.instance_id
        # Named like the member (group, host, HOME hash, slot): replicas on other hosts or containers
        # (compose --scale) never fence each other, while a restart here fences its dead predecessor.
        self.transactional_id = _safe_id(f"{self.member_id}.tx")
        try:  # members of this host whose process is gone would hold their partitions forever
            members.remove_dead_local(self.settings, self.group, quick=True)
        except Exception as exc:
            log.info("could not check group %s for dead members: %s", self.group, exc)
        self.stuck = members.StuckWatch(self.settings, self.group, self.input_topic, self.lease,
                                        f"serving worker {self.model} ({self.member_id})")
        # noida-db can drop a parked JoinGroup and wedge the group (docs/GROUP_JOIN.md): `up --workers
        # serve.M=2` starts two members of one group as close together as the stream workers that hit it.
        self.rejoin = Rejoiner(self.settings, self.group, self.lease, self.stuck.what, self.stuck.timeout_s)
        max_batch = max(1, self.settings.serve_max_batch)
        self.consumer = KafkaConsumer(**consumer_config(
            self.settings, group_id=self.group, group_instance_id=self.member_id, client_id=members.client_id(role),
            max_poll_records=max_batch, isolation_level="read_committed", enable_auto_commit=False))
        self.consumer.subscribe([self.input_topic])
        # Sleeps between empty polls (no fetch spin on the embedded broker); SIGTERM ends a back-off at once.
        self.poller = IdlePoller(self.consumer, wake=self.stop_event)
        # max_block_ms: a send never waits a minute for metadata of a topic that vanished.
        extra: dict[str, Any] = {"linger_ms": 0, "max_block_ms": 10_000}
        if self.settings.transactions:
            extra["transactional_id"] = self.transactional_id
            extra.update(serving_producer_overrides())  # a re-sent transactional request waits 20 ms, not 2x100
        self.producer = KafkaProducer(**producer_config(self.settings, **extra))
        if self.settings.transactions:
            self.producer.init_transactions()  # fences and aborts a dead predecessor's open transaction

    def close(self) -> None:
        """Stop the threads and the clients, each bounded: a stop must finish well inside a supervisor's
        SIGTERM grace period even when the broker or a thread is slow (each step's time is logged when
        the whole took longer than CLOSE_SLOW_S, so a slow stop says where it waited)."""
        self.stop_event.set()
        if self.watchdog is not None:
            self.watchdog.stop()
        steps: list[tuple[str, float]] = []
        began = last = time.monotonic()

        def step(name: str) -> None:
            nonlocal last
            now = time.monotonic()
            steps.append((name, now - last))
            last = now

        self.manager.stop()
        step("version threads")
        if self.labels is not None:
            self.labels.stop()
            step("label joiner")
        if self.waiting is not None:
            self.waiting.release()
            self.waiting = None
        if self.poller is not None:
            self.poller.close()
        closers = ((self.consumer, lambda c: c.close(timeout_ms=int(CLIENT_CLOSE_S * 1000))),
                   (self.producer, lambda p: p.close(timeout=CLIENT_CLOSE_S)))  # an open transaction is aborted
        for client, close in closers:
            if client is not None:
                try:
                    close(client)
                except Exception as exc:  # closing after a broker loss must not hide the original error
                    log.warning("closing %s: %s", type(client).__name__, exc)
                step(type(client).__name__)
        if time.monotonic() - began > CLOSE_SLOW_S:
            log.warning("stopping %s took %.1f s: %s", self.model, time.monotonic() - began,
                        ", ".join(f"{name} {took:.1f} s" for name, took in steps))
        self.consumer = self.producer = None
        if self.lease is not None:
            self.lease.release()  # a clean stop leaves the group (static members do not by themselves)
            self.lease = None

    # -- main loop -----------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, ready_timeout_s: float | None = None) -> None:
        """Serve until ``stop`` (or :attr:`stop_event`) is set. Requests wait (fetched at most one
        batch ahead, never committed) until a version is ready, so none is answered by "no model"."""
        stop = stop or self.stop_event
        # Loading a new version (Python-heavy SavedModel restore) runs in a background thread; a
        # shorter GIL switch interval bounds how long it can stall the batch loop (p99 during swaps).
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        # TensorFlow's import (10-20 s on a small box) and the first version's load run in the
        # background while this thread makes the topics, claims the slot, fences the predecessor's
        # transaction and joins the group: a restart answers as soon as the model is ready.
        models = threading.Thread(target=self._start_models, name=f"models-{self.model}", daemon=True)
        models.start()
        try:
            if not self.standby and self.on_active is not None:
                self.on_active()
            self._topics()
            if self.standby:
                from serving.takeover import await_slot

                if not await_slot(self, stop, models):
                    return
                if self.on_active is not None:
                    self.on_active()
            self._clients()
            pending = self._prefetch(stop, models, ready_timeout_s)
            if pending is None:
                return
            self._serve_loop(stop, pending)
        finally:
            self.close()

    def _start_models(self) -> None:
        started = time.monotonic()
        try:
            if self.tf_threads is not None:
                configure_tf_threads(self.tf_threads)
            import_tensorflow()
            # Before the first version loads: versions come and go with swaps and must stay collectable.
            freeze_startup_heap()
            log.info("TensorFlow imported in %.1f s; loading %s", time.monotonic() - started, self.model)
            self.manager.start()
        except BaseException as exc:  # re-raised by the serving thread (_prefetch)
            self._models_error = exc

    def _prefetch(self, stop: threading.Event, models: threading.Thread,
                  ready_timeout_s: float | None) -> list[Any] | None:
        """Join the group and fetch the first batch while the model loads; None when stopped first.

        Fetched records stay uncommitted in memory until answered, so a crash here loses nothing.
        Polling stops once one batch is held (the heartbeat thread keeps the membership).
        """
        deadline = None if ready_timeout_s is None else time.monotonic() + ready_timeout_s
        pending: list[Any] = []
        while True:
            if self._models_error is not None:
                raise self._models_error
            if not models.is_alive() and self.manager.wait_ready(0):
                return pending
            if stop.is_set() or (deadline is not None and time.monotonic() > deadline):
                return None
            if not pending:
                pending = self._collect()
                self.stuck.observe(held(self.consumer))
                if pending:
                    log.info("joined group %s; %d requests fetched, waiting for the model", self.group,
                             len(pending))
            elif models.is_alive():
                models.join(0.2)
            else:
                self.manager.wait_ready(0.2)

    def _serve_loop(self, stop: threading.Event, pending: list[Any]) -> None:
        stable = self.manager.current().stable
        if self.manager.policy.mode == "canary" and not self.score_stream and stable is not None \
                and stable.featurizer is not None:  # labels arriving later on the raw topic judge the canary
            self.labels = LabelJoiner(self.settings, stable.featurizer.kind, self.manager).start()
        log.info("serving %s from %s (group %s, slot %d, %s)", self.model, self.input_topic, self.group,
                 self.slot, "exactly once" if self.settings.transactions else "at least once")
        self._rewind(pending)  # re-read the held batch through a poll: a rebalance meanwhile is applied first
        pending = []
        if self.watchdog is not None:  # from here on the loop comes round at least every ~250 ms
            self.watchdog.start()
        while not stop.is_set() and not self.stop_event.is_set():
            if self.watchdog is not None:
                self.watchdog.beat()
            records, pending = pending or self._collect(), []
            self.stuck.observe(held(self.consumer))
            if records:
                if self.first_batch_at is None:
                    self.first_batch_at = time.monotonic()
                    if self.took_over_at is not None:
                        log.info("first batch %.2f s after taking over", self.first_batch_at - self.took_over_at)
                self._handle(records)

    def _collect(self) -> list[Any]:
        """One dynamic batch: up to serve_max_batch records, at most serve_max_wait_ms after the first."""
        max_batch = max(1, self.settings.serve_max_batch)
        try:
            polled = self.poller.poll(timeout_ms=250, max_records=max_batch)
        except FencedInstanceIdError as exc:
            if not self.rejoin.fenced(exc):  # our own self-removal answered the wedged join
                raise
            polled = {}
        self.rejoin.check(self.consumer, held(self.consumer))
        records = [r for recs in polled.values() for r in recs]
        if not records:
            return records
        deadline = time.monotonic() + self.settings.serve_max_wait_ms / 1000.0
        while len(records) < max_batch:
            left_ms = (deadline - time.monotonic()) * 1000.0
            if left_ms <= 0:
                break
            polled = self.poller.poll(timeout_ms=max(1, int(left_ms)), max_records=max_batch - len(records))
            records.extend(r for recs in polled.values() for r in recs)
        return records

    # -- one batch ---------------------------------------------------------------------------------
    def _decode(self, rec: Any) -> Item:
        """Decode one record into an item (``error`` set when it cannot be decoded or breaks a bound).

        Ids are capped (MAX_ID_CHARS): a longer request id or key is answered with an error under a
        cut id (head + sha256 of the whole), and the reply topic must pass the allow-list.
        """
        key = rec.key.decode("utf-8", "replace") if rec.key else None
        fallback_id = cut_id(key, MAX_ID_CHARS) if key else f"{rec.topic}/{rec.partition}/{rec.offset}"
        item = Item(rec, fallback_id, int(rec.timestamp), self.predictions)
        try:
            value = self._deserializer(rec.value).value
        except RegistryUnavailableError:
            raise  # not the record's fault: retry the batch, never dead-letter
        except Exception as exc:
            if onerror.decide(self.on_error, "decode", exc, rec) == "raise":
                raise
            item.error = RequestDecodeError(f"value: cannot decode the record: {type(exc).__name__}: {exc}")
            return item
        if self.score_stream:
            item.request_id = f"{rec.topic}/{rec.partition}/{rec.offset}"
            item.value = value
            return item
        if not isinstance(value, dict) or "request_id" not in value:
            item.error = RequestDecodeError("value: not a PredictionRequest record")
            return item
        rid = str(value["request_id"])
        if not rid:  # an answer keyed b"" with request_id "" is one no client can match to its request
            item.error = RequestDecodeError("request_id: empty; give every request an id its answer can carry")
            return item
        item.request_id = cut_id(rid, MAX_ID_CHARS)
        if len(rid) > MAX_ID_CHARS:
            item.error = RequestDecodeError(f"request_id: {len(rid)} characters, over the limit of {MAX_ID_CHARS}; "
                                            "the answer carries its first 64 characters and sha256")
            return item
        try:
            item.timestamp_ms = int(value.get("timestamp") or rec.timestamp)
        except (TypeError, ValueError, OverflowError):
            item.timestamp_ms = int(rec.timestamp)
        # a request's own timestamp further than a day from its record's is not believed (latency is measured
        # from it)
        if abs(item.timestamp_ms - int(rec.timestamp)) > DAY_MS:  # -2**62 was a latency of 4.6e18 ms in the
            item.timestamp_ms = int(rec.timestamp)  # answer and the latency histogram: the record's time instead
        problem = self.replies.problem(value.get("reply_topic"))
        if problem is not None:
            item.error = RequestDecodeError(problem)  # answered on the default topic, and dead-lettered
            return item
        asked = value.get("model")
        if asked and asked not in (self.model, self.settings.topic(self.model)):
            # The topic chose this model; answering a request meant for another would pass off this
            # model's outputs as that one's. It is answered with an error (and dead-lettered) instead.
            item.error = RequestDecodeError(
                f"model: the request asks for {str(asked)[:100]!r}, but {self.input_topic} is {self.model!r}'s "
                "requests topic; publish it to the requests topic of the model it asks for")
            return item
        item.reply_topic = value.get("reply_topic") or self.predictions
        item.value = value
        return item

    def _featurize(self, item: Item, snap_route: Any) -> None:
        try:
            lv = snap_route(item.request_id)
        except NoModelVersionError as exc:
            item.error = exc
            return
        item.version = lv
        value = item.value
        try:
            if self.score_stream:
                item.x, item.labels = self.featurization.featurize(value, lv)
            elif value.get("event_json") is not None:
                item.event = self.featurization.event_from_json(value["event_json"], lv)
                item.x, item.labels = self.featurization.featurize(dict(item.event), lv)
            else:
                item.x, item.labels = self.featurization.request_input(value, lv)
        except RecursionError as exc:  # any per-record failure is that record's error, never the worker's
            item.error = RequestDecodeError(f"request: nested too deeply to featurize ({exc})")
            item.labels = None
        except Exception as exc:
            item.error = exc if isinstance(exc, RequestDecodeError) else RequestDecodeError(
                f"request: cannot featurize: {type(exc).__name__}: {short(str(exc), 500)}")
            item.labels = None

    def _rewind(self, records: list[Any]) -> None:
        """Seek back to the first offset of each partition of ``records`` that this member still owns.

        The batch fetched while the model loaded may be many seconds old: another replica may have
        joined and taken its partition meanwhile, and kafka-python applies such a rebalance only in
        a poll. Seeking back and polling again answers what this member owns after that poll.
        """
        from kafka import TopicPartition

        first: dict[Any, int] = {}
        for rec in records:
            first.setdefault(TopicPartition(rec.topic, rec.partition), rec.offset)
        owned = self.consumer.assignment()
        for tp, offset in first.items():
            if tp in owned:
                self.consumer.seek(tp, offset)

    def _owned(self, records: list[Any]) -> list[Any]:
        """Only the records of partitions this member owns now.

        Why: a batch fetched before a rebalance (held while the model loaded, or fetched just before
        another replica joined) may belong to a partition that moved; its new owner reads it again
        from the committed offset, so answering it here would answer it twice. The embedded broker
        does not refuse a stale generation's transactional offset commit (Apache Kafka does, through
        ``group_metadata()``), so the check has to happen here (docs/LEADER.md).
        """
        from kafka import TopicPartition

        owned = self.consumer.assignment()
        kept = [r for r in records if TopicPartition(r.topic, r.partition) in owned]
        if len(kept) < len(records):
            log.info("dropped %d fetched requests of partitions this replica no longer owns; their new owner "
                     "answers them", len(records) - len(kept))
        return kept

    def _handle(self, records: list[Any]) -> None:
        records = self._owned(records)
        if not records:
            return
        snap = self.manager.current()  # one snapshot for the whole batch (atomic swap boundary)
        items = [self._decode(r) for r in records]
        if not self.settings.transactions:
            fresh = [i for i in items if i.request_id not in self._answered]
            if len(fresh) < len(items):
                metrics.DUPLICATES.labels(self.model).inc(len(items) - len(fresh))
            items = fresh
        for item in items:
            if item.error is None:
                self._featurize(item, snap.route)
        groups: dict[int, list[Item]] = {}
        for item in items:
            if item.error is None and item.version is not None and item.x is not None:
                groups.setdefault(item.version.version, []).append(item)
        for group in groups.values():
            lv = group[0].version
            assert lv is not None
            xs = np.stack([i.x for i in group])  # type: ignore[misc]
            try:
                out = lv.predict(xs)
            except Exception as exc:  # a version that fails on these inputs answers them with errors
                log.warning("%s v%d failed on a batch of %d: %s", self.model, lv.version, len(group), exc)
                for i in group:
                    i.error = RequestDecodeError(f"model: v{lv.version} failed: {type(exc).__name__}: "
                                                 f"{short(str(exc), 300)}")
                continue
            lv.observe_inputs(xs)
            self._m_batch.observe(len(group))
            for i, row, as_list, label in zip(group, out, out.astype(np.float64).tolist(),
                                              lv.predicted_labels(out), strict=True):
                i.outputs, i.output_list, i.label = row, as_list, label
            self.manager.remember_input(group[-1].x)  # type: ignore[arg-type]
        if not self._emit(records, items, snap.stable.version if snap.stable else -1):
            return  # the broker refused the batch twice: it is redone (seeked back), not judged
        for item in items:  # live errors feed the canary judge only once the answers are committed
            if item.outputs is None or item.version is None or item.error is not None:
                continue
            if self.score_stream:  # events of the raw topic, produced by ingest: their labels count
                err = item.version.error(item.outputs, item.labels)
                if err is not None:
                    self.manager.record_error(item.version.version, err)
            elif item.event is not None and self.labels is not None:
                # A request's own label is never trusted (anyone can write one): the answer waits
                # for the same event, labelled, on the raw topic ingest produced (serving.labels).
                self.labels.remember(item.event, item.version, item.outputs)
