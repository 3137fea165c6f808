"""Shared test tools: an in-process hub, hub processes, a raw HTTP client, and recorders for the
I/O-free cores (the unit layer)."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from hub.app import Hub
from hub.config import Settings
from hub.index import LiveIndex
from hub.record import Session
from hub.registry import Registry
from hub.replication import LocalReplication
from hub.wire import EndReason

API_KEY = "test-key-7f3a"
ROOT = Path(__file__).resolve().parent.parent


def run_bench(module: str, *args: str, out: Path, timeout: float) -> tuple[Any, str]:
    """``python -m loadtest.MODULE ARGS --out OUT`` from the project root, which must exit 0:
    the result it wrote, and what it printed."""
    proc = subprocess.run(
        [sys.executable, "-m", f"loadtest.{module}", *args, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http(
    port: int,
    method: str,
    path: str,
    body: bytes | str | dict[str, Any] | list[Any] | None = None,
    headers: dict[str, str] | None = None,
    key: str | None = API_KEY,
    raw: bytes | None = None,
    timeout: float = 5.0,
) -> HttpReply:
    """One HTTP/1.1 request on a fresh connection, read to the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if raw is None:
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
            data = body.encode() if isinstance(body, str) else (body or b"")
            lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
            if key is not None:
                lines.append(f"Authorization: Bearer {key}")
            for name, value in (headers or {}).items():
                lines.append(f"{name}: {value}")
            if data or method in ("POST", "PUT"):
                lines.append(f"Content-Length: {len(data)}")
            raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + data
        writer.write(raw)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        hdrs = {}
        for line in header_lines:
            if ":" in line:
                name, _, value = line.partition(":")
                hdrs[name.strip().lower()] = value.strip()
        length = int(hdrs.get("content-length", "0"))
        # A HEAD answer carries the GET's Content-Length and no body.
        has_body = length and method != "HEAD"
        payload = await asyncio.wait_for(reader.readexactly(length), timeout) if has_body else b""
        return HttpReply(status, hdrs, payload)
    finally:
        writer.close()


@dataclass
class RunningHub:
    hub: Hub
    port: int

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def tracker_url(self, project: str = "p1") -> str:
        return f"{self.url}/ws/tracker/{project}"

    def agent_url(self, project: str = "p1") -> str:
        return f"{self.url}/ws/agent/{project}"

    async def search(self, project: str = "p1", body: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = await http(self.port, "POST", f"/public/{project}/assist/sessions", body or {})
        assert reply.status == 200, reply.body
        data: dict[str, Any] = reply.json()["data"]
        return data


# The sweep interval is only how often deadlines are checked: short, a test waits less past
# one; no test has to act before it fires. Grace and timeouts keep a second or more.
TEST_SETTINGS = Settings(port=0, api_key=API_KEY, sweep_interval=0.05, handshake_timeout=2.0)


@asynccontextmanager
async def running_hub(**overrides: Any) -> AsyncIterator[RunningHub]:
    """A hub in this event loop, on port 0 (``port`` is the one it bound)."""
    hub = Hub(replace(TEST_SETTINGS, **overrides))
    task = asyncio.create_task(hub.serve(handle_signals=False))
    waiter = asyncio.create_task(hub.listening.wait())
    done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()
    try:
        yield RunningHub(hub, hub.port)
    finally:
        hub.stop()
        await asyncio.wait_for(task, 10)


async def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.01, what: str = "") -> Any:
    """Poll an (async or sync) predicate until it is truthy; its value is returned.

    Past ``timeout`` it fails saying what was awaited: ``what``, else the predicate's source.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not met within {timeout} s: {what or _source(predicate)}")
        await asyncio.sleep(interval)


def _source(predicate: Any) -> str:
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return repr(predicate)


LISTENING = re.compile(r"\bhub\.listening\b.*?\bport\W{1,3}(\d+)")


def listening_port(line: str) -> int | None:
    """The port of a hub's ``hub.listening`` log line (text or JSON format), else None."""
    found = LISTENING.search(line)
    return int(found.group(1)) if found else None


def _pairs(args: tuple[str, ...]) -> list[tuple[str, str]]:
    """Each argument with the one before it."""
    return list(zip(("", *args), args, strict=False))


