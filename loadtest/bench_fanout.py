"""Agent fan-out benchmark: N agents x M heartbeating sessions, and the cost of one change.

    python -m loadtest.bench_fanout [--agents 100 --sessions 10000 --period 1 --interval 1]

Part 1 runs a hub process, M trackers (in worker processes, each session
heartbeating once per ``--period`` on a fixed schedule), then N agents
subscribed to the whole project. It reports hub CPU with trackers alone
(the baseline) and with the agents, delivered frames/s and bytes/s, and the
end-to-end latency from a heartbeat's scheduled send to the agent frame that
carries its lastActiveAt (p50/p99; the target is p99 <= interval + 50 ms).
The heartbeat is identified by the lastActiveAt the hub stamped on it: with
session i sending at ``t0 + i/M*period + k*period``, k is the last one not
after it, so a tracker running late only makes latencies look worse.

Part 2 measures hub CPU per tracker change with ``--cost-agents`` agents
(1,000 by default) subscribed in three ways, against no agent at all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import time
from typing import Any

import msgspec

from .client import WsConn, frame, ws_connect
from .procs import free_port, start_hub

API_KEY = "bench-fanout"
HEARTBEAT = frame(b'{"type":"heartbeat"}', mask=b"\x00\x00\x00\x00")


def cpu_seconds(pid: int) -> float:
    """CPU time of the hub's main thread (it has one), in ns resolution, unlike /proc/PID/stat."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Counter:
    """Handler that counts messages and keeps the ones a test waits for."""

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0
        self.first: bytes = b""

    def on_open(self, conn: WsConn) -> None:
        pass

    def on_message(self, conn: WsConn, data: bytes) -> None:
        self.messages += 1
        self.bytes += len(data)
        if not self.first:
            self.first = data

    def on_close(self, conn: WsConn, code: int | None, opened: bool) -> None:
        pass


async def open_many(url: str, path: str, n: int, handler: Any, headers: Any = None) -> list[WsConn]:
    limit = asyncio.Semaphore(200)

    async def one(i: int) -> WsConn:
        async with limit:
            h = handler(i) if callable(handler) else handler
            return await ws_connect(url, path, h, headers=headers, timeout=30)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def start_sessions(url: str, first: int, n: int, extra: dict[str, Any] | None = None) -> list[WsConn]:
    counter = Counter()
    conns = await open_many(url, "/ws/tracker/bench", n, counter)
    for i, conn in enumerate(conns):
        conn.send(json.dumps({"type": "start", "sessionID": f"b{first + i}", **(extra or {})}).encode())
    while counter.messages < n:
        await asyncio.sleep(0.01)
    return conns


# Part 1 -----------------------------------------------------------------


def tracker_worker(url: str, first: int, n: int, total: int, period: float, q: Any, go: Any) -> None:
    asyncio.run(_trackers(url, first, n, total, period, q, go))


async def _trackers(url: str, first: int, n: int, total: int, period: float, q: Any, go: Any) -> None:
    conns = await start_sessions(url, first, n)
    q.put(("ready", first))
    t0, until = await asyncio.get_running_loop().run_in_executor(None, go.get)
    lags: list[float] = []
    k = 0
    # Fixed schedule: session (first + i) at t0 + (first + i)/total*period + k*period.
    phases = [(first + i) / total * period for i in range(n)]
    while True:
        base = t0 + k * period
        for i, phase in enumerate(phases):
            due = base + phase
            now = time.time()
            if due > now:
                await asyncio.sleep(due - now)
                now = time.time()
            if now >= until:
                q.put(("lag", pct(lags, 0.5), pct(lags, 0.99)))
                for conn in conns:
                    conn.abort()
                return
            conns[i].write(HEARTBEAT)
            if i % 50 == 0:
                lags.append(now - due)
        k += 1


class LatencyAgent(Counter):
    """Decodes lastActiveAt batches and turns each into a latency sample."""

    def __init__(
        self, sample: bool, schedule: tuple[float, float, int], out: list[float], after_tick: list[float]
    ) -> None:
        super().__init__()
        self.sample = sample
        self.t0, self.period, self.total = schedule
        self.out = out
        self.after_tick = after_tick
        self.window = (0.0, 0.0)

    def on_message(self, conn: WsConn, data: bytes) -> None:
        super().on_message(conn, data)
        if not self.sample or not data.startswith(b'{"type":"session'):
            return
        now = time.time()
        lo, hi = self.window
        if not lo <= now < hi:
            return
        msg = msgspec.json.decode(data)
        if msg["type"] == "sessions.update":
            items = msg["changes"].items()
        elif msg["type"] == "session.update":
            items = [(msg["sessionID"], msg["changes"])]
        else:
            return
        # The newest stamp in a batch is just before the hub's tick: what follows is delivery.
        self.after_tick.append(now - max(c["lastActiveAt"] for _, c in items) / 1000)
        for sid, changes in items:
            phase = int(sid[1:]) / self.total * self.period
            stamped = changes["lastActiveAt"] / 1000 + 0.002  # ms truncation
            k = math.floor((stamped - self.t0 - phase) / self.period)
            self.out.append(now - (self.t0 + phase + k * self.period))


