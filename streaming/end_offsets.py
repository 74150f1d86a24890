"""A cheap "is there anything new?" check for an idle consumer: one ListOffsets round trip.

Why this exists: on the embedded broker an idle consumer must poll on its own schedule (it answers
empty fetches at once, see :class:`streaming.consumer.IdlePoller`), and with kafka-python 3 one
empty ``poll`` costs 2-3 ms of CPU however short it is: three hand-offs to the client's IO thread
(coordinator, fetch send, fetch wait), each with a lock, a wake-up socket write and a context switch,
plus request encoding and response parsing on both threads. At one check per 64 ms back-off cap that
alone is ~0.04 core per idle consumer, twice the 0.02 goal (docs/IDLE.md).

:class:`EndOffsetProbe` asks the partitions' leaders for their last stable offsets (ListOffsets v2,
``timestamp=-1``, the consumer's isolation level) on a private blocking socket, with the request packed
by ``struct`` and the answer parsed the same way: ~0.06 ms of CPU hot, ~0.3 ms after a sleep. It
compares them with the consumer's positions; the poller does a real ``poll`` only when they differ
(new records, a committed transaction, or a truncation kafka-python must see), plus at least once per
``IdlePoller.full_poll_s`` so rebalances, ``max_poll_interval_ms`` and metadata behave as before.

It is an optimisation with a safe failure mode: whenever it cannot tell (no position yet, unknown
leader, a partition error, a refused or slow connection, a secured cluster it cannot authenticate to)
it says ``None`` and the poller fetches as it did without it. It works against Apache Kafka too
(ListOffsets v2 is in every broker since 0.11); it relies on nothing specific to the embedded broker.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Iterable
from typing import Any

from kafka import KafkaConsumer, TopicPartition

log = logging.getLogger(__name__)

API_LIST_OFFSETS = 2
API_VERSION = 2  # the first with isolation_level; answers carry (partition, error, timestamp, offset)
LATEST = -1
CLIENT_ID = b"streamlearn-idle-probe"
SOCKET_TIMEOUT_S = 0.25  # a probe that takes longer is abandoned: the poller then fetches as usual
RETRY_AFTER_S = 1.0  # after a failure, no probe for this long (no reconnect storm on a dead broker)
MAX_RESPONSE_BYTES = 1 << 20  # a ListOffsets answer for a few partitions is ~100 bytes


def _encode(correlation_id: int, isolation: int, topics: dict[str, list[int]]) -> bytes:
    body = [struct.pack(">hhih", API_LIST_OFFSETS, API_VERSION, correlation_id, len(CLIENT_ID)), CLIENT_ID,
            struct.pack(">ibi", -1, isolation, len(topics))]
    for topic, partitions in topics.items():
        name = topic.encode()
        body.append(struct.pack(">h", len(name)) + name + struct.pack(">i", len(partitions)))
        body.extend(struct.pack(">iq", p, LATEST) for p in partitions)
    payload = b"".join(body)
    return struct.pack(">i", len(payload)) + payload


def _decode(data: bytes) -> tuple[int, dict[TopicPartition, tuple[int, int]]]:
    """(correlation id, {tp: (error code, offset)}) from a ListOffsets v2 response body."""
    correlation_id, _throttle_ms, n_topics = struct.unpack_from(">iii", data, 0)
    pos, out = 12, {}
    for _ in range(n_topics):
        (name_len,) = struct.unpack_from(">h", data, pos)
        name = data[pos + 2:pos + 2 + name_len].decode()
        (n_parts,) = struct.unpack_from(">i", data, pos + 2 + name_len)
        pos += 6 + name_len
        for _ in range(n_parts):
            partition, error, _ts, offset = struct.unpack_from(">ihqq", data, pos)
            pos += 22
            out[TopicPartition(name, partition)] = (error, offset)
    return correlation_id, out


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the broker closed the probe connection")
        buf += chunk
    return bytes(buf)


class EndOffsetProbe:
    """Last stable offsets of a consumer's partitions, compared with its positions. See the module docstring."""

    def __init__(self, consumer: KafkaConsumer, timeout_s: float = SOCKET_TIMEOUT_S) -> None:
        self.consumer = consumer
        self.timeout_s = timeout_s
        config: dict[str, Any] = getattr(consumer, "config", {})
        self.isolation = 1 if config.get("isolation_level") == "read_committed" else 0
        #: only plaintext: the probe cannot do TLS/SASL; a secured cluster falls back to plain fetches
        self.enabled = config.get("security_protocol", "PLAINTEXT") == "PLAINTEXT"
        self._socks: dict[Any, socket.socket] = {}
        self._correlation = 0
        self._retry_at = 0.0
        self.probes = 0  # how many round trips it made (tests and docs/IDLE.md read it)
        self.failures = 0

    def has_news(self, partitions: Iterable[TopicPartition]) -> bool | None:
        """True when some partition's last stable offset differs from the consumer's position, False when
        none does, None when it cannot tell (the caller then fetches)."""
        if not self.enabled or time.monotonic() < self._retry_at:
            return None
        try:
            by_leader = self._group(partitions)
            if by_leader is None:
                return None
            for node, tps in by_leader.items():
                ends = self._ask(node, tps)
                if ends is None:
                    return None
                if any(ends[tp] != pos for tp, pos in tps.items()):
                    return True
            return False
        except (OSError, ValueError, struct.error, KeyError, ConnectionError) as exc:
            self.failures += 1
            self._retry_at = time.monotonic() + RETRY_AFTER_S
            log.debug("end-offset probe failed (%s); fetching instead for %.1f s", exc, RETRY_AFTER_S)
            self.close()
            return None

    def _group(self, partitions: Iterable[TopicPartition]) -> dict[Any, dict[TopicPartition, int]] | None:
        """{leader node: {tp: position}}, or None when a position or a leader is not known yet."""
        # kafka-python keeps positions in its SubscriptionState; KafkaConsumer.position() would first
        # refresh committed offsets through the IO thread, the very hand-off this probe avoids.
        assignment = self.consumer._subscription.assignment  # noqa: SLF001 - read-only
        cluster = self.consumer._cluster  # noqa: SLF001 - read-only
        out: dict[Any, dict[TopicPartition, int]] = {}
        for tp in partitions:
            state = assignment.get(tp)
            position = getattr(state, "position", None)
            leader = cluster.leader_for_partition(tp)
            if position is None or leader is None or leader == -1:
                return None
            out.setdefault(leader, {})[tp] = position.offset
        return out

    def _ask(self, node: Any, tps: dict[TopicPartition, int]) -> dict[TopicPartition, int] | None:
        sock = self._socks.get(node)
        if sock is None:
            broker = self.consumer._cluster.broker_metadata(node)  # noqa: SLF001 - read-only
            if broker is None:
                return None
            sock = socket.create_connection((broker.host, broker.port), timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks[node] = sock
        topics: dict[str, list[int]] = {}
        for tp in tps:
            topics.setdefault(tp.topic, []).append(tp.partition)
        self._correlation = (self._correlation + 1) & 0x7FFFFFFF
        sock.sendall(_encode(self._correlation, self.isolation, topics))
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        if not 0 < size <= MAX_RESPONSE_BYTES:
            raise ValueError(f"a ListOffsets answer of {size} bytes")
        correlation, answers = _decode(_recv_exact(sock, size))
        self.probes += 1
        if correlation != self._correlation:
            raise ValueError(f"correlation id {correlation}, expected {self._correlation}")
        ends: dict[TopicPartition, int] = {}
        for tp in tps:
            error, offset = answers[tp]
            if error:  # NOT_LEADER and the like: kafka-python's own fetch will refresh its metadata
                return None
            ends[tp] = offset
        return ends

    def close(self) -> None:
        for sock in self._socks.values():
            try:
                sock.close()
            except OSError:
                pass
        self._socks.clear()
