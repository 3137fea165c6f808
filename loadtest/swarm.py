"""A swarm worker process: holds trackers and agents, reports what it sees.

``python -m loadtest _worker`` reads one ``WorkerConfig`` line on stdin, then
commands (``rate``, ``settle``, ``stop``); it writes ``Report`` lines and one
``Settled`` line on stdout. It stops by itself at its deadline or when stdin
closes (the orchestrator is gone). No task per connection: a timing wheel
sends heartbeats, churn is drawn per tick, and the connections are callbacks.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import itertools
import os
import random
import sys
import time
from collections import Counter
from typing import Any, Final, TypeVar

import msgspec

from .client import HandshakeError, WsConn, frame, ws_connect

SLOT: Final = 0.05  # seconds per heartbeat-wheel slot
# Connections per source address. Of the ~28k ephemeral ports, Linux's connect() tries the even
# half first (~14k) and scans the whole range when those are taken: with 20k connections from one
# address to one port (--workers: every tracker to one port) the swarm spent ~3/4 of its CPU in the
# kernel searching ports, and connects timed out. 10k stays inside the even half.
PER_SOURCE: Final = 10_000
OS_NAMES: Final = ("Windows", "Mac OS X", "Linux", "iOS", "Android")
BROWSERS: Final = ("Chrome", "Firefox", "Safari", "Edge")
COUNTRIES: Final = ("FR", "DE", "US", "GB", "JP", "BR", "IN")
PLANS: Final = ("free", "pro", "enterprise")


class WorkerConfig(msgspec.Struct):
    worker: int
    seed: int
    targets: list[str]
    projects: list[str]
    api_key: str
    first: int  # global index of this worker's first tracker
    trackers: int
    agents: int = 0
    first_agent: int = 0
    agent_ordinal: int = 0  # this worker's first agent among the swarm's agents
    ramp: float = 0.0  # tracker connects per second for this worker; 0 = all at once
    heartbeat: float = 30.0  # seconds; 0 = no scheduled heartbeats (ingest drives them)
    jitter: float = 0.2
    # Churn: events per second for this worker.
    reloads: float = 0.0
    tabs: float = 0.0
    drops: float = 0.0
    ends: float = 0.0
    updates: float = 0.0
    grace: float = 30.0
    report_interval: float = 0.5
    connect_timeout: float = 10.0
    deadline: float = 120.0  # seconds from start: the worker stops by itself then
    agent_filters: list[list[dict[str, Any]]] = []
    probe_interval: float = 0.0  # ingest: seconds between start round trips
    # --projects-zipf: the projects' shares (a tracker's project is drawn from them by its index),
    # live and starting counts reported per project, agents spread over every project (each
    # project's agents take the filters in turn, the first the whole project) with "batch": true.
    project_weights: list[float] = []
    per_project: bool = False
    idle: bool = False  # --swarm-idle


class Report(msgspec.Struct, tag="report"):
    worker: int
    t: float
    connected: int
    live: int
    starting: int
    ramped: bool
    sent: dict[str, int]
    received: int
    errors: dict[str, int]
    connect_ms: list[float]
    probe_ms: list[float]
    fanout_ms: list[float]
    snapshot_ms: list[float]
    agents_open: int
    agent_events: dict[str, int]
    backlog: int
    sample: list[tuple[int, str, str]]
    ended: list[str]  # sessions ended by churn since the last report
    first_connect_at: float  # wall clock of the first connect attempt (0 = none yet)
    # With per_project: live sessions ("target:project" → count) and starts in flight likewise.
    live_by: dict[str, int] = {}
    starting_by: dict[str, int] = {}


class Settled(msgspec.Struct, tag="settled"):
    worker: int
    ids: list[tuple[int, str, str]]  # (target index, project key, sessionID)
    transitional: int  # trackers still connecting or restarting when settling gave up


class AgentSets(msgspec.Struct, tag="agent_sets"):
    """Per whole-project agent (per_project): the sessions its snapshot and stream say are live."""

    worker: int
    agents: list[tuple[int, int, str, list[str]]]  # (agent ordinal, target index, project, sessionIDs)


WorkerMessage = Report | Settled | AgentSets


class Reply(msgspec.Struct):
    type: str
    code: str | None = None


class AgentMessage(msgspec.Struct):
    type: str
    sessions: list[dict[str, Any]] | None = None
    session: dict[str, Any] | None = None
    changes: dict[str, Any] | None = None
    sessionID: str | None = None


T = TypeVar("T")

_reply = msgspec.json.Decoder(Reply)
_agent_msg = msgspec.json.Decoder(AgentMessage)
_encode = msgspec.json.Encoder().encode

# Tracker states.
IDLE, CONNECTING, STARTING, LIVE, DOWN, DONE = range(6)


def error_name(exc: BaseException) -> str:
    if isinstance(exc, HandshakeError):
        return f"http_{exc.status}"
    if isinstance(exc, TimeoutError):
        return "connect_timeout"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, type(exc).__name__)
    return type(exc).__name__


def source_address(index: int) -> str:
    """Connection ``index`` of the swarm binds 127.0.0.(1 + index // PER_SOURCE)."""
    return f"127.0.0.{1 + index // PER_SOURCE}"


GOLDEN: Final = 0.6180339887498949


def weighted_project(index: int, cumulative: list[float]) -> int:
    """Tracker ``index``'s project: its golden-ratio point in the projects' cumulative shares.

    The points ``index * GOLDEN mod 1`` fill [0, 1) evenly, so any run of consecutive
    indexes (a worker's share, the first n trackers) splits over the projects as the shares do.
    """
    return min(bisect.bisect_right(cumulative, (index * GOLDEN) % 1.0), len(cumulative) - 1)


class Tracker:
    """One simulated browser session: its main connection and its churn."""

    __slots__ = (
        "conn", "counted", "due", "gen", "idx", "lost_at", "probing", "project", "sid", "state", "t0", "w",
    )  # fmt: skip

    def __init__(self, w: Worker, idx: int) -> None:
        self.w = w
        self.idx = idx
        projects = w.cfg.projects
        if w.cumulative:
            self.project = projects[weighted_project(idx, w.cumulative)]
        else:
            self.project = projects[idx % len(projects)] if projects else ""
        self.gen = 0
        self.sid = f"lt{w.cfg.seed}-{idx}-0"
        self.conn: WsConn | None = None
        self.state = IDLE
        self.counted = False  # the swarm believes the hub holds this session
        self.due = 0  # heartbeat-wheel slot, 0 = not scheduled
        self.t0 = 0.0
        self.lost_at = 0.0
        self.probing = False

    @property
    def target(self) -> int:
        return self.idx % len(self.w.cfg.targets)

    def start_frame(self) -> bytes:
        i = self.idx
        return frame(
            _encode(
                {
                    "type": "start",
                    "sessionID": self.sid,
                    "userID": f"user{i % 5000}@example.com",
                    "userUUID": f"uuid-{i}",
                    "metadata": {"plan": PLANS[i % 3], "ltT": str(int(time.time() * 1000))},
                    "userProperties": {"visits": i % 10},
                    "pageTitle": f"Page {i % 50}",
                    "url": f"https://shop.example.com/p/{i % 50}",
                    "referrer": "https://www.google.com/",
                    "trackerVersion": "16.0.0",
                    "userOs": OS_NAMES[i % 5],
                    "userBrowser": BROWSERS[i % 4],
                    "userBrowserVersion": "120.0",
                    "userDevice": "",
                    "userDeviceType": "desktop" if i % 3 else "mobile",
                    "userCountry": COUNTRIES[i % 7],
                    "userCity": "Paris",
                    "language": "en-US",
                }
            )
        )

    # Connection events -----------------------------------------------------

    def on_open(self, conn: WsConn) -> None:
        self.conn = conn
        self.state = STARTING
        self.w.starting += 1
        conn.write(self.start_frame())
        self.w.sent["start"] += 1

    def on_message(self, conn: WsConn, data: bytes) -> None:
        w = self.w
        reply = w.receive(_reply, data, "bad_frame")
        if reply is None:
            return
        if reply.type == "started":
            if self.state == STARTING:
                w.starting -= 1
                w.connect_ms.append((time.perf_counter() - self.t0) * 1000)
                self.state = LIVE
                if not self.counted:
                    self.counted = True
                    w.live += 1
                w.schedule(self)
            elif self.probing:
                self.probing = False
                w.probe_ms.append((time.perf_counter() - self.t0) * 1000)
        elif reply.type == "error":
            w.errors[f"error_{reply.code}"] += 1

    def on_close(self, conn: WsConn, code: int | None, opened: bool) -> None:
        if conn is not self.conn:
            return  # a connection this tracker let go of on purpose
        self.conn = None
        if self.state == STARTING:
            self.w.starting -= 1
        if self.w.stopping:
            self.state = DONE
            return
        self.w.errors[f"closed_{code}" if code is not None else "closed_abruptly"] += 1
        self.lost(1.0)

    # Actions -----------------------------------------------------------------

    def lost(self, retry_in: float) -> None:
        """The connection is gone: the hub keeps the session for its grace; come back before."""
        self.state = DOWN
        self.lost_at = time.monotonic()
        self.w.loop.call_later(retry_in, self.w.connect, self)

    def drop(self, how: str) -> None:
        conn, self.conn = self.conn, None
        assert conn is not None
        if how == "reload":
            conn.close(1001)  # a browser navigating away says "going away"
            self.state = DOWN
            self.lost_at = time.monotonic()
            self.w.connect(self)
        else:  # network loss: no close frame, back within the grace
            conn.abort()
            self.lost(random.uniform(0.2, max(0.3, min(5.0, self.w.cfg.grace / 2))))

    def end_and_restart(self) -> None:
        conn = self.conn
        assert conn is not None
        conn.write(END)
        self.w.sent["end"] += 1
        self.w.ended.append(self.sid)
        self.counted = False
        self.w.live -= 1
        self.gen += 1
        self.sid = f"lt{self.w.cfg.seed}-{self.idx}-{self.gen}"
        self.t0 = time.perf_counter()
        self.on_open(conn)

    def update(self) -> None:
        assert self.conn is not None
        page = random.randrange(50)
        self.conn.send(
            _encode(
                {
                    "type": "update",
                    "pageTitle": f"Page {page}",
                    "url": f"https://shop.example.com/p/{page}",
                    "metadata": {"ltT": str(int(time.time() * 1000))},
                }
            )
        )
        self.w.sent["update"] += 1

    def probe(self) -> None:
        """A repeated start is answered: its round trip shows whether the server keeps up."""
        assert self.conn is not None
        self.probing = True
        self.t0 = time.perf_counter()
        self.conn.send(_encode({"type": "start", "sessionID": self.sid}))
        self.w.sent["probe"] += 1


class Tab:
    """A second tab of a live session: starts the same sessionID, closes a few seconds later."""

    __slots__ = ("conn", "tracker")

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.conn: WsConn | None = None

    def on_open(self, conn: WsConn) -> None:
        self.conn = conn
        conn.send(_encode({"type": "start", "sessionID": self.tracker.sid}))
        self.tracker.w.sent["tab"] += 1

    def on_message(self, conn: WsConn, data: bytes) -> None:
        reply = self.tracker.w.receive(_reply, data, "tab_bad_frame")
        if reply is not None and reply.type == "started":
            self.tracker.w.loop.call_later(random.uniform(1.0, 5.0), conn.close, 1001)

    def on_close(self, conn: WsConn, code: int | None, opened: bool) -> None:
        self.tracker.w.tabs_open -= 1


class Agent:
    """An assist agent: subscribes with filters, counts the stream, times the fan-out."""

    __slots__ = ("batch", "conn", "filters", "idx", "live", "n", "project", "snapshot", "t0", "target", "w")

    def __init__(
        self, w: Worker, idx: int, filters: list[dict[str, Any]], n: int = 0, project: str | None = None
    ) -> None:
        self.w = w
        self.idx = idx  # its connection's index (source address)
        self.n = n  # its ordinal among the swarm's agents
        self.filters = filters
        self.target = idx % len(w.cfg.targets) if w.cfg.targets else 0
        self.project = project if project is not None else w.cfg.projects[idx % len(w.cfg.projects)]
        self.batch = w.cfg.per_project
        # A whole-project agent (per_project) keeps the sessions it is told are live.
        self.live: set[str] | None = set() if w.cfg.per_project and not filters else None
        self.conn: WsConn | None = None
        self.t0 = 0.0
        self.snapshot = False

    def on_open(self, conn: WsConn) -> None:
        self.conn = conn
        self.w.agents_open += 1
        self.t0 = time.perf_counter()
        subscribe: dict[str, Any] = {"type": "subscribe", "filters": self.filters}
        if self.batch:
            subscribe["batch"] = True
        conn.send(_encode(subscribe))
        self.w.sent["subscribe"] += 1

    def on_message(self, conn: WsConn, data: bytes) -> None:
        w = self.w
        msg = w.receive(_agent_msg, data, "agent_bad_frame")
        if msg is None:
            return
        w.agent_events[msg.type] += 1
        now = time.time() * 1000
        live = self.live
        if live is not None:
            if msg.type == "snapshot":
                live.clear()
                live.update(s["sessionID"] for s in msg.sessions or ())
            elif msg.type == "session.start" and msg.session is not None:
                live.add(msg.session["sessionID"])
            elif msg.type == "session.end" and msg.sessionID is not None:
                live.discard(msg.sessionID)
        if msg.type == "snapshot":
            w.snapshot_ms.append((time.perf_counter() - self.t0) * 1000)
            w.agent_events["snapshot_sessions"] += len(msg.sessions or ())
        elif msg.type == "error":
            w.errors["agent_error"] += 1
        sent_at = None
        if msg.session is not None:
            sent_at = (msg.session.get("metadata") or {}).get("ltT")
        elif msg.changes is not None and isinstance(msg.changes.get("metadata"), dict):
            sent_at = msg.changes["metadata"].get("ltT")
        if sent_at is not None:
            w.fanout_ms.append(now - float(sent_at))

    def on_close(self, conn: WsConn, code: int | None, opened: bool) -> None:
        if self.conn is conn:
            self.conn = None
            self.w.agents_open -= 1
            if not self.w.stopping:
                self.w.errors[f"agent_closed_{code}"] += 1


END: Final = frame(b'{"type":"end"}')


class Worker:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        random.seed(cfg.seed * 1000 + cfg.worker)
        self.cumulative = list(itertools.accumulate(cfg.project_weights)) if cfg.project_weights else []
        self.trackers = [Tracker(self, cfg.first + i) for i in range(cfg.trackers)]
        if cfg.per_project:
            # Agent n follows project n % P with filter (n // P) % F: a few on every project.
            p, f = len(cfg.projects), max(1, len(cfg.agent_filters))
            self.agents = [
                Agent(
                    self,
                    cfg.first_agent + i,
                    cfg.agent_filters[(n // p) % f] if cfg.agent_filters else [],
                    n=n,
                    project=cfg.projects[n % p],
                )
                for i, n in enumerate(range(cfg.agent_ordinal, cfg.agent_ordinal + cfg.agents))
            ]
        else:
            filters = cfg.agent_filters
            self.agents = [
                Agent(self, cfg.first_agent + i, random.choice(filters) if filters else [])
                for i in range(cfg.agents)
            ]
        self.wheel: dict[int, list[Tracker]] = {}
        self.live = 0
        self.starting = 0
        self.tabs_open = 0
        self.agents_open = 0
        self.attempted = 0
        self.received = 0
        self.sent: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.agent_events: Counter[str] = Counter()
        self.connect_ms: list[float] = []
        self.probe_ms: list[float] = []
        self.fanout_ms: list[float] = []
        self.snapshot_ms: list[float] = []
        self.ended: list[str] = []
        self.first_connect_at = 0.0
        self.churn = True
        self.stopping = False
        self.rate = 0.0  # ingest heartbeats per second
        self.hb = frame(b'{"type":"heartbeat"}')
        self.done = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    def receive(self, decoder: msgspec.json.Decoder[T], data: bytes, bad: str) -> T | None:
        """A frame from the hub, counted and decoded; one that does not decode is counted as ``bad``."""
        self.received += 1
        try:
            return decoder.decode(data)
        except msgspec.DecodeError:  # ValidationError too
            self.errors[bad] += 1
            return None

    # Connections -----------------------------------------------------------

    def connect(self, tracker: Tracker) -> None:
        if self.stopping or tracker.state in (CONNECTING, STARTING, LIVE):
            return
        tracker.state = CONNECTING
        self.spawn(self._connect(tracker))

    def spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self, tracker: Tracker) -> None:
        first = tracker.gen == 0 and not tracker.counted and tracker.lost_at == 0.0
        tracker.t0 = time.perf_counter()
        if not self.first_connect_at:
            self.first_connect_at = time.time()
        try:
            await ws_connect(
                self.cfg.targets[tracker.target],
                f"/ws/tracker/{tracker.project}",
                tracker,
                source=source_address(tracker.idx),
                timeout=self.cfg.connect_timeout,
            )
        except (OSError, HandshakeError, TimeoutError) as exc:
            self.errors[error_name(exc)] += 1
            if tracker.lost_at == 0.0:
                tracker.lost_at = time.monotonic()
            if tracker.counted and time.monotonic() - tracker.lost_at > self.cfg.grace:
                # Past its grace the hub has ended the session: stop believing in it.
                tracker.counted = False
                self.live -= 1
            tracker.state = DOWN
            if not self.stopping:
                self.loop.call_later(random.uniform(1.0, 2.0), self.connect, tracker)
        finally:
            if first:
                self.attempted += 1

    async def _connect_agent(self, agent: Agent) -> None:
        try:
            await ws_connect(
                self.cfg.targets[agent.target],
                f"/ws/agent/{agent.project}",
                agent,
                source=source_address(agent.idx),
                headers=[("Authorization", f"Bearer {self.cfg.api_key}")],
                timeout=self.cfg.connect_timeout,
            )
        except (OSError, HandshakeError, TimeoutError) as exc:
            self.errors[f"agent_{error_name(exc)}"] += 1

    async def ramp(self) -> None:
        for agent in self.agents:
            self.spawn(self._connect_agent(agent))
        start = time.monotonic()
        for n, tracker in enumerate(self.trackers):
            if self.stopping:
                return
            if self.cfg.ramp > 0:
                delay = start + n / self.cfg.ramp - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            self.connect(tracker)

    # Heartbeats and churn ---------------------------------------------------

    def schedule(self, tracker: Tracker) -> None:
        if self.cfg.heartbeat <= 0 or tracker.due:
            return
        j = self.cfg.jitter
        due = time.monotonic() + self.cfg.heartbeat * random.uniform(1 - j, 1 + j)
        tracker.due = int(due / SLOT)
        self.wheel.setdefault(tracker.due, []).append(tracker)

    def heartbeats(self, now: float) -> None:
        current = int(now / SLOT)
        for slot in [s for s in self.wheel if s <= current]:
            for tracker in self.wheel.pop(slot):
                if tracker.due != slot:
                    continue
                tracker.due = 0
                if tracker.state == LIVE and tracker.conn is not None and tracker.conn.open:
                    tracker.conn.write(self.hb)
                    self.sent["heartbeat"] += 1
                    self.schedule(tracker)

    def live_tracker(self) -> Tracker | None:
        tracker = random.choice(self.trackers) if self.trackers else None
        if tracker is None or tracker.state != LIVE or tracker.conn is None or not tracker.conn.open:
            return None
        return tracker

    def churn_tick(self, dt: float, acc: dict[str, float]) -> None:
        cfg = self.cfg
        for kind, rate in (
            ("reload", cfg.reloads),
            ("tab", cfg.tabs),
            ("drop", cfg.drops),
            ("end", cfg.ends),
            ("update", cfg.updates),
        ):
            if rate <= 0:
                continue
            acc[kind] = acc.get(kind, 0.0) + rate * dt
            while acc[kind] >= 1.0:
                acc[kind] -= 1.0
                tracker = self.live_tracker()
                if tracker is None:
                    self.sent[f"{kind}_skipped"] += 1
                    continue
                self.sent[f"churn_{kind}"] += 1
                if kind in ("reload", "drop"):
                    tracker.drop(kind)
                elif kind == "end":
                    tracker.end_and_restart()
                elif kind == "update":
                    tracker.update()
                else:
                    self.tabs_open += 1
                    self.spawn(self._open_tab(tracker))

    async def _open_tab(self, tracker: Tracker) -> None:
        try:
            await ws_connect(
                self.cfg.targets[tracker.target],
                f"/ws/tracker/{tracker.project}",
                Tab(tracker),
                source=source_address(tracker.idx),
                timeout=self.cfg.connect_timeout,
            )
        except (OSError, HandshakeError, TimeoutError) as exc:
            self.errors[f"tab_{error_name(exc)}"] += 1
            self.tabs_open -= 1

    def ingest_tick(self, dt: float, state: dict[str, Any]) -> None:
        """Send ``rate`` heartbeats per second, round-robin over the live trackers."""
        state["acc"] = state.get("acc", 0.0) + self.rate * dt
        n = int(state["acc"])
        if n <= 0:
            return
        state["acc"] -= n
        trackers = self.trackers
        pos = state.get("pos", 0)
        hb = self.hb
        sent = 0
        for _ in range(min(n, len(trackers) * 4)):
            pos = (pos + 1) % len(trackers)
            conn = trackers[pos].conn
            if conn is not None and trackers[pos].state == LIVE:
                conn.write(hb)
                sent += 1
        state["pos"] = pos
        self.sent["heartbeat"] += sent
        if self.cfg.probe_interval > 0 and time.monotonic() >= state.get("probe_at", 0.0):
            state["probe_at"] = time.monotonic() + self.cfg.probe_interval
            tracker = self.live_tracker()
            if tracker is not None and not tracker.probing:
                tracker.probe()

    async def ticker(self) -> None:
        interval = 0.005 if self.cfg.heartbeat <= 0 else 0.02
        last = time.monotonic()
        acc: dict[str, float] = {}
        ingest: dict[str, Any] = {}
        while not self.stopping:
            await asyncio.sleep(interval)
            now = time.monotonic()
            dt, last = now - last, now
            self.heartbeats(now)
            if self.churn:
                self.churn_tick(dt, acc)
            if self.rate > 0:
                self.ingest_tick(dt, ingest)

    # Reports and commands ---------------------------------------------------

    def emit(self, msg: WorkerMessage) -> None:
        sys.stdout.buffer.write(msgspec.json.encode(msg) + b"\n")
        sys.stdout.buffer.flush()

    def report(self) -> Report:
        live = [t for t in random.sample(self.trackers, min(20, len(self.trackers))) if t.state == LIVE]
        live_by: Counter[str] = Counter()
        starting_by: Counter[str] = Counter()
        if self.cfg.per_project:
            for t in self.trackers:
                if t.counted:
                    live_by[f"{t.target}:{t.project}"] += 1
                if t.state == STARTING:
                    starting_by[f"{t.target}:{t.project}"] += 1
        report = Report(
            worker=self.cfg.worker,
            t=time.time(),
            connected=sum(1 for t in self.trackers if t.state in (STARTING, LIVE)),
            live=self.live,
            starting=self.starting,
            ramped=self.attempted >= len(self.trackers),
            sent=dict(self.sent),
            received=self.received,
            errors=dict(self.errors),
            connect_ms=self.connect_ms,
            probe_ms=self.probe_ms,
            fanout_ms=self.fanout_ms,
            snapshot_ms=self.snapshot_ms,
            agents_open=self.agents_open,
            agent_events=dict(self.agent_events),
            backlog=sum(t.conn.backlog() for t in self.trackers if t.conn is not None),
            sample=[(t.target, t.project, t.sid) for t in live],
            ended=self.ended,
            first_connect_at=self.first_connect_at,
            live_by=dict(live_by),
            starting_by=dict(starting_by),
        )
        self.connect_ms, self.probe_ms, self.fanout_ms, self.snapshot_ms, self.ended = [], [], [], [], []
        return report

    async def reporter(self) -> None:
        while not self.stopping:
            self.emit(self.report())
            await asyncio.sleep(self.cfg.report_interval)

    async def settle(self) -> None:
        """Stop churn, let transitions finish (bounded), then say which sessions the hub must hold."""
        self.churn = False
        deadline = time.monotonic() + max(10.0, self.cfg.connect_timeout + 3)
        while time.monotonic() < deadline and (
            self.starting or self.tabs_open or any(t.state in (CONNECTING, DOWN) for t in self.trackers)
        ):
            await asyncio.sleep(0.05)
        transitional = sum(1 for t in self.trackers if t.state != LIVE)
        ids = [(t.target, t.project, t.sid) for t in self.trackers if t.counted]
        self.emit(self.report())
        self.emit(Settled(worker=self.cfg.worker, ids=ids, transitional=transitional))

    async def stop(self) -> None:
        """End every session (so the next run starts clean) and close every connection."""
        if self.stopping:
            return
        self.stopping = True
        for tracker in self.trackers:
            conn = tracker.conn
            if conn is not None and conn.open:
                conn.write(END)
                conn.close(1000)
        for agent in self.agents:
            if agent.conn is not None:
                agent.conn.close(1000)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(t.conn is not None for t in self.trackers):
            await asyncio.sleep(0.05)
        for tracker in self.trackers:
            if tracker.conn is not None:
                tracker.conn.abort()
        for agent in self.agents:
            if agent.conn is not None:
                agent.conn.abort()
        self.done.set()

    async def commands(self) -> None:
        reader = asyncio.StreamReader(limit=1 << 20)
        await self.loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                break  # the orchestrator is gone
            cmd = msgspec.json.decode(line)
            if cmd.get("cmd") == "rate":
                self.rate = float(cmd["value"])
            elif cmd.get("cmd") == "settle":
                self.spawn(self.settle())
            elif cmd.get("cmd") == "agents":
                sets = [(a.n, a.target, a.project, sorted(a.live)) for a in self.agents if a.live is not None]
                self.emit(AgentSets(worker=self.cfg.worker, agents=sets))
            elif cmd.get("cmd") == "stop":
                break
        await self.stop()

    async def run(self) -> None:
        for coro in (self.ramp(), self.ticker(), self.reporter(), self.commands()):
            self.spawn(coro)
        try:
            await asyncio.wait_for(self.done.wait(), self.cfg.deadline)
        except TimeoutError:
            await self.stop()
        self.emit(self.report())


async def serve() -> None:
    """``python -m loadtest _worker`` (run by ``__main__``)."""
    line = sys.stdin.buffer.readline()
    cfg = msgspec.json.decode(line, type=WorkerConfig)
    if cfg.idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    await Worker(cfg).run()
