"""When each connection next needs its timers looked at: a wheel of coarse ticks (no I/O, no clock).

The server used to walk every connection once a sweep to enforce idle timeouts,
pings and close deadlines: ~0.8 µs a connection, so 12-19 ms of a blocked event
loop every second at 16k connections, which every search that arrived meanwhile
waited out. Instead each connection sits in the tick of the earliest moment its
``expire`` could act, and a sweep visits only the ticks that have passed.

Times only ever need to be lower bounds: activity that pushes a deadline later
(a heartbeat, a pong) changes nothing here, and the connection is looked at
when its old time comes, does nothing, and is filed again at its new one. A
deadline that moves *earlier* (a closing handshake started) must be filed again
by whoever moved it. Ticks are ``resolution`` wide and a connection is due at
the first sweep at or after its time, so it is late by at most a tick, as with
the full sweep it replaces.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


class Deadlines(Generic[T]):
    """Items filed by the time they are next due; each item in at most one tick."""

    __slots__ = ("_next", "_resolution", "_tick_of", "_ticks")

    def __init__(self, resolution: float, now: float) -> None:
        if resolution <= 0:
            raise ValueError("resolution must be > 0")
        self._resolution = resolution
        self._ticks: dict[int, set[T]] = {}
        self._tick_of: dict[T, int] = {}
        # The first tick not yet handed out by ``due``.
        self._next = math.floor(now / resolution) + 1

    def __len__(self) -> int:
        return len(self._tick_of)

    def __contains__(self, item: object) -> bool:
        return item in self._tick_of

    def set(self, item: T, at: float) -> None:
        """``item`` is due at monotonic time ``at`` (``inf``: never, until set again)."""
        self.discard(item)
        if at == math.inf:
            return
        # The first tick whose start is at or after ``at``; a time already past goes to
        # the next sweep.
        tick = max(math.ceil(at / self._resolution), self._next)
        self._tick_of[item] = tick
        bucket = self._ticks.get(tick)
        if bucket is None:
            self._ticks[tick] = {item}
        else:
            bucket.add(item)

    def discard(self, item: T) -> None:
        tick = self._tick_of.pop(item, None)
        if tick is not None:
            bucket = self._ticks[tick]
            bucket.discard(item)
            if not bucket:
                del self._ticks[tick]

    def due(self, now: float) -> list[T]:
        """Every item whose tick has begun by ``now``, removed from the wheel."""
        last = math.floor(now / self._resolution)
        if last < self._next:
            return []
        ticks = self._ticks
        out: list[T] = []
        if last - self._next < len(ticks):
            for tick in range(self._next, last + 1):
                bucket = ticks.pop(tick, None)
                if bucket is not None:
                    out.extend(bucket)
        else:
            # Long after the last sweep (a stopped process): fewer filed ticks than passed.
            for tick in [t for t in ticks if t <= last]:
                out.extend(ticks.pop(tick))
        tick_of = self._tick_of
        for item in out:
            del tick_of[item]
        self._next = last + 1
        return out