async def part1(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    hub = start_hub(port, API_KEY, ["--agent-interval", str(args.interval), "--max-agents", "0"])
    url = f"ws://127.0.0.1:{port}"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    gos = [ctx.Queue() for _ in range(args.tracker_procs)]
    share = math.ceil(args.sessions / args.tracker_procs)
    procs = []
    run_for = 0.5 + args.warmup * 2 + args.duration * 2 + 10
    try:
        for w in range(args.tracker_procs):
            first, n = w * share, min(share, args.sessions - w * share)
            p = ctx.Process(
                target=tracker_worker, args=(url, first, n, args.sessions, args.period, q, gos[w])
            )
            p.start()
            procs.append(p)
        for _ in procs:
            await asyncio.get_running_loop().run_in_executor(None, q.get)
        t0 = time.time() + 0.5
        for g in gos:
            g.put((t0, t0 + run_for))
        await asyncio.sleep(0.5 + args.warmup)
        c0 = cpu_seconds(hub.pid)
        await asyncio.sleep(args.duration)
        base_cpu = (cpu_seconds(hub.pid) - c0) / args.duration

        samples: list[float] = []
        after_tick: list[float] = []
        schedule = (t0, args.period, args.sessions)
        headers = [("Authorization", f"Bearer {API_KEY}")]
        t_sub = time.monotonic()
        agents = await open_many(
            url,
            "/ws/agent/bench",
            args.agents,
            lambda i: LatencyAgent(
                i % (args.agents // args.sampled or 1) == 0, schedule, samples, after_tick
            ),
            headers,
        )
        for conn in agents:
            conn.send(b'{"type":"subscribe","batch":true}')
        handlers: list[LatencyAgent] = [a.handler for a in agents]  # type: ignore[misc]
        while any(h.messages == 0 for h in handlers):
            await asyncio.sleep(0.01)
        snapshot_s = time.monotonic() - t_sub
        snapshot_sizes = [len(msgspec.json.decode(h.first)["sessions"]) for h in handlers[:3]]
        await asyncio.sleep(args.warmup)
        start = time.time()
        for h in handlers:
            h.window = (start, start + args.duration)
        before = [h.messages for h in handlers]
        m0, b0 = sum(before), sum(h.bytes for h in handlers)
        c0, own0 = cpu_seconds(hub.pid), time.process_time()
        await asyncio.sleep(args.duration)
        cpu = (cpu_seconds(hub.pid) - c0) / args.duration
        own = (time.process_time() - own0) / args.duration
        frames = (sum(h.messages for h in handlers) - m0) / args.duration
        per_agent = sorted(h.messages - n for h, n in zip(handlers, before, strict=True))
        nbytes = (sum(h.bytes for h in handlers) - b0) / args.duration
        for conn in agents:
            conn.abort()
        lags = [q.get(timeout=run_for + 30) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=run_for + 30)
            if p.is_alive():
                p.kill()
        hub.kill()
        hub.wait()
    return {
        "agents": args.agents,
        "sessions": args.sessions,
        "period_s": args.period,
        "interval_s": args.interval,
        "snapshot_sessions": snapshot_sizes,
        "all_snapshots_s": round(snapshot_s, 2),
        "hub_cpu_trackers_only": round(base_cpu, 3),
        "hub_cpu_with_agents": round(cpu, 3),
        "cpu_ratio": round(cpu / base_cpu, 2) if base_cpu else None,
        "frames_per_s": round(frames),
        "frames_per_agent_min_median_max": [per_agent[0], per_agent[len(per_agent) // 2], per_agent[-1]],
        "mb_per_s": round(nbytes / 1e6, 1),
        "latency_samples": len(samples),
        "latency_p50_ms": round(pct(samples, 0.5) * 1000, 1),
        "latency_p99_ms": round(pct(samples, 0.99) * 1000, 1),
        "latency_max_ms": round(max(samples, default=math.nan) * 1000, 1),
        "tick_to_agent_p50_ms": round(pct(after_tick, 0.5) * 1000, 1),
        "tick_to_agent_p99_ms": round(pct(after_tick, 0.99) * 1000, 1),
        "agents_process_cpu": round(own, 3),
        "tracker_send_lag_p99_ms": round(max(lag[2] for lag in lags) * 1000, 1),
    }


# Part 2 -----------------------------------------------------------------


async def part2(args: argparse.Namespace) -> dict[str, Any]:
    """Hub CPU per tracker update with 1,000 agents subscribed, by kind of subscription."""
    n_sessions = 100
    results: dict[str, Any] = {}
    kinds = (
        "none",
        "whole project",
        "one sessionID each",
        "own 'is' filter each",
        "own 'contains' filter each",
    )
    for kind in kinds:
        # Fewer changes where each costs 1,000 frames (the agents' reading bounds the run).
        changes = args.changes if kind == "whole project" else args.changes * 10
        port = free_port()
        hub = start_hub(port, API_KEY, ["--agent-interval", str(args.interval), "--max-agents", "0"])
        url = f"ws://127.0.0.1:{port}"
        try:
            trackers = await start_sessions(url, 0, n_sessions, {"userID": "u0"})
            agents: list[WsConn] = []
            if kind != "none":
                headers = [("Authorization", f"Bearer {API_KEY}")]
                agents = await open_many(
                    url, "/ws/agent/bench", args.cost_agents, lambda i: Counter(), headers
                )
                for i, conn in enumerate(agents):
                    if kind == "whole project":
                        body: dict[str, Any] = {}
                    elif kind == "one sessionID each":
                        body = {"sessionID": f"b{i % n_sessions}"}
                    else:  # every agent its own group: found by value, or matched one by one
                        op = "is" if "'is'" in kind else "contains"
                        body = {"filters": [{"name": "userID", "operator": op, "value": [f"u{i}"]}]}
                    conn.send(json.dumps({"type": "subscribe", **body}).encode())
                while any(a.handler.messages == 0 for a in agents):  # type: ignore[attr-defined]
                    await asyncio.sleep(0.01)
            # Frames the agents must receive: every change goes to all, to the
            # session's watchers, or to the one agent whose filter matches userID u0.
            expect = (
                changes
                * {
                    "none": 0,
                    "whole project": args.cost_agents,
                    "one sessionID each": args.cost_agents / n_sessions,
                    "own 'is' filter each": 1,
                    "own 'contains' filter each": 1,
                }[kind]
            )
            received0 = sum(a.handler.messages for a in agents)  # type: ignore[attr-defined]
            await asyncio.sleep(0.3)
            c0 = cpu_seconds(hub.pid)
            for k in range(changes):
                trackers[k % n_sessions].send(f'{{"type":"update","pageTitle":"t{k}"}}'.encode())
                if k % 20 == 19:
                    await asyncio.sleep(0.002)
            deadline = time.monotonic() + 60
            while (
                sum(a.handler.messages for a in agents) - received0 < expect  # type: ignore[attr-defined]
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.002)
            results[kind] = (cpu_seconds(hub.pid) - c0) / changes * 1e6
            for conn in (*agents, *trackers):
                conn.abort()
        finally:
            hub.kill()
            hub.wait()
    base = results["none"]
    return {
        "agents": args.cost_agents,
        "changes": {"whole project": args.changes, "others": args.changes * 10},
        "hub_cpu_us_per_change": {k: round(v, 1) for k, v in results.items()},
        "ratio_to_no_agents": {k: round(v / base, 1) for k, v in results.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_fanout", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--period", type=float, default=1.0, help="seconds between a session's heartbeats")
    parser.add_argument("--interval", type=float, default=1.0, help="the hub's --agent-interval")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per phase")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--tracker-procs", type=int, default=2)
    parser.add_argument("--sampled", type=int, default=10, help="agents whose frames are decoded for latency")
    parser.add_argument("--cost-agents", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=300)
    parser.add_argument("--part", choices=("1", "2", "both"), default="both")
    args = parser.parse_args()
    out: dict[str, Any] = {}
    if args.part in ("1", "both"):
        out["fanout"] = asyncio.run(part1(args))
        print(json.dumps(out["fanout"], indent=2), flush=True)
    if args.part in ("2", "both"):
        out["cost_per_change"] = asyncio.run(part2(args))
        print(json.dumps(out["cost_per_change"], indent=2), flush=True)


if __name__ == "__main__":
    main()