class StderrLog:
    """Reads a hub process's stderr in a thread: it never blocks on a full pipe, and the
    port it bound (``--port 0``) is read from its ``hub.listening`` line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.port: int | None = None
        self._found = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if self.port is None:
                self.port = listening_port(line)
                if self.port is not None:
                    self._found.set()
        self._found.set()  # the process is gone

    def wait_port(self, timeout: float = 15.0) -> int:
        if not self._found.wait(timeout) and self.port is None:
            raise AssertionError(f"the hub reported no listening port within {timeout} s:\n{self.text()}")
        if self.port is None:
            raise AssertionError(f"the hub exited {self.proc.wait()} before listening:\n{self.text()}")
        return self.port

    def text(self) -> str:
        """Everything logged so far; all of it once the process has exited."""
        if self.proc.poll() is not None:
            self._thread.join(5)
        return "".join(self.lines)


class HubProcess:
    """``python -m hub serve`` in a child process, killed for real at the end.

    Without ``port`` it listens on ``--port 0`` and ``port`` is the port it reports
    in its ``hub.listening`` line: a port picked and released before the hub binds
    it could be taken by another test. That line is logged at info, so a quieter
    ``--log-level`` is raised to info then (stderr is read anyway: no pipe fills).
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None, port: int | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
        full_env.update(env or {})
        if port is None:
            args = tuple(
                "info" if a in ("warning", "error") and b == "--log-level" else a for b, a in _pairs(args)
            )
        self.args = [sys.executable, "-m", "hub", "serve", "--port", str(port or 0), *args]
        self.proc = subprocess.Popen(
            self.args, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.stderr = StderrLog(self.proc)
        self._port = port

    @property
    def port(self) -> int:
        if self._port is None:
            self._port = self.stderr.wait_port()
        return self._port

    def wait_ready(self, timeout: float = 10.0, path: str = "/healthz") -> None:
        deadline = time.monotonic() + timeout
        port = self.port
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"hub exited {self.proc.returncode}: {self.stderr.text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"hub on port {port} not ready ({path}) within {timeout} s")

    def wait_exit(self, timeout: float = 15.0) -> tuple[int, str]:
        """The exit code and everything it wrote to stderr, once it exited by itself."""
        code = self.proc.wait(timeout)
        return code, self.stderr.text()

    def terminate(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> HubProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# --- the unit layer: recorders for the I/O-free cores, driven with a fake clock ------------
#
# ``now`` is a plain int (Unix ms) the test chooses: no sleeps, no sockets.


class Events:
    """A Registry listener that records every event, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def session_started(self, session: Session) -> None:
        self.log.append(("started", session.sessionID))

    def session_changed(self, session: Session, changes: dict[str, Any]) -> None:
        self.log.append(("changed", session.sessionID, dict(changes)))

    def session_touched(self, session: Session) -> None:
        self.log.append(("touched", session.sessionID, session.lastActiveAt))

    def session_ended(self, session: Session, reason: str) -> None:
        self.log.append(("ended", session.sessionID, reason))

    def take(self) -> list[tuple[Any, ...]]:
        """The events since the last take."""
        taken, self.log = self.log, []
        return taken


class RecordingReplication(LocalReplication):
    """A ``hub.replication.Replication`` that records what the registry tells it."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def held(self, session: Session) -> None:
        self.log.append(("held", session.sessionID, session.tabs, session.connected))

    def touched(self, session: Session) -> None:
        self.log.append(("touched", session.sessionID, session.lastActiveAt))

    def released(self, session: Session, reason: EndReason | None) -> None:
        self.log.append(("released", session.sessionID, reason))

    def take(self) -> list[tuple[Any, ...]]:
        taken, self.log = self.log, []
        return taken


def recording_registry(
    grace_ms: int = 30_000, max_sessions: int = 0
) -> tuple[Registry, Events, RecordingReplication]:
    """A real Registry over a real LiveIndex, with its listener and replication recorded."""
    replication = RecordingReplication()
    registry = Registry(LiveIndex(), grace_ms, max_sessions, replication=replication)
    events = Events()
    registry.listeners.append(events)
    return registry, events, replication


class RecordingSink:
    """An agent's connection as ``FanOut`` sees it: frames sent, a paused flag, the close."""

    def __init__(self) -> None:
        self.paused = False
        self.frames: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None

    def send(self, frame: bytes) -> None:
        assert self.closed is None, "a frame after the close"
        self.frames.append(json.loads(frame))

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def take(self) -> list[dict[str, Any]]:
        taken, self.frames = self.frames, []
        return taken


def run_hub(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m hub ARGS`` to its end, with no ``HUB_*`` variable but ``env``'s."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "hub", *args], env=full_env, capture_output=True, text=True, timeout=20
    )


class FrameLog:
    """A WebSocket whose JSON frames are collected in the background, as they come."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            self.frames.append(json.loads(raw))


class MixedLog:
    """A WebSocket whose frames are collected in the background: JSON text and binary apart."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.text: list[dict[str, Any]] = []
        self.binary: list[bytes] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            if isinstance(raw, bytes):
                self.binary.append(raw)
            else:
                self.text.append(json.loads(raw))

    async def send(self, **frame: Any) -> None:
        await self.ws.send(json.dumps(frame))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.text if f["type"] == kind]


@contextmanager
def serve_site(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` served from a thread on a free port (a test page's site); yields its origin."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
