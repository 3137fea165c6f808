"""Searches over HTTP: the connections the checks use, and the search load in a process of its own.

``HubSearch`` keeps a few keep-alive connections per target. ``SearchLoad``
sends a query mix at ``--qps``, open loop: searches are started when due, so
a slow hub cannot slow the load down. It runs in ``python -m loadtest
_searches`` (``SearchProcess`` on the orchestrator's side): a search's answer
is read by a loop that does nothing else, not by the orchestrator's, which
decodes the swarm's reports and samples the hub every second (in one process,
that loop's own stalls were ~9 ms at p99 at 100k trackers, and every search
answered during one counted them as the hub's).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter
from typing import Any, Final

import msgspec

from .client import HttpClient
from .options import Options
from .procs import start_child
from .stats import Latencies

POOL: Final = 8  # keep-alive HTTP connections per target, shared by its projects (at least 2 each)


class HubSearch:
    """``/public/{project}/assist/sessions`` on each target, a pool of connections per target and project.

    A connection serves one project: with ``--workers`` it is handed once to the
    worker that owns the project and stays there, so a check never makes another
    worker mirror the project.
    """

    def __init__(self, targets: list[str], projects: list[str], api_key: str) -> None:
        self.projects = projects
        self.targets = targets
        self.api_key = api_key
        per = max(2, POOL // max(1, len(projects)))
        self.clients: list[HttpClient] = []
        self.pools: dict[tuple[int, str], asyncio.Queue[HttpClient]] = {}
        for t, url in enumerate(targets):
            for project in projects:
                pool: asyncio.Queue[HttpClient] = asyncio.Queue()
                for _ in range(per):
                    client = HttpClient(url, api_key)
                    self.clients.append(client)
                    pool.put_nowait(client)
                self.pools[t, project] = pool

    async def timed(
        self, target: int, project: str, body: dict[str, Any] | None, query: str = "", fresh: bool = False
    ) -> tuple[Any, float]:
        """The answer's ``data`` (a GET without a body) and the monotonic time the request was written.

        ``fresh``: on a new connection, closed after; the time returned is when its connect began.
        """
        path = f"/public/{project}/assist/sessions{query}"
        encoded = None if body is None else json.dumps(body).encode()
        if fresh:
            client = HttpClient(self.targets[target], self.api_key)
            began = time.monotonic()
            try:
                status, payload = await self._request(client, path, encoded)
            finally:
                client.close()
            sent_at = began
        else:
            # A keep-alive connection carries one request at a time: wait for a free one.
            pool = self.pools.get((target, project))
            if pool is None:  # a project the swarm was not told about: the first project's pool
                pool = self.pools[target, self.projects[0]]
            client = await pool.get()
            try:
                status, payload = await self._request(client, path, encoded)
            finally:
                pool.put_nowait(client)
            sent_at = client.sent_at
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {payload[:200]!r}")
        return json.loads(payload)["data"], sent_at

    @staticmethod
    async def _request(client: HttpClient, path: str, body: bytes | None) -> tuple[int, bytes]:
        if body is None:
            return await client.request("GET", path)
        return await client.request("POST", path, body)

    async def search(self, target: int, project: str, body: dict[str, Any]) -> Any:
        data, _ = await self.timed(target, project, body)
        return data

    async def total(self, target: int, project: str) -> int:
        """The hub's total of one project on one target."""
        return int((await self.search(target, project, {"limit": 1}))["total"])

    async def totals(self) -> list[int]:
        """Per target: the hub's total over the swarm's projects."""
        totals = []
        for target in range(len(self.targets)):
            total = 0
            for project in self.projects:
                data = await self.search(target, project, {"limit": 1})
                total += int(data["total"])
            totals.append(total)
        return totals

    def close(self) -> None:
        for client in self.clients:
            client.close()


def query_mix() -> tuple[str, dict[str, Any] | None, str]:
    """A search as a dashboard sends them: (kind, POST body or None for a GET, query string)."""
    r = random.random()
    if r < 0.3:
        return "list", None, ""
    if r < 0.5:
        return "userId", None, f"?userId=user{random.randrange(5000)}@example.com"
    if r < 0.7:
        return (
            "browser+country",
            {
                "filters": [
                    {
                        "name": "userBrowser",
                        "operator": "is",
                        "value": [random.choice(["Chrome", "Firefox"])],
                    },
                    {
                        "name": "userCountry",
                        "operator": "is",
                        "value": [random.choice(["FR", "US", "JP"])],
                    },
                ],
                "limit": 10,
            },
            "",
        )
    if r < 0.85:
        return (
            "metadata+page",
            {
                "filters": [{"name": "plan", "operator": "is", "value": ["pro"]}],
                "sort": "lastActiveAt",
                "page": random.randint(1, 5),
                "limit": 20,
            },
            "",
        )
    return (
        "contains",
        {
            "filters": [
                {"name": "userOs", "operator": "contains", "value": ["win"]},
                {"name": "pageTitle", "operator": "contains", "value": ["page 1"]},
            ]
        },
        "",
    )


class SearchConfig(msgspec.Struct):
    """The search process's one line of configuration."""

    targets: list[str]
    projects: list[str]
    api_key: str
    qps: float
    fresh: bool


