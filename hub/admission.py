"""Admission, without I/O: who may connect, and how fast a connection may talk.

- ``PerIpLimit``: open connections per client address (``--max-conns-per-ip``);
  past it a new connection gets a 429 before its request is read.
- ``TokenBucket``: messages a WebSocket connection may send, ``--rate-limit``
  per second sustained and ``--rate-burst`` at once; past it the connection
  is closed with 1008 (README, "Flood isolation"). It is charged once per
  read, with the number of frames the read carried: two float operations,
  not a cost per frame.
"""

from __future__ import annotations


class PerIpLimit:
    """Open connections by client address; ``limit`` 0 admits everyone (still counted)."""

    __slots__ = ("limit", "open")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # Address -> open connections; an address leaves when its last one closes.
        self.open: dict[str, int] = {}

    def admit(self, peer: str) -> bool:
        """Count one more connection from ``peer``; False, counting nothing, at the limit."""
        held = self.open.get(peer, 0)
        if self.limit and held >= self.limit:
            return False
        self.open[peer] = held + 1
        return True

    def release(self, peer: str) -> None:
        """One connection ``admit`` counted has closed."""
        held = self.open[peer] - 1
        if held:
            self.open[peer] = held
        else:
            del self.open[peer]


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; a message takes one."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def take(self, n: int, now: float) -> bool:
        """Refill for the time since the last take, then take ``n``; False once in debt."""
        tokens = min(self.tokens + (now - self.last) * self.rate, self.burst) - n
        self.tokens = tokens
        self.last = now
        return tokens >= 0
