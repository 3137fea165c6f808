"""Issue 16's cluster figures 2-5, with real redis-server processes and real hub nodes.

Every node is a ``loadtest.scaling_node`` process: ``hub.app.Hub`` serving on
its own port, its index filled through its registry (no tracker sockets) and
changed on a timer, so the replication under test (``hub/cluster.py``, the
cluster partitioned by project) runs exactly as it does behind trackers.
Redis runs on free ports (never 6379), from ``tests/redis_server.py``.

A node mirrors a project (holds the other nodes' sessions of it) only while
it serves it: an agent of its own follows the project, or a search of it
within ``--mirror-idle`` (the nodes run without webhooks, so no partition has
owners that mirror it regardless). The bench computes what each node serves
(its agents' projects), waits until each node mirrors
exactly that many partitions and holds every session of each (the labelled
``hub_project_live_sessions``), and compares answers only among the nodes
serving a project: searching a project on any other node would make it
mirror the project and change what is measured. Cases:

- ``scaling`` (figure 2): 4, 8, 16 nodes with the same sessions and change
  rate per node, 32 projects, each node with one agent WebSocket subscribed
  to each of its 2 served projects; per-node CPU over a steady window and RSS,
  the ratio of the largest size to the smallest, a plot (with the full-mirror
  baseline of ``--baseline`` beside it).
- ``spread`` (figure 3): a local 3-master Redis Cluster, 100 projects, each
  followed by agents on two nodes: per master commands/s and bytes/s (INFO
  commandstats / stats deltas), max/mean.
- ``join`` (figure 4): a cluster holding 50k sessions changing 5k times/s,
  Redis's ``client-output-buffer-limit pubsub 4mb 2mb 5``; a new node joins:
  ready or not, how long, the largest subscriber output buffer meanwhile; then
  every project is searched on it (each search a cold one: it mirrors the
  project first) and compared with another node's answer.
- ``restart`` (figure 5): 8 nodes, agents as in ``scaling``, Redis killed and
  restarted empty while the nodes keep changing their sessions; partition
  snapshot reads (HGETALL of ``{p:X}:s:<holder>``) per (partition, holder,
  reading node) after the restart, from MONITOR (checked against INFO
  commandstats and each node's ``hub_cluster_partition_reads_total``), and the
  time until every node serving a project answers it the same.

In ``join`` and ``restart`` the changes are paused (SIGUSR1 to every node) before
answers are compared: with 5k changes/s no two nodes' answers are equal at one instant.

    python -m loadtest.bench_scaling                 # all four cases, ~5 minutes
    python -m loadtest.bench_scaling --cases scaling --sizes 4,8,16 --sessions 2000 --rate 25 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil
import redis

from loadtest.client import HttpClient, WsConn, ws_connect
from tests.redis_server import RedisCluster, RedisServer

API_KEY = "bench-scaling-key"
CASES = ("scaling", "spread", "join", "restart")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "loadtest" / "results"
PAGE = 1000  # the search API's largest page
# MONITOR lines: +<unix time> [<db> <client address>] "<COMMAND>" "<first argument>" ...
MONITOR_LINE = re.compile(rb'^\+([\d.]+) \[\d+ [^\]]*?:(\d+)\] "([^"]+)"(?: "([^"]*)")?')
# The cluster's map of nodes (hub/partitions.py NODES_KEY), and a node's part of a partition.
NODES_MAP = b"{hub}:nodes"
RECORDS_KEY = re.compile(rb"^\{p:(.*)\}:s:(.*)$")
# Prometheus sample lines with labels: name{label="value",...} number
LABELLED = re.compile(r"^(\w+)\{(.*)\} (\S+)$")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def project(i: int) -> str:
    return f"p{i:02d}"


def per_project(sessions: int, projects: int) -> list[int]:
    """Sessions of each project on a scaling_node with ``sessions`` (its session i is in
    project i mod ``projects``)."""
    return [sessions // projects + (1 if p < sessions % projects else 0) for p in range(projects)]


def expected_totals(sessions: list[int], projects: int) -> list[int]:
    """Each project's live sessions over nodes holding ``sessions`` each."""
    totals = [0] * projects
    for s in sessions:
        for p, n in enumerate(per_project(s, projects)):
            totals[p] += n
    return totals


def followed_by(names: list[str], projects: int) -> dict[str, set[int]]:
    """Node i's agents follow projects 2i and 2i+1 (mod ``projects``)."""
    return {name: {2 * i % projects, (2 * i + 1) % projects} for i, name in enumerate(names)}


def followed_twice(names: list[str], projects: int) -> dict[str, set[int]]:
    """Every project followed by agents on two nodes: project p on nodes p and p+1 (mod n)."""
    n = len(names)
    return {name: {p for p in range(projects) if i in (p % n, (p + 1) % n)} for i, name in enumerate(names)}


def serving(
    names: list[str], totals: list[int], followed: dict[str, set[int]] | None = None
) -> dict[str, set[int]]:
    """What each node mirrors: the projects its agents follow, of those some node holds (a
    project without buckets is one partition, named after it)."""
    return {n: {p for p in (followed or {}).get(n, ()) if totals[p]} for n in names}


# -- nodes ---------------------------------------------------------------------


class _Total(msgspec.Struct):
    total: int


class _Answer(msgspec.Struct):
    data: _Total


_decode_total = msgspec.json.Decoder(_Answer).decode


@dataclass
class Scrape:
    """A node's /metrics: unlabelled samples, and live sessions by project."""

    values: dict[str, float]
    projects: dict[str, float]


