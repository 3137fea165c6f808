"""When the cyclic garbage collector walks the hub's long-lived objects.

CPython's full collection walks every tracked object with the event loop
stopped: ~0.2 s in a hub holding 16,000 trackers (~25 tracked objects a
connection, most of them websockets' protocol state), and one came every ~40 s,
because each heartbeat replaces a few of its connection's objects (websockets'
parser generators, the last frame), which live until the next one and so reach
the oldest generation. Every search that arrived meanwhile waited it out.

Instead, what survives a full collection is frozen (``gc.freeze``): reachable
then and long-lived, it is left out of later collections, which walk only what
came since (a few ms). A frozen object is still freed the moment its last
reference goes; only a *cycle* of frozen objects would outlive its use, so
tearing down a connection, a session or an agent leaves none
(``tests/test_collector.py``), and once every ``full_every`` seconds everything
is unfrozen so that the next full collection walks it all, which bounds what a
missed cycle could hold to one interval.

The young generations are collected on the server's sweep too (``tick``):
CPython counts allocations minus deallocations, so a heartbeat that replaces
its connection's objects adds nothing to the count, the young generation grows
(~16,000 objects in 30 s at 16,000 trackers) without a collection being due,
and the one that finally comes walks them all at once (5-35 ms measured).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any


class Collector:
    """Freezes each full collection's survivors; unfreezes all once every ``full_every`` seconds."""

    def __init__(self, clock: Callable[[], float], full_every: float = 3600.0) -> None:
        self._clock = clock
        self._full_every = full_every
        self._full_at = clock() + full_every
        # Full collections seen, and those that walked everything (after an unfreeze).
        self.collections = 0
        self.full_walks = 0
        self._walk_all = False

    def install(self) -> None:
        gc.callbacks.append(self._on_collection)

    def uninstall(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)

    def tick(self) -> None:
        """Collect the young generations: a sweep interval's worth of objects at a time."""
        gc.collect(1)

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or info["generation"] != 2:
            return
        self.collections += 1
        if self._walk_all:
            self._walk_all = False
            self.full_walks += 1
        now = self._clock()
        if now >= self._full_at:
            # The next full collection walks everything, frozen or not, and finds any
            # cycle a frozen object took part in; its survivors are frozen again then.
            self._full_at = now + self._full_every
            self._walk_all = True
            gc.unfreeze()
            return
        # A full collection has just emptied the younger generations into the oldest:
        # what is tracked now is exactly what survived it.
        gc.freeze()
