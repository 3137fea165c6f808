"""Metrics cost: what counting adds to a tracker message, what a scrape costs.

    python -m loadtest.bench_metrics --sessions 100000 --projects 50

In one process, no sockets. Per message: ``TrackerProtocol.receive`` of a
heartbeat (the hub's hottest path, counting included) against the counting
step alone (a dict increment, what the hub does) and a pre-bound
prometheus_client child ``inc()`` (the alternative it avoids). Per scrape:
``Metrics.render()`` with the given sessions in the index, with and without
per-project labels.
"""

from __future__ import annotations

import argparse
import time
import timeit
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

from hub.counts import tracker_counts
from hub.index import LiveIndex
from hub.metrics import Metrics
from hub.record import Start
from hub.registry import Registry
from hub.tracker import TrackerProtocol


def per_call_us(stmt: str | Callable[[], object], number: int, **names: object) -> float:
    best = min(timeit.repeat(stmt, number=number, repeat=5, globals=names))
    return best / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--projects", type=int, default=50)
    parser.add_argument("--number", type=int, default=200_000)
    args = parser.parse_args()

    index = LiveIndex()
    registry = Registry(index, grace_ms=30_000)
    counts = tracker_counts()
    proto = TrackerProtocol(registry, "p0", 0, counts)
    now = int(time.time() * 1000)
    proto.receive(b'{"type":"start","sessionID":"bench"}', now)
    beat = b'{"type":"heartbeat"}'
    receive_us = per_call_us("proto.receive(beat, now)", args.number, proto=proto, beat=beat, now=now)
    # Statements, not calls: the increment alone, as inlined in the tracker.
    count_us = per_call_us('received["heartbeat"] += 1', args.number, received=counts.received)
    child = Counter("x", "x", ["type"], registry=CollectorRegistry()).labels("heartbeat")
    prom_us = per_call_us("child.inc()", args.number, child=child)
    print(f"heartbeat receive (counting included): {receive_us:.3f} us")
    print(f"  dict increment (what the hub does):    {count_us:.3f} us = {count_us / receive_us:.1%} of it")
    print(f"  prometheus_client child inc():         {prom_us:.3f} us = {prom_us / receive_us:.1%} of it")

    for i in range(args.sessions):
        registry.start(f"p{i % args.projects}", 0, Start(sessionID=f"s{i}"), now, True)
    for per_project in (False, True):
        metrics = Metrics(index, per_project=per_project)
        size = len(metrics.render())
        ms = per_call_us(metrics.render, 20) / 1000
        print(
            f"scrape, {len(index)} sessions in {args.projects} projects, per_project={per_project}: "
            f"{ms:.2f} ms, {size} bytes"
        )


if __name__ == "__main__":
    main()