@dataclass
class Node:
    """A scaling_node process; its stdout's JSON lines fill ``port``, ``filled`` and ``changes``."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    sessions: int = 0
    port: int = 0
    filled: int | None = None
    changes: int = 0
    changes_at: float = 0.0
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    done_filling: asyncio.Event = field(default_factory=asyncio.Event)
    http: HttpClient | None = None

    async def read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            event = json.loads(line)
            if "port" in event:
                self.port = event["port"]
                self.http = HttpClient(f"http://127.0.0.1:{self.port}", API_KEY)
                self.listening.set()
            elif "filled" in event:
                self.filled = event["filled"]
                self.done_filling.set()
            elif "changes" in event:
                self.changes, self.changes_at = event["changes"], time.monotonic()
        # Exited: wake whoever waits, who then finds the exit code.
        self.listening.set()
        self.done_filling.set()

    def failed(self) -> str | None:
        if self.proc.returncode is None:
            return None
        return f"node {self.name} exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}"

    async def get(self, path: str) -> bytes:
        assert self.http is not None
        status, body = await self.http.request("GET", path)
        if status != 200:
            raise RuntimeError(f"node {self.name} GET {path}: HTTP {status} {body[:200]!r}")
        return body

    async def scrape(self) -> Scrape:
        found: dict[str, float] = {}
        by_project: dict[str, float] = {}
        for line in (await self.get("/metrics")).decode().splitlines():
            if not line or line.startswith("#"):
                continue
            if "{" not in line:
                name, _, value = line.partition(" ")
                found[name] = float(value)
            elif line.startswith("hub_project_live_sessions{"):
                labelled = LABELLED.match(line)
                if labelled is not None:
                    key = labelled.group(2).partition('project="')[2].partition('"')[0]
                    by_project[key] = float(labelled.group(3))
        return Scrape(found, by_project)

    async def metrics(self) -> dict[str, float]:
        """This node's unlabelled Prometheus samples."""
        return (await self.scrape()).values

    async def search(self, key: str, page: int = 1, timeout: float = 30.0, limit: int = PAGE) -> bytes:
        """One page of ``key``'s live sessions as this node answers a search, ordered by
        sessionID: nodes that hold the same records answer the same bytes."""
        assert self.http is not None
        body = json.dumps({"sort": "sessionID", "order": "asc", "limit": limit, "page": page})
        status, raw = await self.http.request(
            "POST", f"/public/{key}/assist/sessions", body.encode(), timeout=timeout
        )
        if status != 200:
            raise RuntimeError(f"node {self.name} search {key}: HTTP {status} {raw[:200]!r}")
        return raw

    async def project_pages(self, key: str) -> list[bytes]:
        """Every live session of ``key`` as this node answers a search, page by page."""
        pages = [await self.search(key)]
        while len(pages) * PAGE < _decode_total(pages[0]).data.total:
            pages.append(await self.search(key, len(pages) + 1))
        return pages

    def signal(self, signum: int) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signum)

    def cpu_seconds(self) -> float:
        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)


@dataclass
class Load:
    """What every node of a case does: its sessions, their projects, its changes per second."""

    sessions: int
    projects: int
    rate: float
    update_share: float
    hub_args: list[str] = field(default_factory=list)
    fill_rate: float = 0.0


class Nodes:
    """The node processes of one case, all killed at the end."""

    def __init__(self, redis_url: str, load: Load, workdir: Path) -> None:
        self.redis_url = redis_url
        self.load = load
        self.workdir = workdir
        self.nodes: list[Node] = []
        self._readers: list[asyncio.Task[None]] = []

    async def spawn(self, name: str, sessions: int | None = None, hub_args: list[str] | None = None) -> Node:
        load = self.load
        count = load.sessions if sessions is None else sessions
        log_path = self.workdir / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
        with log_path.open("w") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loadtest.scaling_node",
                "--sessions", str(count),
                "--projects", str(load.projects), "--rate", str(load.rate),
                "--update-share", str(load.update_share), "--fill-rate", str(load.fill_rate), "--",
                "--port", "0", "--api-key", API_KEY, "--redis-url", self.redis_url, "--node-id", name,
                "--log-level", "warning", "--metrics-per-project", "true", *load.hub_args, *(hub_args or []),
                stdout=asyncio.subprocess.PIPE, stderr=stderr, env=env, cwd=ROOT,
            )  # fmt: skip
        node = Node(name, proc, log_path, sessions=count)
        self.nodes.append(node)
        self._readers.append(asyncio.create_task(node.read()))
        return node

    async def start(self, count: int, timeout: float, prefix: str = "n") -> list[Node]:
        """``count`` nodes, once each listens and has started its sessions."""
        started = [await self.spawn(f"{prefix}{i}") for i in range(count)]
        await filled(started, timeout)
        return started

    def signal(self, signum: int) -> None:
        for node in self.nodes:
            node.signal(signum)

    async def close(self) -> None:
        for node in self.nodes:
            if node.proc.returncode is None:
                node.proc.kill()
            if node.http is not None:
                node.http.close()
        for node in self.nodes:
            await node.proc.wait()
        for task in self._readers:
            task.cancel()


