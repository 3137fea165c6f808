"""Real ``redis-server`` processes for tests: started, stopped and killed for real.

redis-server cannot listen on port 0 and report the port, so a free port is
picked and may be taken by another test worker before redis binds it: redis
then logs "Address already in use" and exits, and the start is retried on
other ports. A restart (``start`` after ``kill``) comes back on the same port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ATTEMPTS = 5
START_TIMEOUT_S = 10.0


def have_redis() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def free_port() -> int:
    """A port free right now (another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PortTaken(Exception):
    """redis-server found its port (or its cluster bus port) in use."""


class RedisServer:
    """One redis-server with nothing persisted: a restart comes back empty.

    ``cluster``: a Redis Cluster node (its bus on a second port), for ``RedisCluster``.
    """

    def __init__(self, cluster: bool = False) -> None:
        self.cluster = cluster
        self.dir = tempfile.mkdtemp(prefix="hub-redis-")
        self.log = Path(self.dir) / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = self.bus_port = 0
        try:
            for _ in range(ATTEMPTS):
                self.port = free_port()
                # The default bus port (port + 10000) overflows for high free ports.
                self.bus_port = free_port() if cluster else 0
                try:
                    self._launch()
                    return
                except PortTaken:
                    continue
            raise RuntimeError(f"redis-server found its port taken {ATTEMPTS} times in a row")
        except BaseException:
            self.__exit__()
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start again on the same port, after ``kill``."""
        try:
            self._launch()
        except PortTaken:
            raise RuntimeError(f"port {self.port} was taken while redis-server was down") from None

    def _launch(self) -> None:
        self.log.write_text("")
        args = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.dir,
            "--logfile", str(self.log),
        ]  # fmt: skip
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000",
                "--cluster-port", str(self.bus_port),
            ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        # Its own log says it listens: a PONG could come from another worker's redis on a taken port.
        while "Ready to accept connections" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None:
                text = self.log.read_text(errors="replace")
                self.proc = None
                if "Address already in use" in text:
                    raise PortTaken(self.port)
                raise RuntimeError(f"redis-server on port {self.port} exited: {text[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} not ready within {START_TIMEOUT_S} s")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """Three redis-server masters in cluster mode, joined by ``redis-cli --cluster create``."""

    def __init__(self) -> None:
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(3):
                self.nodes.append(RedisServer(cluster=True))
            subprocess.run(
                [
                    "redis-cli", "--cluster", "create",
                    *(f"127.0.0.1:{n.port}" for n in self.nodes),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )  # fmt: skip
            deadline = time.monotonic() + 15
            while not all(self._ok(n.port) for n in self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("redis cluster did not reach cluster_state:ok within 15 s")
                time.sleep(0.05)
        except BaseException:
            self.__exit__()
            raise

    @staticmethod
    def _ok(port: int) -> bool:
        out = subprocess.run(
            ["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True, text=True, timeout=5
        ).stdout
        return "cluster_state:ok" in out

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        for node in self.nodes:
            node.__exit__()
