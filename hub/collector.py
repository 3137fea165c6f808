"""When the cyclic garbage collector walks the hub's long-lived objects.

CPython's full collection walks every tracked object with the event loop
stopped: ~0.2 s in a hub holding 16,000 trackers (~25 tracked objects a
connection, most of them websockets' protocol state), and they keep coming:
each heartbeat replaces a few of its connection's objects (websockets' parser
generators, the last frame), which live until the next one and so reach the
oldest generation. Every search that arrived meanwhile waited it out.

Instead, each sweep (every ``--sweep-interval``) runs a collection and what
survives it is frozen (``gc.freeze``): reachable then and long-lived, it is left
out of every later collection, so each walks only what came since the last
sweep (a few ms; walking the oldest generation whenever CPython's thresholds
said cost 15-57 ms every ~11 s in a ``--workers 6`` worker at 100k trackers). A
frozen object is still freed the moment its last reference goes; only a
*cycle* of frozen objects would outlive its use, so tearing down a connection,
a session or an agent leaves none (``tests/test_collector.py``), and once every
``full_every`` seconds everything is unfrozen so that the next collection walks
it all, which bounds what a missed cycle could hold to one interval (and
``hub.collector`` logs how much that walk found).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("hub.collector")


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
        """Collect what is not frozen (what came since the last tick); its survivors freeze."""
        gc.collect()

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or info["generation"] != 2:
            return
        self.collections += 1
        if self._walk_all:
            self._walk_all = False
            self.full_walks += 1
            log.info("collector.full_walk", extra={"fields": {"collected": info["collected"]}})
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