async def filled(nodes: list[Node], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        for node in nodes:
            await node.done_filling.wait()
            if (failure := node.failed()) is not None or node.filled is None:
                raise RuntimeError(failure or f"node {node.name} stopped before filling")


async def settled(nodes: list[Node], serves: dict[str, set[int]], totals: list[int], timeout: float) -> float:
    """Seconds until each node mirrors exactly the partitions it serves and holds every
    session of each (``hub_cluster_mirrored_partitions``, ``hub_project_live_sessions``)."""
    began = time.monotonic()
    while True:
        pending: dict[str, Any] = {}
        for n in nodes:
            if (failure := n.failed()) is not None:
                raise RuntimeError(failure)
            s = await n.scrape()
            want = serves[n.name]
            short = {project(p): (s.projects.get(project(p), 0), totals[p]) for p in sorted(want)}
            short = {k: v for k, v in short.items() if v[0] != v[1]}
            mirrored = s.values.get("hub_cluster_mirrored_partitions")
            if short or mirrored != len(want):
                pending[n.name] = {
                    "mirrored": mirrored,
                    "serves": len(want),
                    "short": dict(list(short.items())[:4]),
                }
        if not pending:
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise RuntimeError(f"nodes not settled within {timeout} s: {pending}")
        await asyncio.sleep(0.25)


async def agree(
    nodes: list[Node], serves: dict[str, set[int]], totals: list[int], since: float, timeout: float
) -> dict[str, Any]:
    """Poll until, for every project, the nodes serving it answer its search the same with all
    its sessions (``totals``). Only served projects are searched (a search would make any
    other node mirror the project).

    ``agreed_s``: seconds from ``since`` (monotonic) to the end of the first poll that found
    it (None past ``timeout``); the answers were read within the ``poll_s`` before that.
    """
    polls = 0
    poll_s = 0.0
    answers: dict[tuple[str, int], list[bytes]] = {}

    async def node_answers(n: Node) -> dict[tuple[str, int], list[bytes]]:
        return {(n.name, p): await n.project_pages(project(p)) for p in sorted(serves[n.name])}

    while True:
        began = time.monotonic()
        answers = {}
        for part in await asyncio.gather(*(node_answers(n) for n in nodes)):
            answers.update(part)
        ended = time.monotonic()
        polls, poll_s = polls + 1, ended - began
        if not _disagreeing(answers, totals):
            return {"agreed_s": ended - since, "poll_s": poll_s, "polls": polls, "records_differing": 0}
        if ended - since > timeout:
            break
        await asyncio.sleep(0.05)
    # Counted only now: decoding every record each poll would slow the polls down.
    differing = 0
    for p in range(len(totals)):
        mine = [pages for (_, q), pages in answers.items() if q == p]
        differing += sum(_differing(mine[0], other) for other in mine[1:])
    return {
        "agreed_s": None,
        "poll_s": poll_s,
        "polls": polls,
        "records_differing": differing,
        "projects_disagreeing": _disagreeing(answers, totals),
    }


def _disagreeing(answers: dict[tuple[str, int], list[bytes]], totals: list[int]) -> list[str]:
    bad = []
    for p, total in enumerate(totals):
        mine = [pages for (_, q), pages in answers.items() if q == p]
        if not mine:
            continue
        if _decode_total(mine[0][0]).data.total != total or any(other != mine[0] for other in mine[1:]):
            bad.append(project(p))
    return bad


def records(pages: list[bytes]) -> list[Any]:
    """The sessions of one project's answer pages."""
    return [s for raw in pages for s in msgspec.json.decode(raw)["data"]["sessions"]]


def _differing(a: list[bytes], b: list[bytes]) -> int:
    """Records that differ between two answers of one project (by sessionID)."""
    ra = {s["sessionID"]: s for s in records(a)}
    rb = {s["sessionID"]: s for s in records(b)}
    return sum(1 for sid in ra.keys() | rb.keys() if ra.get(sid) != rb.get(sid))


# -- agents --------------------------------------------------------------------


class Agent:
    """An agent WebSocket subscribed to a whole project: counts what it receives."""

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0
        self.snapshot = asyncio.Event()
        self.closed: int | None = None

    def on_open(self, conn: WsConn) -> None:
        conn.send(b'{"type":"subscribe"}')

    def on_message(self, conn: WsConn, data: bytes) -> None:
        self.frames += 1
        self.bytes += len(data)
        if not self.snapshot.is_set() and data.startswith(b'{"type":"snapshot"'):
            self.snapshot.set()

    def on_close(self, conn: WsConn, code: int | None, opened: bool) -> None:
        self.closed = code if code is not None else -1


async def connect_agents(
    nodes: list[Node], followed: dict[str, set[int]]
) -> tuple[list[Agent], list[WsConn]]:
    """One agent on each project a node's agents follow."""
    agents: list[Agent] = []
    conns: list[WsConn] = []
    for node in nodes:
        for p in sorted(followed[node.name]):
            agent = Agent()
            conns.append(
                await ws_connect(
                    f"ws://127.0.0.1:{node.port}",
                    f"/ws/agent/{project(p)}",
                    agent,
                    headers=[("Authorization", f"Bearer {API_KEY}")],
                )
            )
            agents.append(agent)
    async with asyncio.timeout(60):
        for agent in agents:
            await agent.snapshot.wait()
    return agents, conns


# -- Redis ---------------------------------------------------------------------


def redis_cpu(port: int) -> float:
    info = redis.Redis(port=port).info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def command_calls(port: int) -> dict[str, int]:
    """Calls per command since this redis-server started (INFO commandstats; a command a
    Redis Function runs counts there too)."""
    stats = redis.Redis(port=port).info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def traffic(port: int) -> dict[str, Any]:
    """Commands (INFO itself excluded: this tool's own polling), bytes in and out, CPU seconds."""
    client = redis.Redis(port=port)
    stats = client.info("stats")
    calls = command_calls(port)
    return {
        "calls": {name: c for name, c in calls.items() if name != "info"},
        "commands": sum(c for name, c in calls.items() if name != "info"),
        "bytes_in": float(stats["total_net_input_bytes"]),
        "bytes_out": float(stats["total_net_output_bytes"]),
        "cpu_s": redis_cpu(port),
        "keys": float(client.dbsize()),
        "hub_keys": len(list(client.scan_iter(match="{hub}*"))),
    }


# -- cases ---------------------------------------------------------------------


async def case_scaling(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rows = []
    for size in args.sizes:
        log(f"scaling: {size} nodes x {args.sessions} sessions, {args.rate}/s each (load {loadavg()})")
        with RedisServer() as server:
            nodes = Nodes(
                server.url,
                Load(
                    args.sessions, args.projects, args.rate, args.update_share, args.hub_args, args.fill_rate
                ),
                workdir,
            )
            try:
                rows.append(await _scaling_size(args, server, nodes, size))
            finally:
                await nodes.close()
        row = rows[-1]
        log(
            f"  per node: CPU {row['cpu_pct_mean']:.1f} % (max {row['cpu_pct_max']:.1f}), "
            f"RSS {row['rss_mib_mean']:.1f} MiB, {row['mirrored_partitions_mean']:.1f} partitions, "
            f"{row['held_sessions_mean']:,.0f} sessions held; "
            f"machine CPU {row['machine_cpu_pct']:.0f} % of 200"
        )
    first, last = rows[0], rows[-1]
    return {
        "rows": rows,
        "cpu_ratio": last["cpu_pct_mean"] / first["cpu_pct_mean"] if first["cpu_pct_mean"] else None,
        "rss_ratio": last["rss_mib_mean"] / first["rss_mib_mean"],
        "held_ratio": last["held_sessions_mean"] / first["held_sessions_mean"],
        "ratio_of": [first["nodes"], last["nodes"]],
        "baseline": _baseline(args.baseline),
    }


def _baseline(path: Path) -> dict[str, Any] | None:
    """The full-mirror figures of an earlier run of this bench (before the partitioning)."""
    try:
        old = json.loads(path.read_text())["scaling"]
    except (OSError, KeyError, ValueError):
        return None
    rows = [{k: r[k] for k in ("nodes", "cpu_pct_mean", "rss_mib_mean")} for r in old["rows"]]
    return {"file": str(path), "rows": rows, "cpu_ratio": old["cpu_ratio"], "rss_ratio": old["rss_ratio"]}


async def _scaling_size(
    args: argparse.Namespace, server: RedisServer, nodes: Nodes, size: int
) -> dict[str, Any]:
    total = size * args.sessions
    started = time.monotonic()
    members = await nodes.start(size, timeout=60 + total / 500)
    names = [n.name for n in members]
    totals = expected_totals([args.sessions] * size, args.projects)
    followed = followed_by(names, args.projects)
    agents, conns = await connect_agents(members, followed)
    serves = serving(names, totals, followed)
    settle_s = await settled(members, serves, totals, timeout=60 + total / 500)
    await asyncio.sleep(args.warmup)
    load_before = loadavg()
    scrape0 = [await n.scrape() for n in members]
    cpu0 = [n.cpu_seconds() for n in members]
    redis0 = redis_cpu(server.port)
    frames0 = sum(a.frames for a in agents)
    changes0 = sum(n.changes for n in members)
    psutil.cpu_percent(None)
    t0 = time.monotonic()
    await asyncio.sleep(args.seconds)
    elapsed = time.monotonic() - t0
    machine = psutil.cpu_percent(None) * psutil.cpu_count()
    cpu = [100 * (n.cpu_seconds() - c) / elapsed for n, c in zip(members, cpu0, strict=True)]
    redis_pct = 100 * (redis_cpu(server.port) - redis0) / elapsed
    frames = sum(a.frames for a in agents) - frames0
    changes = sum(n.changes for n in members) - changes0
    scrape1 = [await n.scrape() for n in members]
    rss = [n.rss() / 2**20 for n in members]

    def delta(name: str) -> list[float]:
        return [
            s1.values.get(name, 0) - s0.values.get(name, 0) for s0, s1 in zip(scrape0, scrape1, strict=True)
        ]

    received = [d / elapsed for d in delta("hub_redis_received_batches_total")]
    published = [d / elapsed for d in delta("hub_redis_published_batches_total")]
    held = [s.values.get("hub_live_sessions", 0.0) for s in scrape1]
    mirrored = [s.values.get("hub_cluster_mirrored_partitions", 0.0) for s in scrape1]
    for conn in conns:
        conn.abort()
    closed = [a.closed for a in agents if a.closed is not None]
    return {
        "nodes": size,
        "sessions_per_node": args.sessions,
        "sessions_total": total,
        "start_and_settle_s": round(time.monotonic() - started - args.warmup - elapsed, 1),
        "settle_wait_s": round(settle_s, 2),
        "window_s": round(elapsed, 1),
        "cpu_pct": [round(c, 2) for c in cpu],
        "cpu_pct_mean": statistics.mean(cpu),
        "cpu_pct_max": max(cpu),
        "rss_mib": [round(r, 1) for r in rss],
        "rss_mib_mean": statistics.mean(rss),
        "served_partitions": [len(serves[n]) for n in names],
        "mirrored_partitions": mirrored,
        "mirrored_partitions_mean": statistics.mean(mirrored),
        "held_sessions": held,
        "held_sessions_mean": statistics.mean(held),
        "partition_reads_in_window": sum(delta("hub_cluster_partition_reads_total")),
        "received_batches_per_s_mean": statistics.mean(received),
        "published_batches_per_s_mean": statistics.mean(published),
        "changes_per_s_total": changes / elapsed if changes else None,
        "agents": len(agents),
        "agent_frames_per_s": frames / elapsed,
        "agents_closed": closed,
        "redis_cpu_pct": redis_pct,
        "machine_cpu_pct": machine,
        "load_before": load_before,
        "load_after": loadavg(),
    }


async def case_spread(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    log(f"spread: 3-master Redis Cluster, {args.spread_nodes} nodes, {args.spread_projects} projects")
    load_before = loadavg()
    with RedisCluster() as cluster:
        load = Load(
            args.spread_sessions,
            args.spread_projects,
            args.rate,
            args.update_share,
            args.hub_args,
            args.fill_rate,
        )
        nodes = Nodes(cluster.url, load, workdir)
        try:
            members = await nodes.start(args.spread_nodes, timeout=90)
            total = args.spread_nodes * args.spread_sessions
            names = [n.name for n in members]
            totals = expected_totals([args.spread_sessions] * len(members), args.spread_projects)
            followed = followed_twice(names, args.spread_projects)
            _, conns = await connect_agents(members, followed)
            await settled(members, serving(names, totals, followed), totals, timeout=60 + total / 500)
            await asyncio.sleep(args.warmup)
            ports = [n.port for n in cluster.nodes]
            before = [traffic(p) for p in ports]
            t0 = time.monotonic()
            await asyncio.sleep(args.spread_seconds)
            elapsed = time.monotonic() - t0
            after = [traffic(p) for p in ports]
            slots = _slots_of(cluster.nodes[0].port, args.spread_projects)
            for conn in conns:
                conn.abort()
        finally:
            await nodes.close()
    masters = []
    for port, b, a in zip(ports, before, after, strict=True):
        calls = {name: (c - b["calls"].get(name, 0)) / elapsed for name, c in a["calls"].items()}
        masters.append(
            {
                "port": port,
                "commands_per_s": (a["commands"] - b["commands"]) / elapsed,
                "commands_by_name_per_s": {k: round(v, 1) for k, v in sorted(calls.items()) if v},
                "bytes_in_per_s": (a["bytes_in"] - b["bytes_in"]) / elapsed,
                "bytes_out_per_s": (a["bytes_out"] - b["bytes_out"]) / elapsed,
                "cpu_pct": 100 * (a["cpu_s"] - b["cpu_s"]) / elapsed,
                "keys": int(a["keys"]),
                "hub_keys": a["hub_keys"],
                "projects": slots.get(port, 0),
            }
        )

    def max_over_mean(values: list[float]) -> float | None:
        mean = statistics.mean(values)
        return max(values) / mean if mean else None

    return {
        "nodes": args.spread_nodes,
        "sessions_per_node": args.spread_sessions,
        "projects": args.spread_projects,
        "window_s": round(elapsed, 1),
        "masters": masters,
        "commands_max_over_mean": max_over_mean([m["commands_per_s"] for m in masters]),
        "bytes_max_over_mean": max_over_mean([m["bytes_in_per_s"] + m["bytes_out_per_s"] for m in masters]),
        "projects_max_over_mean": max_over_mean([float(m["projects"]) for m in masters]),
        # redis-py's cluster pipeline asks the default node ``COMMAND GETKEYS`` (twice) for every
        # FCALL to route it: what the masters' commands would be without those round trips.
        "commands_max_over_mean_without_getkeys": max_over_mean(
            [m["commands_per_s"] - m["commands_by_name_per_s"].get("command|getkeys", 0.0) for m in masters]
        ),
        "load_before": load_before,
        "load_after": loadavg(),
    }


def _slots_of(port: int, projects: int) -> dict[int, int]:
    """Projects per master (by the port of the master serving each project's slot)."""
    client = redis.Redis(port=port)
    ranges = []
    for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
        ranges.append((int(start), int(end), int(master[1])))
    counts: Counter[int] = Counter()
    for p in range(projects):
        slot = int(client.execute_command("CLUSTER", "KEYSLOT", "{p:" + project(p) + "}"))
        counts.update(m for s, e, m in ranges if s <= slot <= e)
    return dict(counts)


async def _subscriber_buffers(port: int, peak: dict[str, int], stop: asyncio.Event) -> None:
    """The largest output buffer (omem) of any pub/sub subscriber, sampled every 100 ms."""
    client = redis.Redis(port=port)
    while not stop.is_set():
        for c in await asyncio.to_thread(client.client_list):
            if int(c.get("sub", 0)) or int(c.get("psub", 0)) or int(c.get("ssub", 0)):
                peak["omem"] = max(peak["omem"], int(c.get("omem", 0)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


async def case_join(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    per_node = args.join_sessions // args.join_nodes
    rate = args.join_rate / args.join_nodes
    log(f"join: {args.join_nodes} nodes x {per_node} sessions, {rate:.0f} changes/s each (load {loadavg()})")
    load_before = loadavg()
    with RedisServer() as server:
        client = redis.Redis(port=server.port)
        client.config_set("client-output-buffer-limit", args.pubsub_limit)
        limit = client.config_get("client-output-buffer-limit")["client-output-buffer-limit"]
        nodes = Nodes(
            server.url,
            Load(per_node, args.projects, rate, args.update_share, args.hub_args, args.fill_rate),
            workdir,
        )
        try:
            members = await nodes.start(args.join_nodes, timeout=120)
            total = per_node * args.join_nodes
            names = [n.name for n in members]
            totals = expected_totals([per_node] * len(members), args.projects)
            await settled(members, serving(names, totals), totals, timeout=60 + total / 500)
            await asyncio.sleep(args.warmup)
            c0, t0 = sum(n.changes for n in members), time.monotonic()
            await asyncio.sleep(2.0)
            achieved = (sum(n.changes for n in members) - c0) / (time.monotonic() - t0)
            log(f"  changing {achieved:.0f}/s; a node joins")
            peak = {"omem": 0}
            stop = asyncio.Event()
            sampler = asyncio.create_task(_subscriber_buffers(server.port, peak, stop))
            spawned = time.monotonic()
            joiner = await nodes.spawn("joiner", sessions=0)
            ready_s = listening_s = None
            deadline = spawned + args.join_timeout
            await asyncio.wait_for(joiner.listening.wait(), args.join_timeout)
            if joiner.port:
                listening_s = time.monotonic() - spawned
                while time.monotonic() < deadline and joiner.proc.returncode is None:
                    assert joiner.http is not None
                    status, _ = await joiner.http.request("GET", "/readyz")
                    if status == 200:
                        ready_s = time.monotonic() - spawned
                        break
                    await asyncio.sleep(0.05)
            result: dict[str, Any] = {
                "nodes": args.join_nodes,
                "sessions": total,
                "changes_per_s": achieved,
                "pubsub_limit": limit,
                "listening_s": listening_s,
                "ready_s": ready_s,
            }
            if ready_s is not None:
                s = await joiner.scrape()
                result["joiner_at_ready"] = {
                    "mirrored_partitions": s.values.get("hub_cluster_mirrored_partitions"),
                    "held_sessions": s.values.get("hub_live_sessions"),
                    "partition_reads": s.values.get("hub_cluster_partition_reads_total"),
                }
                # While changing: every project searched on the joiner (cold: it mirrors the
                # project first), its sessions (ids) against a member's (which mirrors it then).
                cold_s: list[float] = []
                equal = True
                held = 0
                for p in range(args.projects):
                    began = time.monotonic()
                    pages = await joiner.project_pages(project(p))
                    cold_s.append(time.monotonic() - began)
                    reference = members[p % len(members)]
                    ids = [r["sessionID"] for r in records(pages)]
                    held += len(ids)
                    equal = equal and ids == [
                        r["sessionID"] for r in records(await reference.project_pages(project(p)))
                    ]
                result["ids_equal_while_changing"] = equal
                result["joiner_sessions"] = held
                result["joiner_searches_s"] = {
                    "first_page_and_rest_p50": statistics.median(cold_s),
                    "max": max(cold_s),
                }
            stop.set()
            await sampler
            result["peak_subscriber_omem_bytes"] = peak["omem"]
            result["buffer_limit_closes_in_redis_log"] = server.log.read_text().count("output buffer limits")
            result["joiner_warnings"] = _warnings(joiner.log_path)
            if ready_s is not None:
                nodes.signal(signal.SIGUSR1)
                paused = time.monotonic()
                # Nothing changes any more: what was in flight lands within milliseconds, and
                # the first poll then compares settled answers (a poll of 50k records takes seconds).
                await asyncio.sleep(1.0)
                # The joiner serves every project now (searched within --mirror-idle).
                serves = {
                    m.name: {p for p in range(args.projects) if p % len(members) == i}
                    for i, m in enumerate(members)
                }
                serves[joiner.name] = set(range(args.projects))
                result["after_pause"] = await agree([*members, joiner], serves, totals, paused, 30)
        finally:
            await nodes.close()
    result["load_before"] = load_before
    result["load_after"] = loadavg()
    return result


def _warnings(path: Path) -> dict[str, int]:
    """A node's WARNING/ERROR log lines, counted by event name."""
    counts: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        if "WARNING" in line or "ERROR" in line:
            event = next((w for w in line.split() if w.startswith(("cluster.", "relay.", "hub."))), "other")
            counts[event] = counts.get(event, 0) + 1
    return counts


async def _monitor(port: int, lines: list[bytes], stop: asyncio.Event) -> None:
    # A MONITOR line carries a whole HSET of records: up to megabytes.
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 28)
    writer.write(b"MONITOR\r\n")
    try:
        while not stop.is_set():
            try:
                line = await asyncio.wait_for(reader.readline(), 0.2)
            except TimeoutError:
                continue
            if not line:
                return
            lines.append(line)
    finally:
        writer.close()


async def case_restart(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    n = args.restart_nodes
    log(f"restart: {n} nodes x {args.restart_sessions} sessions, Redis restarted empty (load {loadavg()})")
    load_before = loadavg()
    with RedisServer() as server:
        nodes = Nodes(
            server.url,
            Load(
                args.restart_sessions,
                args.projects,
                args.rate,
                args.update_share,
                args.hub_args,
                args.fill_rate,
            ),
            workdir,
        )
        try:
            members = await nodes.start(n, timeout=90)
            names = [m.name for m in members]
            total = n * args.restart_sessions
            totals = expected_totals([args.restart_sessions] * n, args.projects)
            followed = followed_twice(names, args.projects) if args.restart_agents else {}
            agents, conns = await connect_agents(members, followed) if followed else ([], [])
            serves = serving(names, totals, followed)
            await settled(members, serves, totals, timeout=60 + total / 500)
            await asyncio.sleep(args.warmup)
            reads0 = [(await m.metrics()).get("hub_cluster_partition_reads_total", 0.0) for m in members]
            server.kill()
            # The nodes keep changing their sessions while Redis is down: they diverge.
            await asyncio.sleep(args.restart_down)
            await asyncio.to_thread(server.start)
            restarted, restarted_wall = time.monotonic(), time.time()
            lines: list[bytes] = []
            stop = asyncio.Event()
            monitor = asyncio.create_task(_monitor(server.port, lines, stop))
            nodes.signal(signal.SIGUSR1)
            agreement = await agree(members, serves, totals, restarted, args.restart_timeout)
            await asyncio.sleep(2.0)  # reads that come late still count
            stop.set()
            await monitor
            hgetall_total = command_calls(server.port).get("hgetall", 0)
            ports = _client_ports(members, server.port)
            reads1 = [(await m.metrics()).get("hub_cluster_partition_reads_total", 0.0) for m in members]
            for conn in conns:
                conn.abort()
            agents_closed = [a.closed for a in agents if a.closed is not None]
        finally:
            await nodes.close()
    tally = _tally(lines, ports, names, restarted_wall)
    # The (partition, holder) pairs each node may read: every other node's part of each
    # partition it mirrors (every node holds sessions of every project here).
    holders = {
        p: {m for m in names if per_project(args.restart_sessions, args.projects)[p]}
        for p in range(args.projects)
    }
    bound = {m: sum(len(holders[p] - {m}) for p in serves[m]) for m in names}
    return {
        "nodes": n,
        "sessions_per_node": args.restart_sessions,
        "agents": len(agents),
        "agents_closed": agents_closed,
        "down_s": args.restart_down,
        "agreement": agreement,
        **tally,
        "mirrored_partitions_per_node": {m: len(serves[m]) for m in names},
        "one_read_per_pair_bound_per_node": bound,
        "partition_reads_metric_per_node": {
            m: r1 - r0 for m, r0, r1 in zip(names, reads0, reads1, strict=True)
        },
        "hgetall_commandstats": hgetall_total,
        "full_mirror_bound": 2 * n * (n - 1),
        "load_before": load_before,
        "load_after": loadavg(),
    }


def _tally(lines: list[bytes], owners: dict[int, str], names: list[str], since: float) -> dict[str, Any]:
    """Per node, from MONITOR: partition snapshot reads (HGETALL of ``{p:X}:s:<holder>``) and
    per (partition, holder, reading node), reads of the node map, all commands, and when it
    first read the node map (its replication's bootstrap after the restart; its relay
    reconnects apart), in s after ``since`` (Unix time)."""
    snapshots = dict.fromkeys(names, 0)
    node_maps = dict.fromkeys(names, 0)
    commands = dict.fromkeys(names, 0)
    pairs: Counter[tuple[str, str, str]] = Counter()
    synced: dict[str, float] = {}
    unattributed = hgetall = 0
    for line in lines:
        found = MONITOR_LINE.match(line)
        if found is None:
            continue
        at, port, command, key = found.groups()
        owner = owners.get(int(port))
        if owner is None:
            unattributed += 1
            continue
        commands[owner] += 1
        if command.upper() == b"HGETALL":
            hgetall += 1
            part = RECORDS_KEY.match(key or b"")
            if key == NODES_MAP:
                node_maps[owner] += 1
                synced.setdefault(owner, round(float(at) - since, 3))
            elif part is not None:
                snapshots[owner] += 1
                pairs[(part.group(1).decode(), part.group(2).decode(), owner)] += 1
    repeated = {f"{p} of {holder} by {reader}": c for (p, holder, reader), c in pairs.items() if c > 1}
    return {
        "snapshot_reads_per_node": snapshots,
        "snapshot_reads_total": sum(snapshots.values()),
        "snapshot_pairs_read": len(pairs),
        "snapshot_reads_per_pair_max": max(pairs.values(), default=0),
        "snapshot_pairs_read_more_than_once": repeated,
        "node_map_reads_per_node": node_maps,
        "commands_per_node": commands,
        "bootstrap_s_per_node": synced,
        "hgetall_monitor": hgetall,
        "monitor_unattributed_commands": unattributed,
    }


def _client_ports(nodes: list[Node], redis_port: int) -> dict[int, str]:
    """Local port of each node's connection to Redis -> the node's name."""
    found: dict[int, str] = {}
    for node in nodes:
        with contextlib.suppress(psutil.NoSuchProcess):
            for conn in psutil.Process(node.proc.pid).net_connections("tcp"):
                if conn.raddr and conn.raddr.port == redis_port:
                    found[conn.laddr.port] = node.name
    return found


# -- report --------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    sizes = [r["nodes"] for r in rows]
    baseline = result.get("baseline")
    fig, (ax_cpu, ax_rss) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (ax_cpu, "cpu_pct", "CPU per node (% of a core)"),
        (ax_rss, "rss_mib", "RSS per node (MiB)"),
    ):
        for r in rows:
            ax.scatter([r["nodes"]] * len(r[key]), r[key], s=10, alpha=0.4, color="tab:blue")
        ax.plot(sizes, [r[f"{key}_mean"] for r in rows], "o-", color="tab:red", label="partitioned, mean")
        if baseline:
            ax.plot(
                [r["nodes"] for r in baseline["rows"]],
                [r[f"{key}_mean"] for r in baseline["rows"]],
                "s--",
                color="tab:gray",
                label="full mirror (--baseline run), mean",
            )
        ax.set_xlabel("nodes")
        ax.set_xticks(sorted({*sizes, *(r["nodes"] for r in (baseline or {}).get("rows", []))}))
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    first = rows[0]
    fig.suptitle(
        f"Cluster partitioned by project: {first['sessions_per_node']:,} sessions per node, "
        f"{result['changes_per_node']:.0f} changes/s per node, agents on 2 projects per node"
        + ("\n(the baseline is another run: CPU compares within a line, not across)" if baseline else "")
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(result: dict[str, Any]) -> str:
    out: list[str] = []
    if "scaling" in result:
        s = result["scaling"]
        out += [
            "| nodes | sessions (total) | CPU per node mean / max | RSS per node mean | partitions mirrored "
            "| sessions held per node | batches read per node/s | agent frames/s (all) | Redis CPU "
            "| machine CPU (of 200 %) | load before → after |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in s["rows"]:
            out.append(
                f"| {r['nodes']} | {r['sessions_total']:,} "
                f"| {r['cpu_pct_mean']:.1f} / {r['cpu_pct_max']:.1f} % "
                f"| {r['rss_mib_mean']:.1f} MiB | {r['mirrored_partitions_mean']:.1f} "
                f"| {r['held_sessions_mean']:,.0f} | {r['received_batches_per_s_mean']:,.0f} "
                f"| {r['agent_frames_per_s']:,.0f} | {r['redis_cpu_pct']:.1f} % "
                f"| {r['machine_cpu_pct']:.0f} % "
                f"| {r['load_before']} → {r['load_after']} |"
            )
        a, b = s["ratio_of"]
        cpu_ratio = f"{s['cpu_ratio']:.2f}" if s["cpu_ratio"] is not None else "-"
        out.append(
            f"\nratio {b}/{a} nodes: CPU per node {cpu_ratio}, RSS per node {s['rss_ratio']:.2f}, "
            f"sessions held per node {s['held_ratio']:.2f}"
        )
        if s.get("baseline"):
            base = s["baseline"]
            out.append(
                f"full-mirror baseline ({base['file']}): "
                f"CPU {base['cpu_ratio']:.2f}, RSS {base['rss_ratio']:.2f}"
            )
        out.append("")
    if "spread" in result:
        s = result["spread"]
        out += [
            "| master | projects | commands/s | bytes in/s | bytes out/s | CPU | keys ({hub} keys) |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in s["masters"]:
            out.append(
                f"| :{m['port']} | {m['projects']} | {m['commands_per_s']:,.0f} | {m['bytes_in_per_s']:,.0f} "
                f"| {m['bytes_out_per_s']:,.0f} | {m['cpu_pct']:.1f} % | {m['keys']} ({m['hub_keys']}) |"
            )
        cmd = s["commands_max_over_mean"]
        byt = s["bytes_max_over_mean"]
        out.append(
            f"\nmax/mean per master: commands {cmd:.2f}, bytes {byt:.2f} "
            f"(projects {s['projects_max_over_mean']:.2f}; commands without redis-py's COMMAND GETKEYS "
            f"{s['commands_max_over_mean_without_getkeys']:.2f})\n"
            if cmd is not None and byt is not None
            else "\nmax/mean: no traffic\n"
        )
    if "join" in result:
        j = result["join"]
        searches = j.get("joiner_searches_s")
        out += [
            "| sessions | changes/s | pub/sub limit | listening | ready | mirrored at ready (sessions) "
            "| peak subscriber buffer | buffer-limit closes | searches on the joiner p50 / max "
            "| ids equal while changing | agree after pause | records differing |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {j['sessions']:,} | {j['changes_per_s']:,.0f} | {j['pubsub_limit'].split('pubsub ')[-1]} "
            f"| {_seconds(j['listening_s'])} | {_seconds(j['ready_s'])} "
            f"| {_at_ready(j)} "
            f"| {j['peak_subscriber_omem_bytes'] / 2**20:.2f} MiB | {j['buffer_limit_closes_in_redis_log']} "
            + (
                f"| {searches['first_page_and_rest_p50']:.2f} / {searches['max']:.2f} s "
                if searches
                else "| - "
            )
            + f"| {j.get('ids_equal_while_changing', '-')} | {_agreed(j.get('after_pause'))} "
            f"| {j.get('after_pause', {}).get('records_differing', '-')} |",
            "",
        ]
    if "restart" in result:
        r = result["restart"]
        reads = " ".join(str(v) for v in r["snapshot_reads_per_node"].values())
        bound = " ".join(str(v) for v in r["one_read_per_pair_bound_per_node"].values())
        metric = " ".join(f"{v:.0f}" for v in r["partition_reads_metric_per_node"].values())
        back = max(r["bootstrap_s_per_node"].values(), default=float("nan"))
        out += [
            "| nodes | sessions | Redis down | snapshot reads per node (MONITOR) | per node, metric "
            "| (partition, holder) pairs each node mirrors | max reads of one pair by one node "
            "| reads total (full mirror: 2·N·(N-1)) | HGETALL: MONITOR / commandstats "
            "| last node's bootstrap | all agree after restart | records differing |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {r['nodes']} | {r['nodes'] * r['sessions_per_node']:,} | {r['down_s']} s "
            f"| {reads} | {metric} "
            f"| {bound} | {r['snapshot_reads_per_pair_max']} "
            f"| {r['snapshot_reads_total']} ({r['full_mirror_bound']}) "
            f"| {r['hgetall_monitor']} / {r['hgetall_commandstats']} | {back:.2f} s "
            f"| {_agreed(r['agreement'])} | {r['agreement']['records_differing']} |",
            "",
        ]
    return "\n".join(out)


def _at_ready(join: dict[str, Any]) -> str:
    at = join.get("joiner_at_ready")
    if at is None:
        return "-"
    return f"{at['mirrored_partitions']:.0f} ({at['held_sessions']:,.0f})"


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def _agreed(agreement: dict[str, Any] | None) -> str:
    """When every node answered the same: by the end of a poll that took ``poll_s``."""
    if agreement is None:
        return "-"
    if agreement["agreed_s"] is None:
        return f"not within the timeout ({agreement['polls']} polls)"
    return f"≤ {agreement['agreed_s']:.2f} s (poll {agreement['poll_s']:.2f} s, #{agreement['polls']})"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "command": " ".join(["python -m loadtest.bench_scaling", *sys.argv[1:]]),
        "cpus": psutil.cpu_count(),
        "load_at_start": loadavg(),
    }
    cases = {"scaling": case_scaling, "spread": case_spread, "join": case_join, "restart": case_restart}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        workdir = args.logs or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.cases:
            result[name] = await cases[name](args, workdir)
            if name == "scaling":
                result["scaling"]["changes_per_node"] = args.rate
    result["load_at_end"] = loadavg()
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--projects", type=int, default=32, help="projects (scaling, join, restart)")
    parser.add_argument(
        "--rate", type=float, default=25.0, help="changes/s per node (scaling, spread, restart)"
    )
    parser.add_argument(
        "--update-share",
        type=float,
        default=1 / 3,
        help="share of changes that are record updates, the rest heartbeats",
    )
    parser.add_argument(
        "--fill-rate", type=float, default=0.0, help="sessions each node starts per second (0: at once)"
    )
    parser.add_argument(
        "--hub-args", default="", help="more `hub serve` flags for every node, e.g. '--node-lease 30'"
    )
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of changes before a measurement")
    parser.add_argument("--sizes", default="4,8,16", help="scaling: node counts")
    parser.add_argument("--sessions", type=int, default=2000, help="scaling: sessions per node")
    parser.add_argument("--seconds", type=float, default=30.0, help="scaling: measured seconds per size")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=RESULTS / "bench-scaling.json",
        help="scaling: an earlier run's JSON (the full mirror's) to plot and report beside",
    )
    parser.add_argument("--spread-nodes", type=int, default=4)
    parser.add_argument("--spread-sessions", type=int, default=1000, help="spread: sessions per node")
    parser.add_argument("--spread-projects", type=int, default=100)
    parser.add_argument("--spread-seconds", type=float, default=15.0)
    parser.add_argument("--join-nodes", type=int, default=4)
    parser.add_argument("--join-sessions", type=int, default=50_000, help="join: sessions in the cluster")
    parser.add_argument("--join-rate", type=float, default=5000.0, help="join: changes/s in the cluster")
    parser.add_argument("--join-timeout", type=float, default=60.0, help="join: seconds to wait for /readyz")
    parser.add_argument(
        "--pubsub-limit", default="pubsub 4mb 2mb 5", help="join: Redis's output buffer limit"
    )
    parser.add_argument("--restart-nodes", type=int, default=8)
    parser.add_argument("--restart-sessions", type=int, default=1000, help="restart: sessions per node")
    parser.add_argument("--restart-down", type=float, default=3.0, help="restart: seconds Redis stays down")
    parser.add_argument(
        "--restart-agents",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="restart: agents on every project, on 2 nodes each",
    )
    parser.add_argument(
        "--restart-timeout", type=float, default=30.0, help="restart: seconds to wait for agreement"
    )
    parser.add_argument("--logs", type=Path, help="keep the nodes' logs in this directory")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench-scaling-partitioned.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "plots" / "cluster-scaling-partitioned.png")
    args = parser.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.hub_args = shlex.split(args.hub_args)
    return args


def main() -> None:
    args = parse()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(args))
    if "scaling" in result:
        plot(result["scaling"], args.plot)
        result["scaling"]["plot"] = str(args.plot)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(report(result))


if __name__ == "__main__":
    main()
