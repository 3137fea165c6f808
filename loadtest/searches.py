"""Searches over HTTP: the connections the checks and the search load share, and the search load.

``HubSearch`` keeps a few keep-alive connections per target. ``SearchLoad``
sends a query mix at ``--qps``, open loop: a search's latency counts from
when it was due, so a slow hub cannot slow the load down.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from typing import Any, Final

from .client import HttpClient
from .options import Options
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


class SearchLoad:
    """``--qps`` searches of the query mix over random targets and projects, until stopped."""

    def __init__(self, api: HubSearch, opts: Options, latencies: Latencies) -> None:
        self.api = api
        self.qps = opts.qps
        self.fresh = opts.fresh_searches
        self.targets = len(opts.targets)
        self.projects = opts.projects
        self.latencies = latencies
        self.by_kind: dict[str, list[float]] = {}
        self.by_project: dict[str, list[float]] = {}
        self.errors: Counter[str] = Counter()
        self.stopping = False
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        """No new search; the ones under way get 10 s to finish."""
        self.stopping = True
        if self.task is not None:
            await self.task

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
            task = asyncio.get_running_loop().create_task(self.one(due))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=10)

    async def one(self, due: float) -> None:
        kind, body, query = query_mix()
        target = random.randrange(self.targets)
        project = random.choice(self.projects)
        try:
            _, sent_at = await self.api.timed(target, project, body, query, fresh=self.fresh)
        except Exception as exc:
            self.errors[type(exc).__name__ + ": " + str(exc)[:80]] += 1
            return
        # From the request's write (--fresh-searches: its connect) to its answer; the swarm's own lag
        # before that is kept apart (the orchestrator's loop also reads reports and samples the hub).
        ms = (time.monotonic() - sent_at) * 1000
        self.latencies.add("search_lag", [(sent_at - due) * 1000])
        self.latencies.add("search", [ms])
        self.by_kind.setdefault(kind, []).append(ms)
        self.by_project.setdefault(project, []).append(ms)
