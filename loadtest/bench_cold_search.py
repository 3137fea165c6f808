"""Issue 16's figure 6: a cold search on a cluster node that does not mirror the project.

Three real hub nodes (``loadtest.scaling_node`` processes: ``hub.app.Hub`` as
``hub serve`` builds it, its index filled through its registry, no tracker
sockets) on one ``redis-server`` (free port, ``tests/redis_server.py``). One
project, ``p00``, holds ``--sizes`` sessions, half on each of two *holders*;
the third node holds none and has no agent: it does not mirror the project
(the nodes run without webhooks, so the project has no owners that mirror it
regardless). The first holder is searched once first, so it mirrors the
project (warm). Then, ``--reps`` times:

1. wait until the third node mirrors nothing (``hub_cluster_mirrored_partitions``
   0: its ``--mirror-idle`` ran out since its last search);
2. search the project there (cold: the node subscribes, reads both holders'
   parts from Redis, then answers), timed at the client until its first 200
   answer (the hub answers a search deferred past 10 s with 503, and the
   bench asks again at once: the bootstrap goes on; such 503s are counted);
3. search it there again (warm), and on a holder (warm, for the ratio);
4. the three answers compared byte for byte (the sessions do not change
   unless ``--rate``).

Reported per size: p50 (and min/max) of the first and second search and of
the holder's, the ratio second/holder, snapshot reads per cold search
(``hub_cluster_partition_reads_total``), against the targets 0.2 / 0.5 / 2 s
at 1k / 10k / 100k.

    python -m loadtest.bench_cold_search                     # 1k, 10k, 100k
    python -m loadtest.bench_cold_search --sizes 1000,10000 --reps 9
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from loadtest.bench_scaling import RESULTS, Load, Node, Nodes, filled, loadavg, log, settled
from tests.redis_server import RedisServer

PROJECT = "p00"  # scaling_node's project of every session with --projects 1
HOLDERS = ("h0", "h1")
COLD = "c0"
TARGETS = {1_000: 0.2, 10_000: 0.5, 100_000: 2.0}


async def until_idle(node: Node, timeout: float) -> float:
    """Seconds until ``node`` mirrors no partition (and so holds none of the project)."""
    began = time.monotonic()
    while True:
        s = await node.scrape()
        if s.values.get("hub_cluster_mirrored_partitions") == 0 and not s.projects.get(PROJECT):
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise RuntimeError(f"node {node.name} still mirrors after {timeout} s: {s.values}")
        await asyncio.sleep(0.05)


async def timed(node: Node, limit: int, timeout: float) -> tuple[float, bytes, int]:
    """Seconds until the node's first 200 answer to a search, the answer, and the 503s it
    answered before (a deferred search answers 503 after 10 s; the bootstrap goes on)."""
    assert node.http is not None
    body = json.dumps({"sort": "sessionID", "order": "asc", "limit": limit, "page": 1}).encode()
    began = time.perf_counter()
    retries = 0
    while True:
        status, answer = await node.http.request(
            "POST", f"/public/{PROJECT}/assist/sessions", body, timeout=timeout
        )
        if status == 200:
            return time.perf_counter() - began, answer, retries
        if status != 503 or time.perf_counter() - began > timeout:
            raise RuntimeError(f"node {node.name} search {PROJECT}: HTTP {status} {answer[:200]!r}")
        retries += 1


async def case(args: argparse.Namespace, size: int, workdir: Path) -> dict[str, Any]:
    half = size // len(HOLDERS)
    total = half * len(HOLDERS)
    log(f"cold search: {total:,} sessions on {len(HOLDERS)} holders (load {loadavg()})")
    load_before = loadavg()
    with RedisServer() as server:
        nodes = Nodes(server.url, Load(half, 1, args.rate, 1 / 3), workdir)
        try:
            holders = [await nodes.spawn(name) for name in HOLDERS]
            cold = await nodes.spawn(COLD, sessions=0, hub_args=["--mirror-idle", str(args.mirror_idle)])
            await filled([*holders, cold], timeout=60 + total / 1000)
            serves: dict[str, set[int]] = {n.name: set() for n in [*holders, cold]}
            fill_s = await settled([*holders, cold], serves, [total], timeout=60 + total / 1000)
            # The first holder serves the project from now on (searched within its idle time).
            await timed(holders[0], args.limit, args.timeout)
            await settled([holders[0]], {holders[0].name: {0}}, [total], timeout=60 + total / 1000)
            reps: list[dict[str, Any]] = []
            for _ in range(args.reps):
                idle_s = await until_idle(cold, args.mirror_idle + 30)
                reads0 = (await cold.metrics()).get("hub_cluster_partition_reads_total", 0.0)
                first_s, first, retried = await timed(cold, args.limit, args.timeout)
                second_s, second, _ = await timed(cold, args.limit, args.timeout)
                warm_s, warm, _ = await timed(holders[0], args.limit, args.timeout)
                reads1 = (await cold.metrics()).get("hub_cluster_partition_reads_total", 0.0)
                reps.append(
                    {
                        "first_s": first_s,
                        "second_s": second_s,
                        "warm_s": warm_s,
                        "waited_idle_s": round(idle_s, 2),
                        "snapshot_reads": reads1 - reads0,
                        "first_answered_503": retried,
                        "equal": first == second == warm,
                    }
                )
            rss = psutil.Process(cold.proc.pid).memory_info().rss / 2**20
        finally:
            await nodes.close()

    def summary(key: str) -> dict[str, float]:
        values = [r[key] for r in reps]
        return {"p50": statistics.median(values), "min": min(values), "max": max(values)}

    first, second, warm = summary("first_s"), summary("second_s"), summary("warm_s")
    result = {
        "sessions": total,
        "holders": list(HOLDERS),
        "cold_node": COLD,
        "reps": len(reps),
        "fill_and_settle_s": round(fill_s, 2),
        "first": first,
        "second": second,
        "warm_node": warm,
        "second_over_warm": second["p50"] / warm["p50"],
        "target_first_p50_s": TARGETS.get(total),
        "snapshot_reads_per_cold_search": sorted({r["snapshot_reads"] for r in reps}),
        "answers_equal": all(r["equal"] for r in reps),
        "first_searches_answered_503_first": sum(1 for r in reps if r["first_answered_503"]),
        "cold_node_rss_mib": round(rss, 1),
        "runs": reps,
        "load_before": load_before,
        "load_after": loadavg(),
    }
    log(
        f"  first p50 {first['p50'] * 1000:.1f} ms, second {second['p50'] * 1000:.2f} ms, "
        f"warm node {warm['p50'] * 1000:.2f} ms"
    )
    return result


def report(result: dict[str, Any]) -> str:
    out = [
        "| sessions | reps | **first search p50** (min - max) | target | second p50 (min - max) "
        "| warm node p50 | second / warm | reads per cold search | answers equal "
        "| first searches answered 503 first (10 s) | load before → after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["sizes"]:
        f, s, w = r["first"], r["second"], r["warm_node"]
        target = f"≤ {r['target_first_p50_s']} s" if r["target_first_p50_s"] else "-"
        out.append(
            f"| {r['sessions']:,} | {r['reps']} | **{f['p50'] * 1000:.1f} ms** "
            f"({f['min'] * 1000:.1f} - {f['max'] * 1000:.1f}) | {target} "
            f"| {s['p50'] * 1000:.2f} ms ({s['min'] * 1000:.2f} - {s['max'] * 1000:.2f}) "
            f"| {w['p50'] * 1000:.2f} ms | {r['second_over_warm']:.2f} "
            f"| {', '.join(f'{x:.0f}' for x in r['snapshot_reads_per_cold_search'])} "
            f"| {r['answers_equal']} | {r['first_searches_answered_503_first']} "
            f"| {r['load_before']} → {r['load_after']} |"
        )
    return "\n".join(out) + "\n"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "command": " ".join(["python -m loadtest.bench_cold_search", *sys.argv[1:]]),
        "cpus": psutil.cpu_count(),
        "mirror_idle_s": args.mirror_idle,
        "limit": args.limit,
        "rate_per_holder": args.rate,
        "load_at_start": loadavg(),
        "sizes": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-cold-search-") as tmp:
        workdir = args.logs or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            result["sizes"].append(await case(args, size, workdir))
    result["load_at_end"] = loadavg()
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000,100000", help="sessions in the project")
    parser.add_argument("--reps", type=int, default=7, help="cold searches per size")
    parser.add_argument(
        "--mirror-idle",
        type=float,
        default=1.0,
        help="the cold node's --mirror-idle: it forgets the project that long after a search",
    )
    parser.add_argument("--limit", type=int, default=50, help="sessions per answer page")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="changes/s on each holder (0: answers compared exactly)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a search may take")
    parser.add_argument("--logs", type=Path, help="keep the nodes' logs in this directory")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench-cold-search.json")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    return args


def main() -> None:
    args = parse()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(report(result))


if __name__ == "__main__":
    main()
