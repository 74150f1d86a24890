"""Has the broker restarted? One plain TCP connection per bootstrap broker, watched without waiting.

Why a socket of our own and not the client's: kafka-python reconnects quietly, so its connections do
not say whether the broker process died in between. A process that dies closes every socket it
held, whatever its restart looks like, so a closed one is a reliable "the broker went away" signal.
Used by the ack ledger (``streaming/ackguard.py``) and the stream worker's positions
(``streaming/worker_positions.py``).
"""

from __future__ import annotations

import select
import socket
import time


class EpochWatch:
    """Plain TCP connections to the bootstrap brokers; a closed one means the broker went away."""

    def __init__(self, bootstrap: str) -> None:
        self.addrs = []
        for part in bootstrap.split(","):
            host, _, port = part.strip().rpartition(":")
            if host and port.isdigit():
                self.addrs.append((host.strip("[]"), int(port)))
        self.socks: dict[tuple[str, int], socket.socket] = {}
        self.epoch = 0
        self.changed_at = -1e9
        self.connected = False

    def poll(self, reconnect: bool = True) -> bool:
        """Check the connections (a select without waiting), reconnect the closed ones when
        ``reconnect``; True when the epoch changed."""
        lost = False
        for addr, sock in list(self.socks.items()):
            try:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable and not sock.recv(1):
                    raise ConnectionError("closed")
            except OSError:
                lost = True
                sock.close()
                del self.socks[addr]
        for addr in self.addrs:
            if addr in self.socks or not reconnect:
                continue
            try:
                sock = socket.create_connection(addr, timeout=1.0)
                sock.setblocking(False)
                self.socks[addr] = sock
            except OSError:
                lost = lost or self.connected
        now_connected = len(self.socks) == len(self.addrs) and bool(self.addrs)
        if not reconnect and not lost:
            return False
        if lost or (self.connected and not now_connected):
            self.changed_at = time.monotonic()  # before the epoch: a reader that sees the new epoch sees this
            self.epoch += 1
        changed = lost or (self.connected and not now_connected)
        self.connected = now_connected
        return changed

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()
        self.socks.clear()
