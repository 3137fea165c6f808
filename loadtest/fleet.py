"""The swarm's worker processes as the orchestrator sees them.

Started with their share of the load, their reports read and summed into
``Totals`` and ``Latencies``, told to change rate or settle, and stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from .options import Options
from .procs import start_child
from .stats import Latencies
from .swarm import AgentSets, Report, Settled, WorkerConfig, WorkerMessage

PER_PROCESS: Final = 15_000  # connections per worker process (fd limit 20,000)

AGENT_FILTERS: Final = [
    [],
    [{"name": "userCountry", "operator": "is", "value": ["FR"]}],
    [{"name": "userBrowser", "operator": "contains", "value": ["chrome", "firefox"]}],
    [{"name": "plan", "operator": "is", "value": ["pro"]}],
]


@dataclass
class Totals:
    """The workers' last reports summed."""

    connected: int
    live: int
    starting: int
    ramped: bool  # every worker has tried every one of its trackers once
    sent: Counter[str]
    received: int
    errors: Counter[str]
    agents_open: int
    agent_events: Counter[str]
    backlog: int
    # With --projects-zipf: per "target:project", live sessions and starts in flight.
    live_by: Counter[str] = field(default_factory=Counter)
    starting_by: Counter[str] = field(default_factory=Counter)


class WorkerProcess:
    """A swarm worker process and what it last reported."""

    def __init__(self, proc: asyncio.subprocess.Process, cfg: WorkerConfig) -> None:
        self.proc = proc
        self.cfg = cfg
        self.last: Report | None = None
        self.settled: Settled | None = None
        self.got_settled = asyncio.Event()
        self.agent_sets: asyncio.Queue[AgentSets] = asyncio.Queue()

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(ConnectionError, RuntimeError):
            self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")