class Searched(msgspec.Struct):
    """What the search process saw since its last line: an empty one once it is up, then one a
    second, the last with ``done``."""

    samples: list[tuple[str, str, float, float]]  # kind, project, ms (write or connect to answer), lag ms
    errors: dict[str, int]
    done: bool = False


class SearchLoad:
    """``qps`` searches of the query mix over random targets and projects, until stopped."""

    def __init__(self, api: HubSearch, qps: float, fresh: bool) -> None:
        self.api = api
        self.qps = qps
        self.fresh = fresh
        self.samples: list[tuple[str, str, float, float]] = []  # taken by the reporter
        self.errors: Counter[str] = Counter()
        self.stopping = False

    async def run(self) -> None:
        interval = 1.0 / self.qps
        start = time.monotonic()
        n = 0
        pending: set[asyncio.Task[None]] = set()
        while not self.stopping:
            n += 1
            due = start + n * interval
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.stopping:
                break
            task = asyncio.get_running_loop().create_task(self.one(due))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:  # the ones under way get 10 s to finish
            await asyncio.wait(pending, timeout=10)

    async def one(self, due: float) -> None:
        kind, body, query = query_mix()
        target = random.randrange(len(self.api.targets))
        project = random.choice(self.api.projects)
        try:
            _, sent_at = await self.api.timed(target, project, body, query, fresh=self.fresh)
        except Exception as exc:
            self.errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
            return
        # From the request's write (--fresh-searches: its connect) to its answer; this loop's own
        # lag before that is kept apart.
        ms = (time.monotonic() - sent_at) * 1000
        self.samples.append((kind, project, ms, (sent_at - due) * 1000))

    def take(self, done: bool = False) -> Searched:
        samples, self.samples = self.samples, []
        return Searched(samples=samples, errors=dict(self.errors), done=done)


class SearchProcess:
    """The orchestrator's side of the search process: ``open``, ``start``, ``stop``, ``kill``.

    Its lines go into ``latencies`` (``search``, ``search_lag``) as they come, and
    into ``by_kind``, ``by_project`` and ``errors`` for the result.
    """

    def __init__(self, opts: Options, latencies: Latencies) -> None:
        self.cfg = SearchConfig(
            targets=opts.targets,
            projects=opts.projects,
            api_key=opts.api_key,
            qps=opts.qps,
            fresh=opts.fresh_searches,
        )
        self.latencies = latencies
        self.by_kind: dict[str, list[float]] = {}
        self.by_project: dict[str, list[float]] = {}
        self.errors: Counter[str] = Counter()
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.Task[None] | None = None
        self.up = asyncio.Event()
        self.done = asyncio.Event()
        self.started = False

    async def open(self) -> None:
        """The process, up and configured, before the search window: its start is not in the window."""
        self.proc = await start_child("_searches", msgspec.json.encode(self.cfg))
        self.reader = asyncio.get_running_loop().create_task(self._read())
        # Otherwise its interpreter's start-up and imports would be in the window.
        try:
            await asyncio.wait_for(self.up.wait(), 60)
        except TimeoutError:
            self.errors["search process: not up in 60 s"] += 1

    def start(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.started = True
        self.proc.stdin.write(b"go\n")

    async def stop(self) -> None:
        """No new search; the ones under way get 10 s to finish, and their samples are read."""
        if self.proc is None or self.proc.returncode is not None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stop\n")
        self.proc.stdin.close()
        if self.started:
            try:
                await asyncio.wait_for(self.done.wait(), 15)
            except TimeoutError:
                self.errors["search process: no last report in 15 s"] += 1
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        decoder = msgspec.json.Decoder(Searched)
        while line := await self.proc.stdout.readline():
            msg = decoder.decode(line)
            self.latencies.add("search", [ms for _, _, ms, _ in msg.samples])
            self.latencies.add("search_lag", [lag for _, _, _, lag in msg.samples])
            for kind, project, ms, _ in msg.samples:
                self.by_kind.setdefault(kind, []).append(ms)
                self.by_project.setdefault(project, []).append(ms)
            self.errors = Counter(msg.errors)
            self.up.set()
            if msg.done:
                self.done.set()


async def serve() -> None:
    """``python -m loadtest _searches`` (run by ``__main__``): a ``SearchConfig`` line, then ``go``
    and ``stop`` (or EOF)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    cfg = msgspec.json.decode(await reader.readline(), type=SearchConfig)
    api = HubSearch(cfg.targets, cfg.projects, cfg.api_key)
    load = SearchLoad(api, cfg.qps, cfg.fresh)
    encoder = msgspec.json.Encoder()

    def emit(msg: Searched) -> None:
        sys.stdout.buffer.write(encoder.encode(msg) + b"\n")
        sys.stdout.buffer.flush()

    emit(load.take())  # up
    if (await reader.readline()).strip() != b"go":
        return  # stopped (or the orchestrator gone) before the window
    running = loop.create_task(load.run())

    async def report() -> None:
        while True:
            await asyncio.sleep(1.0)
            emit(load.take())

    reporter = loop.create_task(report())
    await reader.readline()  # "stop", or EOF: the orchestrator is gone
    load.stopping = True
    await running
    reporter.cancel()
    emit(load.take(done=True))
    api.close()
