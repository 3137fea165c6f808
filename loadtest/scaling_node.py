"""One cluster node for ``loadtest.bench_scaling``: a real hub whose index is filled without sockets.

The node is ``hub.app.Hub`` exactly as ``hub serve`` builds it (same settings
parser, same replication, relay, fan-out and endpoints), serving on its port.
Instead of tracker connections, it starts ``--sessions`` sessions through its
registry (``Registry.start`` with ``hub.record.Start`` structs, as a tracker's
start does) once its replication has bootstrapped, then changes them at
``--rate`` per second: heartbeats (``Registry.heartbeat``) and, one change in
``1/--update-share``, a record update (``Registry.update``), so the
replication publishes and stores them as it would a tracker's.

It prints JSON lines on stdout: ``{"port": P}`` once it listens, ``{"filled": N}``
once its sessions are started, then ``{"changes": N}`` (made so far) every
second. SIGUSR1 pauses the changes, SIGUSR2 resumes them; SIGTERM drains as
``hub serve`` does.

    python -m loadtest.scaling_node --sessions 2000 --projects 32 --rate 100 -- \\
        --port 0 --api-key KEY --redis-url redis://127.0.0.1:PORT --node-id n1
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
from typing import Any

import anyio

from hub import logs
from hub.app import Hub
from hub.clock import now_ms
from hub.config import parse_settings
from hub.record import Session, Start, Update

# Sessions started per step of the fill, a publish window apart: a tracker swarm's
# starts arrive spread out too, and one batch of every record would be one huge message.
FILL_CHUNK = 200
BROWSERS = ("Chrome", "Firefox", "Safari", "Edge")
COUNTRIES = ("FR", "DE", "US", "GB", "JP", "BR")


def project_of(i: int, projects: int) -> str:
    return f"p{i % projects:02d}"


def start_of(node: str, i: int) -> Start:
    """A tracker's start as a browser sends it (~700 bytes as a stored record)."""
    return Start(
        sessionID=f"{node}-{i}",
        userID=f"user{i}@example.com",
        userUUID=f"uuid-{node}-{i}",
        url=f"https://shop.example.com/products/{i % 97}",
        pageTitle=f"Product {i % 97}",
        referrer="https://www.google.com/",
        trackerVersion="16.0.1",
        userOs="Windows",
        userBrowser=BROWSERS[i % len(BROWSERS)],
        userBrowserVersion="126.0",
        userDevice="",
        userDeviceType="desktop",
        userCountry=COUNTRIES[i % len(COUNTRIES)],
        language="en-US",
        environment="production",
        appVersion="4.2.0",
        userAgent="Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.0.0 Safari/537.36",
        metadata={"plan": ("free", "pro", "team")[i % 3], "tenant": f"t{i % 50}", "ab": str(i % 2)},
    )


class Changer:
    """Starts this node's sessions, then changes them at a steady rate until paused."""

    def __init__(self, hub: Hub, node: str, args: argparse.Namespace) -> None:
        self.hub = hub
        self.node = node
        self.args = args
        self.sessions: list[Session] = []
        self.paused = False
        self.changes = 0

    async def fill(self) -> None:
        registry = self.hub.registry
        window = max(self.hub.settings.publish_window, 0.001)
        for first in range(0, self.args.sessions, FILL_CHUNK):
            for i in range(first, min(first + FILL_CHUNK, self.args.sessions)):
                project = project_of(i, self.args.projects)
                session, _ = registry.start(project, 0, start_of(self.node, i), now_ms(), attach=True)
                self.sessions.append(session)
            # --fill-rate: starts per second, as a swarm's trackers would arrive (0: a chunk
            # every two publish windows).
            pace = FILL_CHUNK / self.args.fill_rate if self.args.fill_rate > 0 else 0.0
            await anyio.sleep(max(window * 2, pace))

    async def change(self) -> None:
        """``--rate`` changes/s in ticks of ``--tick`` s, round robin over the sessions."""
        if not self.sessions or self.args.rate <= 0:
            return
        registry = self.hub.registry
        every = round(1 / self.args.update_share) if self.args.update_share > 0 else 0
        per_tick = self.args.rate * self.args.tick
        owed = 0.0
        i = 0
        deadline = anyio.current_time()
        while True:
            deadline += self.args.tick
            await anyio.sleep(max(0.0, deadline - anyio.current_time()))
            if self.paused:
                owed = 0.0
                continue
            owed += per_tick
            now = now_ms()
            while owed >= 1:
                owed -= 1
                session = self.sessions[i % len(self.sessions)]
                i += 1
                self.changes += 1
                if every and self.changes % every == 0:
                    registry.update(session, Update(pageTitle=f"Page {self.changes}"), now)
                else:
                    registry.heartbeat(session, None, now)

    async def report(self) -> None:
        """The changes made so far, every second (the bench reads the rate achieved)."""
        while True:
            await anyio.sleep(1.0)
            emit(changes=self.changes)

    async def pause_on_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGUSR1, signal.SIGUSR2) as signals:
            async for signum in signals:
                self.paused = signum == signal.SIGUSR1


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def main(args: argparse.Namespace, hub_argv: list[str]) -> None:
    settings = parse_settings(["serve", *hub_argv])
    logs.setup(settings.log_level, settings.log_format, logs.secrets_of(settings))
    hub = Hub(settings)
    gc.freeze()  # as hub.app.run: what start-up built stays out of the collector's walks
    changer = Changer(hub, settings.node_id or "local", args)
    async with anyio.create_task_group() as tg:
        tg.start_soon(changer.pause_on_signals)

        async def serve_then_stop() -> None:
            await hub.serve()
            tg.cancel_scope.cancel()

        tg.start_soon(serve_then_stop)
        await hub.listening.wait()
        emit(port=hub.port)
        while not hub.replication.ready:
            await anyio.sleep(0.05)
        await changer.fill()
        emit(filled=len(changer.sessions))
        tg.start_soon(changer.report)
        await changer.change()


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=2000, help="sessions this node starts")
    parser.add_argument(
        "--projects", type=int, default=32, help="project keys p00.. the sessions spread over"
    )
    parser.add_argument("--rate", type=float, default=100.0, help="changes per second on this node")
    parser.add_argument(
        "--fill-rate", type=float, default=0.0, help="sessions started per second (0: as fast as it goes)"
    )
    parser.add_argument(
        "--update-share", type=float, default=1 / 3, help="share of changes that are record updates"
    )
    parser.add_argument("--tick", type=float, default=0.01, help="seconds between bursts of changes")
    if "--" in argv:
        cut = argv.index("--")
        own, hub_argv = argv[:cut], argv[cut + 1 :]
    else:
        own, hub_argv = argv, []
    return parser.parse_args(own), hub_argv


if __name__ == "__main__":
    parsed, rest = parse(sys.argv[1:])
    try:
        import uvloop  # noqa: F401
    except ImportError:
        backend: dict[str, Any] = {}
    else:
        backend = {"use_uvloop": True}
    anyio.run(main, parsed, rest, backend="asyncio", backend_options=backend)
