"""A hub process: the live index, its endpoints and its long-lived work.

Long-lived work (the sweeper, signal handling, drain) runs in one anyio
task group; connections themselves have no task.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from typing import Any

import anyio
from anyio.abc import TaskStatus

from .config import Settings
from .http_api import HttpApi, Request, Response, error
from .index import LiveIndex
from .server import CLOSE_RESTART, Connection, Endpoint, Server, now_ms
from .sessions import Registry
from .tracker import TrackerProtocol

log = logging.getLogger("hub")

TRACKER_PREFIX = "/ws/tracker/"


class TrackerEndpoint(TrackerProtocol):
    """The tracker protocol on a live connection."""

    __slots__ = ("idle_timeout",)

    def __init__(self, registry: Registry, project_key: str, project_id: int, idle_timeout: float) -> None:
        super().__init__(registry, project_key, project_id)
        self.idle_timeout: float | None = idle_timeout

    def writable(self) -> None:
        """Trackers only get replies; nothing is queued."""


class Hub:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.index = LiveIndex()
        self.registry = Registry(self.index, grace_ms=int(settings.grace * 1000))
        self.ready = False
        self.draining = False
        self.api = HttpApi(settings, self.index, ready=lambda: self.ready and not self.draining)
        self.server = Server(settings, self.api, self.route_ws)
        self._stop = anyio.Event()
        # Set once the hub listens; ``port`` is then the bound port.
        self.listening = anyio.Event()
        self.port = 0

    def route_ws(self, request: Request, conn: Connection) -> Endpoint | Response:
        if self.draining:
            return error(503, "the hub is draining; reconnect elsewhere")
        path = request.path
        if path.startswith(TRACKER_PREFIX):
            project_key = path[len(TRACKER_PREFIX) :]
            project_id = self.settings.project_id(project_key)
            if project_id is None:
                return error(404, "project not found")
            return TrackerEndpoint(self.registry, project_key, project_id, self.settings.heartbeat_timeout)
        return error(404, "not found")

    async def serve(
        self,
        sock: socket.socket | None = None,
        *,
        handle_signals: bool = True,
        task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until ``stop()`` (or SIGTERM/SIGINT with ``handle_signals``), then drain."""
        await self.server.start(sock)
        self.port = self.server.port
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._sweeper)
            if handle_signals:
                tg.start_soon(self._signals)
            self.ready = True
            log.info("listening on %s:%d", self.settings.host, self.port)
            self.listening.set()
            task_status.started(self.port)
            await self._stop.wait()
            await self._drain()
            tg.cancel_scope.cancel()

    def stop(self) -> None:
        self._stop.set()

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: draining", signal.Signals(signum).name)
                self.stop()
                return

    async def _drain(self) -> None:
        self.draining = True
        self.server.stop_accepting()
        self.server.close_all(CLOSE_RESTART, "hub restarting")
        await self.server.wait_closed(timeout=5.0)

    async def _sweeper(self) -> None:
        interval = self.settings.sweep_interval
        while True:
            await anyio.sleep(interval)
            self.sweep()

    def sweep(self) -> None:
        self.server.sweep()
        self.registry.sweep(now_ms())


def run(settings: Settings, **backend: Any) -> None:
    hub = Hub(settings)
    started = time.monotonic()
    anyio.run(hub.serve, backend="asyncio", backend_options=backend)
    log.info("stopped after %.1f s", time.monotonic() - started)
