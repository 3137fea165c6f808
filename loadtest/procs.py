"""Processes of a run: servers it starts (hub, baseline), and the CPU and memory of the hub it watches."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Final

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_child(command: str, config: bytes) -> asyncio.subprocess.Process:
    """``python -m loadtest <command>`` with pipes, its configuration line written first."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest", command,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=64 << 20,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(config + b"\n")
    return proc


def start_hub(port: int, api_key: str, extra: list[str]) -> subprocess.Popen[bytes]:
    """``python -m hub serve`` on ``port`` (no HUB_* from this environment), once it accepts."""
    args = [sys.executable, "-m", "hub", "serve", "--port", str(port), "--api-key", api_key]
    args += ["--log-level", "warning", *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    proc = subprocess.Popen(args, env=env)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("hub did not start")


def listen_overflows() -> int:
    """The kernel's count of connections dropped at a full listen backlog (TcpExt ListenOverflows)."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0)) + int(table.get("ListenDrops", 0))
    return 0


def pids_listening(port: int) -> list[int]:
    """Processes listening on ``port`` (needs permission to see other processes' sockets)."""
    try:
        conns = psutil.net_connections("tcp")
    except psutil.AccessDenied:
        return []
    return sorted(
        {c.pid for c in conns if c.status == "LISTEN" and c.laddr and c.laddr.port == port and c.pid}
    )


def run_queue_wait(pid: int) -> float | None:
    """Seconds ``pid``'s threads have spent runnable but waiting for a CPU (``/proc/<pid>/schedstat``,
    its second field): on a machine the load generator shares, the part of a latency no code of the
    hub's can remove. None where the kernel does not keep schedstats."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


POLICIES: Final = {os.SCHED_OTHER: "normal", os.SCHED_BATCH: "batch", os.SCHED_IDLE: "idle"}


def policy(pid: int) -> str | None:
    """``pid``'s scheduling policy as the kernel has it."""
    with contextlib.suppress(OSError):
        found = os.sched_getscheduler(pid)
        return POLICIES.get(found, str(found))
    return None


@dataclass
class Watched:
    """CPU and RSS of a server: its processes and their children (hub workers)."""

    pids: list[int]
    _cpu: float = 0.0
    _at: float = 0.0
    procs: dict[int, psutil.Process] = field(default_factory=dict)
    _listed: float = 0.0

    def processes(self) -> list[psutil.Process]:
        # Finding children scans every process of the machine: at most every 5 s.
        if self.procs and time.monotonic() - self._listed < 5.0:
            return list(self.procs.values())
        self._listed = time.monotonic()
        found: dict[int, psutil.Process] = {}
        for pid in self.pids:
            try:
                top = self.procs.get(pid) or psutil.Process(pid)
                found[pid] = top
                for child in top.children(recursive=True):
                    found[child.pid] = self.procs.get(child.pid) or child
            except psutil.NoSuchProcess:
                continue
        self.procs = found
        return list(found.values())

    def rss(self) -> int:
        total = 0
        for proc in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                t = proc.cpu_times()
                total += t.user + t.system
        return total

    def cpu_percent(self) -> float:
        """Percent of one core used since the previous call."""
        cpu, now = self.cpu_seconds(), time.monotonic()
        pct = 100.0 * (cpu - self._cpu) / (now - self._at) if self._at else 0.0
        self._cpu, self._at = cpu, now
        return pct

    def sample(self, with_fds: bool) -> tuple[int, float, int | None]:
        """RSS, CPU percent since the last sample, and (when asked) open fds; run off the event loop."""
        return self.rss(), self.cpu_percent(), self.fds() if with_fds else None

    def per_process(self) -> dict[int, dict[str, float | str]]:
        """Each process: its command line's tail, RSS (MiB), CPU seconds and run-queue wait so far."""
        out: dict[int, dict[str, float | str]] = {}
        for proc in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                t = proc.cpu_times()
                out[proc.pid] = {
                    "cmd": " ".join(proc.cmdline()[-4:])[:120],
                    "rss_mib": round(proc.memory_info().rss / 2**20, 1),
                    "cpu_s": round(t.user + t.system, 3),
                }
                wait = run_queue_wait(proc.pid)
                if wait is not None:
                    out[proc.pid]["wait_s"] = round(wait, 4)
        return out

    def fds(self) -> int:
        total = 0
        for proc in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.num_fds()
        return total


class HubUsage:
    """A watched hub's RSS and CPU: the baseline taken when made, per-second samples, the settled state."""

    def __init__(self, watched: Watched) -> None:
        self.watched = watched
        self.rss0 = watched.rss()
        self.cpu0 = watched.cpu_seconds()
        self.samples = 0
        self.settled_rss: int | None = None
        self.cpu_used: float | None = None

    async def sample(self, live: int) -> dict[str, float | int]:
        """The hub's fields of a per-second point; open fds every 10th (listing them costs more)."""
        # psutil reads /proc: in a thread, so searches timed by the caller's loop don't wait on it.
        rss, cpu, fds = await asyncio.to_thread(self.watched.sample, self.samples % 10 == 0)
        self.samples += 1
        point: dict[str, float | int] = {"hub_rss_mib": round(rss / 2**20, 1), "hub_cpu_pct": round(cpu, 1)}
        if fds is not None:
            point["hub_fds"] = fds
        if live:
            point["kib_per_session"] = round((rss - self.rss0) / 1024 / live, 2)
        return point

    def settle(self) -> None:
        """The swarm is settled: RSS now, and CPU used since the baseline."""
        self.settled_rss = self.watched.rss()
        self.cpu_used = self.watched.cpu_seconds() - self.cpu0

    def cpu_seconds_used(self) -> float | None:
        return round(self.cpu_used, 2) if self.cpu_used is not None else None

    def memory(self, live: int) -> dict[str, float | int | None] | None:
        if self.settled_rss is None:
            return None
        return {
            "rss_before_mib": round(self.rss0 / 2**20, 1),
            "rss_settled_mib": round(self.settled_rss / 2**20, 1),
            "live": live,
            "kib_per_session": round((self.settled_rss - self.rss0) / 1024 / live, 2) if live else None,
        }


async def start_servers(kind: str, n: int, api_key: str, extra: str, grace: float) -> list[Server]:
    """``n`` servers on free ports, once each is ready; all stopped if one fails to start."""
    servers = [Server(kind, api_key, extra, grace) for _ in range(n)]
    try:
        for server in servers:
            await server.ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


class Server:
    """A hub or baseline this run started on its own free port; killed at the end."""

    def __init__(self, kind: str, api_key: str, extra: str = "", grace: float = 30.0) -> None:
        self.kind = kind
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
        if kind == "hub":
            self.args = [
                sys.executable, "-m", "hub", "serve", "--port", str(self.port), "--api-key", api_key,
                "--grace", str(grace), "--log-level", "warning", *shlex.split(extra),
            ]  # fmt: skip
        else:
            self.args = [sys.executable, "-m", "loadtest.baseline", "--port", str(self.port)]
        # Its log goes to a file, never a pipe nobody reads: a hub that logs more than a pipe
        # holds (64 KiB of warnings under load) would block on its next write.
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept open for the process's life
            prefix=f"loadtest-{kind}-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(self.args, env=env, stdout=subprocess.DEVNULL, stderr=self.log)

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's log (stderr)."""
        try:
            with open(self.log.name, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def command(self) -> str:
        return shlex.join(["python", *self.args[1:]]).replace(f"--port {self.port}", "--port PORT")

    async def ready(self, timeout: float = 30.0) -> None:
        path = "/readyz" if self.kind == "hub" else "/healthz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited {self.proc.returncode}: {self.log_tail().strip()}")
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                line = await asyncio.wait_for(reader.readline(), 2)
                writer.close()
                if b" 200 " in line:
                    return
            except (OSError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.kind} on port {self.port} not ready within {timeout} s")

    def stop(self) -> None:
        """SIGTERM (the hub drains), SIGKILL after 15 s; then any worker child left behind."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        self.log.close()
