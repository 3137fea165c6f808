"""The hub's wall clock: what records, grace periods and peers' leases are stamped with."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Milliseconds since the epoch: the unit of every timestamp on the wire."""
    return int(time.time() * 1000)
