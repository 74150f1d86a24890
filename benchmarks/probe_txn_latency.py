"""Probe: where does the time of a serving transaction go (begin, sends, send_offsets, commit)?

Why (docs/SERVING_LATENCY.md, "The transaction tail"): the serving worker's batch cycle is one Kafka
transaction (``serving/emit.py``), and ``bench_serving``'s row "p99 during swaps vs steady" flipped
between runs; timers showed ``send_offsets_to_transaction`` usually ~8 ms but up to 259 ms. This probe
runs the same cycle as the worker, without a model, against the embedded broker:

    begin_transaction / send N records / send_offsets_to_transaction / commit_transaction

at a fixed rate (``--rate`` loops/s), with a transactional producer configured as the worker's
(``producer_config`` with ``linger_ms=0``) and a consumer that joined a group (its
``group_metadata()`` goes with the offsets, as the worker's does). It times each call with
``time.perf_counter`` and, through thin wrappers on kafka-python's transaction handler (instrumentation
only, this file alone), each transactional request: its round trip from the socket send to the response,
its error code, and whether the sender sent it as a *retry* (kafka-python then sleeps the producer's
``retry_backoff_ms`` before sending it). Percentiles per call and per request kind, the slow loops with
their request trace, and the retries by error, JSON out.

    python -m benchmarks.probe_txn_latency [--loops 2000] [--rate 20] [--records 8] [--load 0]
        [--retry-backoff-ms 100]
        [--producers 1] [--gil-threads 0] [--switch-interval-ms 1]

``--load K`` starts K busy Python processes (a pure-Python spin) for the run, to show the tail on a
loaded box; ``--gil-threads K`` K busy threads in the probe's own process (GIL contention, as the
worker's other threads), with ``--switch-interval-ms`` (the worker sets 1 ms); ``--producers K`` splits
the loops over K successive producers of one transactional id (restarts), each first transaction apart;
``--retry-backoff-ms`` overrides the producer's ``retry_backoff_ms`` (default: the serving worker's,
``serving.txn.TXN_RETRY_BACKOFF_MS``; ``--retry-backoff-ms 100`` is kafka-python's default, the "before").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.producer import transaction_manager as tm
from kafka.structs import OffsetAndMetadata

from benchmarks.common import bench_settings, machine, write_report
from streaming import config
from streaming.consumer import consumer_config
from streaming.producer import producer_config
from streaming.topics import TopicSpec, ensure_topics

try:  # the serving worker's producer settings, where this branch has them
    from serving.txn import serving_producer_overrides
except ImportError:  # pragma: no cover - a base without serving.txn: kafka-python's defaults
    def serving_producer_overrides() -> dict[str, Any]:
        return {}

JOIN_DEADLINE_S = 30.0

#: Per transactional request: (handler class, sent perf_counter, done perf_counter, error code, retry?)
_TRACE: list[tuple[str, float, float, int | None, bool]] = []
_SENT: dict[int, float] = {}
_ORIGINAL: dict[str, Any] = {}
_INIT: list[float] = []  # seconds of each producer's init_transactions


def _instrument(producer: KafkaProducer) -> None:
    """Record every transactional request's round trip (instrumentation for this probe only)."""
    client = producer._sender._client  # noqa: SLF001 - the probe measures the client's internals
    send = client.send

    def timed_send(node_id: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        kind = type(request).__name__.split("_")[0]
        if kind in _TXN_REQUESTS:
            _SENT[id(request)] = time.perf_counter()
        future = send(node_id, request, *args, **kwargs)
        if kind == "ProduceRequest":  # the records' own round trip (EndTxn waits for its ack)
            sent = time.perf_counter()

            def produced(response_or_exc: Any) -> None:
                code = None
                for topic in getattr(response_or_exc, "responses", []) or []:
                    for part in topic.partition_responses:
                        code = max(code or 0, part.error_code)
                _TRACE.append(("Produce", sent, time.perf_counter(), code, False))

            future.add_both(produced)
        return future

    client.send = timed_send
    if _ORIGINAL:
        return
    on_complete = _ORIGINAL["on_complete"] = tm.TxnRequestHandler.on_complete

    def timed_complete(self: Any, correlation_id: int, response_or_exc: Any) -> None:
        done = time.perf_counter()
        sent = _SENT.pop(id(self.request), done)
        code = getattr(response_or_exc, "error_code", None)
        if code is None and hasattr(response_or_exc, "topics"):  # TxnOffsetCommit: per partition
            codes = [c for _, parts in response_or_exc.topics for _, c in parts]
            code = max(codes) if codes else None
        _TRACE.append((type(self).__name__, sent, done, code, self.is_retry))
        on_complete(self, correlation_id, response_or_exc)

    tm.TxnRequestHandler.on_complete = timed_complete


def _uninstrument() -> None:
    """Put kafka-python's handler back (the probe also runs inside the test process)."""
    if "on_complete" in _ORIGINAL:
        tm.TxnRequestHandler.on_complete = _ORIGINAL.pop("on_complete")


_TXN_REQUESTS = {"AddPartitionsToTxnRequest", "AddOffsetsToTxnRequest", "TxnOffsetCommitRequest",
                 "EndTxnRequest", "FindCoordinatorRequest", "InitProducerIdRequest"}


def _schedstat(path: str) -> tuple[int, int]:
    """(CPU ns, run-queue wait ns) of a thread: the wait is time it was runnable but had no CPU."""
    try:
        with open(path) as f:
            cpu, wait, _ = f.read().split()
        return int(cpu), int(wait)
    except (OSError, ValueError):
        return 0, 0


def _broker_pid(settings: config.Settings) -> int | None:
    """The embedded broker's pid (its command line names the port), to read its threads' schedstat."""
    port = settings.bootstrap.rsplit(":", 1)[-1]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if b"--kafka-port" in args and port.encode() in args:
                return int(entry)
    return None


class _Sched:
    """Run-queue wait of this probe's main thread, the producer's sender thread and the whole broker."""

    def __init__(self, sender_tid: int | None, broker_pid: int | None) -> None:
        self.main = f"/proc/self/task/{threading.get_native_id()}/schedstat"
        self.sender = f"/proc/self/task/{sender_tid}/schedstat" if sender_tid else ""
        self.broker = f"/proc/{broker_pid}/task" if broker_pid else ""

    def read(self) -> tuple[int, int, int, int]:
        """(main wait, sender wait, broker wait summed over its threads, broker CPU), ns."""
        broker_cpu = broker_wait = 0
        if self.broker:
            try:
                tids = os.listdir(self.broker)
            except OSError:
                tids = []
            for tid in tids:
                cpu, wait = _schedstat(f"{self.broker}/{tid}/schedstat")
                broker_cpu += cpu
                broker_wait += wait
        return (_schedstat(self.main)[1], _schedstat(self.sender)[1] if self.sender else 0,
                broker_wait, broker_cpu)


def _pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def at(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 2)

    return {"n": len(s), "p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99), "p999_ms": at(0.999),
            "max_ms": round(s[-1] * 1000, 2), "mean_ms": round(statistics.fmean(s) * 1000, 2)}


def _spinners(k: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]


def _gil_spinners(k: int, stop: threading.Event) -> list[threading.Thread]:
    """Busy pure-Python threads in *this* process: they hold the GIL the producer's sender thread needs,
    as the serving worker's other threads (and ``bench_serving``'s read_committed reader) do."""
    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    threads = [threading.Thread(target=spin, daemon=True, name=f"probe-gil-{i}") for i in range(k)]
    for t in threads:
        t.start()
    return threads


def _joined_consumer(settings: config.Settings, topic: str) -> KafkaConsumer:
    group = settings.topic(f"probe.txn.{uuid.uuid4().hex[:6]}")
    consumer = KafkaConsumer(**consumer_config(settings, group_id=group, group_instance_id=f"{group}-m0"))
    consumer.subscribe([topic])
    deadline = time.monotonic() + JOIN_DEADLINE_S
    while not consumer.assignment():
        if time.monotonic() > deadline:
            raise RuntimeError(f"consumer of group {group} did not join within {JOIN_DEADLINE_S} s")
        consumer.poll(timeout_ms=100)
    return consumer


def _producer(settings: config.Settings, tid: str, retry_backoff_ms: int | None) -> KafkaProducer:
    """A transactional producer configured as the serving worker's (``ServingWorker._open_clients``)."""
    extra: dict[str, Any] = {"linger_ms": 0, "max_block_ms": 10_000, "transactional_id": tid}
    if retry_backoff_ms is not None:
        extra["retry_backoff_ms"] = retry_backoff_ms
    else:
        extra.update(serving_producer_overrides())
    producer = KafkaProducer(**producer_config(settings, **extra))
    began = time.perf_counter()
    producer.init_transactions()  # a new producer of a used id: fences the last one (the restart path)
    _INIT.append(time.perf_counter() - began)
    _instrument(producer)
    return producer


def run(settings: config.Settings, loops: int, rate: float, records: int, load: int,
        retry_backoff_ms: int | None, producers: int = 1, gil_threads: int = 0) -> dict[str, Any]:
    """``loops`` transactions split over ``producers`` successive producers of one transactional id
    (each a restart: a new producer fences the last); each producer's first transaction is reported
    apart (``first_txn``), the others make the steady figures."""
    _TRACE.clear()
    _SENT.clear()
    _INIT.clear()
    tag = uuid.uuid4().hex[:6]
    in_topic, out_topic = settings.topic(f"probe.txn.in.{tag}"), settings.topic(f"probe.txn.out.{tag}")
    ensure_topics(settings, [TopicSpec(t, 1, 3_600_000, "delete", None, "txn latency probe")
                             for t in (in_topic, out_topic)])
    consumer = _joined_consumer(settings, in_topic)
    broker_pid = _broker_pid(settings)
    tp = TopicPartition(in_topic, 0)
    value = b"x" * 200
    calls: dict[str, list[float]] = defaultdict(list)
    first: list[float] = []
    waits: dict[str, list[float]] = defaultdict(list)
    slow: list[dict[str, Any]] = []
    spin = _spinners(load)
    gil_stop = threading.Event()
    gil = _gil_spinners(gil_threads, gil_stop)
    load_start = os.getloadavg()[0]
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    backoff = 0
    per_producer = max(1, loops // max(1, producers))
    producer: KafkaProducer | None = None
    try:
        period = 1.0 / rate
        for i in range(loops):
            if i % per_producer == 0:
                if producer is not None:
                    producer.close(timeout=10)
                producer = _producer(settings, f"probe-txn-{tag}", retry_backoff_ms)
                backoff = producer.config["retry_backoff_ms"]
                sched = _Sched(getattr(producer._sender, "native_id", None), broker_pid)  # noqa: SLF001
                next_at = time.perf_counter()
            assert producer is not None
            trace_from = len(_TRACE)
            s0 = sched.read()
            t0 = time.perf_counter()
            producer.begin_transaction()
            t1 = time.perf_counter()
            for _ in range(records):
                producer.send(out_topic, key=b"k", value=value)
            t2 = time.perf_counter()
            producer.send_offsets_to_transaction({tp: OffsetAndMetadata(i + 1, "", -1)},
                                                 consumer.group_metadata())
            t3 = time.perf_counter()
            producer.commit_transaction()
            t4 = time.perf_counter()
            s1 = sched.read()
            if i % per_producer == 0:
                first.append(t4 - t0)
            else:
                dw = {k: (b - a) / 1e9 for k, a, b in zip(("main_wait", "sender_wait", "broker_wait", "broker_cpu"),
                                                          s0, s1, strict=True)}
                for k, v in dw.items():
                    waits[k].append(v)
                for name, d in (("begin", t1 - t0), ("send", t2 - t1), ("send_offsets", t3 - t2),
                                ("commit", t4 - t3), ("total", t4 - t0)):
                    calls[name].append(d)
                if t4 - t0 > 0.05:
                    slow.append({"loop": i, "send_offsets_ms": round((t3 - t2) * 1000, 1),
                                 "commit_ms": round((t4 - t3) * 1000, 1),
                                 **{f"{k}_ms": round(v * 1000, 1) for k, v in dw.items()},
                                 "requests": [{"kind": k, "start_ms": round((s - t2) * 1000, 1),
                                               "rtt_ms": round((d - s) * 1000, 1), "error": e, "retry": r}
                                              for k, s, d, e, r in _TRACE[trace_from:]]})
            next_at += period
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)  # the probe's pacing, not a wait for a condition
            else:
                next_at = time.perf_counter()
    finally:
        gil_stop.set()
        for t in gil:
            t.join()
        for p in spin:
            p.kill()
            p.wait()
        if producer is not None:
            producer.close(timeout=10)
        consumer.close()
        _uninstrument()
    wall = time.perf_counter() - wall0
    committed = _committed(settings, out_topic)
    by_kind: dict[str, list[float]] = defaultdict(list)
    errors: Counter[str] = Counter()
    retries: Counter[str] = Counter()
    for kind, s, d, e, r in _TRACE:
        by_kind[kind].append(d - s)
        if e:
            errors[f"{kind}:{e}"] += 1
        if r:
            retries[kind] += 1
    return {"loops": loops, "rate": rate, "records": records, "load_procs": load, "gil_threads": gil_threads,
            "switch_interval_s": sys.getswitchinterval(), "producers": producers,
            "retry_backoff_ms": backoff,
            "load1_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
            "committed_records": committed, "wall_s": round(wall, 2), "cpu_s": round(time.process_time() - cpu0, 2),
            "init_transactions": _pct(_INIT), "first_txn": _pct(first), "calls": {k: _pct(v) for k, v in calls.items()},
            "requests_rtt": {k: _pct(v) for k, v in by_kind.items()},
            "per_loop_sched": {k: _pct(v) for k, v in waits.items()},
            "slow_loop_share_of_wait": _share(calls["total"], waits),
            "error_codes": dict(errors), "retried_requests": dict(retries),
            "slow_loops": len(slow), "slowest": sorted(slow, key=lambda x: -max(x["send_offsets_ms"],
                                                                                x["commit_ms"]))[:8]}


def _committed(settings: config.Settings, topic: str) -> int:
    """How many records of ``topic`` a read_committed reader returns (the probe's transactions did commit)."""
    reader = KafkaConsumer(**consumer_config(settings, isolation_level="read_committed"))
    tp = TopicPartition(topic, 0)
    try:
        reader.assign([tp])
        reader.seek_to_beginning(tp)
        end = reader.end_offsets([tp])[tp]
        count = 0
        deadline = time.monotonic() + JOIN_DEADLINE_S
        while reader.position(tp) < end and time.monotonic() < deadline:
            count += sum(len(recs) for recs in reader.poll(timeout_ms=200).values())
        return count
    finally:
        reader.close()


def _share(totals: list[float], waits: dict[str, list[float]]) -> dict[str, Any]:
    """For loops over 50 ms against the rest: mean loop time and mean run-queue waits, ms. If the slow
    loops' extra time is matched by their threads' or the broker's waiting for a CPU, the tail is the box."""
    out: dict[str, Any] = {}
    for name, pick in (("slow", lambda t: t > 0.05), ("fast", lambda t: t <= 0.05)):
        idx = [i for i, t in enumerate(totals) if pick(t)]
        if idx:
            out[name] = {"n": len(idx), "loop_ms": round(statistics.fmean(totals[i] for i in idx) * 1000, 1),
                         **{f"{k}_ms": round(statistics.fmean(v[i] for i in idx) * 1000, 1)
                            for k, v in waits.items()}}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loops", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=20.0, help="transactions per second")
    ap.add_argument("--records", type=int, default=8, help="records per transaction")
    ap.add_argument("--load", type=int, default=0, help="busy Python processes during the run")
    ap.add_argument("--retry-backoff-ms", type=int, default=None)
    ap.add_argument("--producers", type=int, default=1,
                    help="successive producers of one transactional id (restarts); first transactions apart")
    ap.add_argument("--gil-threads", type=int, default=0, help="busy Python threads in the probe's process")
    ap.add_argument("--switch-interval-ms", type=float, default=None,
                    help="sys.setswitchinterval for the run (the serving worker sets 1 ms)")
    ap.add_argument("--name", default="probe_txn_latency")
    args = ap.parse_args(argv)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    with bench_settings() as settings:
        result = run(settings, args.loops, args.rate, args.records, args.load, args.retry_backoff_ms,
                     args.producers, args.gil_threads)
    result["machine"] = machine()
    path = write_report(args.name, result)
    summary = {k: result[k] for k in ("load1_start_end", "wall_s", "init_transactions", "first_txn", "calls",
                                      "requests_rtt", "error_codes", "retried_requests", "slow_loops",
                                      "slow_loop_share_of_wait")}
    print(json.dumps(summary, indent=1))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