class Fleet:
    def __init__(self, latencies: Latencies) -> None:
        self.workers: list[WorkerProcess] = []
        self.latencies = latencies
        self.ended: set[str] = set()  # sessions ended by churn so far
        self._readers: set[asyncio.Task[None]] = set()

    async def start(self, opts: Options, heartbeat: float | None = None, probe: float = 0.0) -> None:
        """One process per 15k connections (at least ``--procs``), each with its share of the load."""
        conns = opts.trackers + opts.agents
        n = max(opts.procs, math.ceil(conns / PER_PROCESS), 1)
        # Past the orchestrator's own bound (hold + 90 s + settling + the final paging).
        deadline = opts.ramp_time + opts.duration + (len(opts.ladder) * (opts.step + 1.5)) + 600
        for w in range(n):
            lo, hi = opts.trackers * w // n, opts.trackers * (w + 1) // n
            alo, ahi = opts.agents * w // n, opts.agents * (w + 1) // n
            share = 1 / n
            cfg = WorkerConfig(
                worker=w,
                seed=opts.seed,
                targets=opts.targets,
                projects=opts.projects,
                api_key=opts.api_key,
                first=lo,
                trackers=hi - lo,
                agents=ahi - alo,
                # Agents bind source addresses after the trackers' ones.
                first_agent=opts.trackers + alo,
                ramp=opts.ramp * share,
                heartbeat=opts.heartbeat if heartbeat is None else heartbeat,
                jitter=opts.jitter,
                reloads=opts.reloads * share,
                tabs=opts.tabs * share,
                drops=opts.drops * share,
                ends=opts.ends * share,
                updates=opts.updates * share,
                grace=opts.grace,
                connect_timeout=opts.connect_timeout,
                deadline=deadline,
                agent_filters=AGENT_FILTERS,
                probe_interval=probe,
                agent_ordinal=alo,
                project_weights=opts.project_weights,
                per_project=opts.per_project,
                idle=opts.swarm_idle,
            )
            worker = WorkerProcess(await start_child("_worker", msgspec.json.encode(cfg)), cfg)
            self.workers.append(worker)
            reader = asyncio.get_running_loop().create_task(self._read(worker))
            self._readers.add(reader)
            reader.add_done_callback(self._readers.discard)

    async def _read(self, worker: WorkerProcess) -> None:
        decoder = msgspec.json.Decoder(WorkerMessage)
        assert worker.proc.stdout is not None
        while line := await worker.proc.stdout.readline():
            msg = decoder.decode(line)
            if isinstance(msg, Settled):
                worker.settled = msg
                worker.got_settled.set()
                continue
            if isinstance(msg, AgentSets):
                worker.agent_sets.put_nowait(msg)
                continue
            worker.last = msg
            self.ended.update(msg.ended)
            self.latencies.add("connect", msg.connect_ms)
            self.latencies.add("probe", msg.probe_ms)
            self.latencies.add("fanout", msg.fanout_ms)
            self.latencies.add("snapshot", msg.snapshot_ms)

    def totals(self) -> Totals:
        reports = [w.last for w in self.workers if w.last is not None]
        sent: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        events: Counter[str] = Counter()
        live_by: Counter[str] = Counter()
        starting_by: Counter[str] = Counter()
        for r in reports:
            sent.update(r.sent)
            errors.update(r.errors)
            events.update(r.agent_events)
            live_by.update(r.live_by)
            starting_by.update(r.starting_by)
        return Totals(
            connected=sum(r.connected for r in reports),
            live=sum(r.live for r in reports),
            starting=sum(r.starting for r in reports),
            ramped=len(reports) == len(self.workers) and all(r.ramped for r in reports),
            sent=sent,
            received=sum(r.received for r in reports),
            errors=errors,
            agents_open=sum(r.agents_open for r in reports),
            agent_events=events,
            backlog=sum(r.backlog for r in reports),
            live_by=live_by,
            starting_by=starting_by,
        )

    def samples(self) -> list[tuple[int, str, str]]:
        """(target, project, sessionID) of live sessions each worker sampled in its last report."""
        return [s for w in self.workers if w.last is not None for s in w.last.sample]

    def first_connect_at(self) -> float:
        """Wall clock of the swarm's first connect attempt, 0 before any."""
        return min(
            (w.last.first_connect_at for w in self.workers if w.last and w.last.first_connect_at), default=0
        )

    def exited(self) -> bool:
        return any(w.proc.returncode is not None for w in self.workers)

    def set_rate(self, rate: float) -> None:
        """Ingest: heartbeats per second over the whole swarm."""
        for w in self.workers:
            w.send({"cmd": "rate", "value": rate / len(self.workers)})

    async def settle(self) -> list[Settled]:
        """Churn stops; each worker says which sessions the hub must hold (60 s at most)."""
        for w in self.workers:
            w.send({"cmd": "settle"})
        waits = [asyncio.wait_for(w.got_settled.wait(), 60) for w in self.workers]
        await asyncio.gather(*waits, return_exceptions=True)
        return [w.settled for w in self.workers if w.settled is not None]

    async def agent_sets(self) -> list[tuple[int, int, str, set[str]]]:
        """Per whole-project agent (--projects-zipf): (ordinal, target, project, sessions it holds live)."""
        for w in self.workers:
            while not w.agent_sets.empty():
                w.agent_sets.get_nowait()
            w.send({"cmd": "agents"})
        out: list[tuple[int, int, str, set[str]]] = []
        for w in self.workers:
            try:
                msg = await asyncio.wait_for(w.agent_sets.get(), 30)
            except TimeoutError:
                continue
            out += [(n, target, project, set(ids)) for n, target, project, ids in msg.agents]
        return out

    async def stop(self) -> None:
        """The workers end their sessions and exit; killed after 15 s."""
        for w in self.workers:
            w.send({"cmd": "stop"})
            if w.proc.stdin is not None:
                w.proc.stdin.close()
        for w in self.workers:
            try:
                await asyncio.wait_for(w.proc.wait(), 15)
            except TimeoutError:
                w.proc.kill()
                await w.proc.wait()

    def kill(self) -> None:
        for w in self.workers:
            if w.proc.returncode is None:
                w.proc.kill()
