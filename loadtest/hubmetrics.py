"""Per-process figures a hub reports on ``/metrics``, one entry per worker of a ``--workers`` hub.

The kernel hands each new connection to any worker (``SO_REUSEPORT``), so a
scrape on a fresh connection reaches a random one; ``hub_worker_index`` says
which. Scraping again until every index has answered gives each worker's
``hub_live_sessions`` (its index: own sessions plus what it mirrors),
``hub_local_sessions``, ``hub_cluster_mirrored_partitions``, its RSS and its
hand-off counts. A single-node hub has no ``hub_worker_index``: one scrape.
"""

from __future__ import annotations

import asyncio
import re
from typing import Final

from .client import HttpClient

WANTED: Final = (
    "hub_worker_index",
    "hub_live_sessions",
    "hub_local_sessions",
    "hub_disconnected_sessions",
    "hub_cluster_mirrored_partitions",
    "hub_cluster_indexed_projects",
    "hub_cluster_partition_reads_total",
    "hub_cluster_peers",
    "hub_connections",
    "hub_agents",
    "hub_handoff_total",
    "hub_redis_published_batches_total",
    "hub_redis_received_batches_total",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
)
_LINE: Final = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse(text: str) -> dict[str, float]:
    """The wanted samples of a Prometheus text page, keyed by name and labels as written."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None or match.group(1) not in WANTED:
            continue
        try:
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
        except ValueError:
            continue
    return out


async def scrape(url: str) -> dict[str, float]:
    """``/metrics`` once, on a new connection."""
    client = HttpClient(url, "")
    try:
        status, payload = await client.request("GET", "/metrics", timeout=10.0)
    finally:
        client.close()
    if status != 200:
        raise RuntimeError(f"/metrics answered HTTP {status}")
    return parse(payload.decode())


async def per_worker(url: str, workers: int, attempts: int = 300) -> list[dict[str, float]]:
    """One scrape per worker (sorted by index), trying fresh connections until all ``workers`` answered."""
    seen: dict[int, dict[str, float]] = {}
    for _ in range(attempts):
        try:
            metrics = await scrape(url)
        except (OSError, RuntimeError, TimeoutError, asyncio.IncompleteReadError):
            continue
        seen.setdefault(int(metrics.get("hub_worker_index", -1)), metrics)
        if len(seen) >= workers or -1 in seen:
            break
    return [seen[k] for k in sorted(seen)]


def workers_of(hub_args: str) -> int:
    """``--workers N`` in a hub's extra arguments (1 without it)."""
    match = re.search(r"--workers[ =](\d+)", hub_args)
    return int(match.group(1)) if match else 1
