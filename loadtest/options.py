"""One run's settings (``Options``), their bounds, and ``UsageError`` for a bad one."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from .swarm import PER_SOURCE

MAX_TRACKERS: Final = 200_000
MAX_AGENTS: Final = 5_000
MAX_DURATION: Final = 3_600.0
MAX_QPS: Final = 5_000.0
SOURCES: Final = 250  # 127.0.0.1 .. 127.0.0.250


class UsageError(ValueError):
    """A bad option: one line, exit code 2."""


@dataclass
class Options:
    scenario: str
    targets: list[str] = field(default_factory=lambda: ["ws://127.0.0.1:9001"])
    spawn: str = "none"  # hub, baseline or none
    hubs: int = 1  # servers to spawn; more than one are independent nodes (sharded)
    hub_args: str = ""
    hub_pids: list[int] = field(default_factory=list)
    projects: list[str] = field(default_factory=lambda: ["loadtest"])
    api_key: str = ""
    trackers: int = 1000
    agents: int = 0
    ramp: float = 1000.0
    heartbeat: float = 30.0
    jitter: float = 0.2
    reloads: float = 0.0
    tabs: float = 0.0
    drops: float = 0.0
    ends: float = 0.0
    updates: float = 0.0
    qps: float = 0.0
    duration: float = 10.0
    seed: int = 1
    procs: int = 0
    grace: float = 30.0
    sharded: bool = False
    check_interval: float = 2.0
    connect_timeout: float = 10.0
    out: str = ""
    quiet: bool = False
    # ingest only
    ladder: list[float] = field(default_factory=list)
    step: float = 4.0

    def validate(self) -> None:
        for url in self.targets:
            parts = urlsplit(url)
            if parts.scheme not in ("ws", "http"):
                raise UsageError(f"target {url!r}: use ws://127.x.y.z:PORT (plain loopback WebSocket)")
            host = parts.hostname or ""
            try:
                loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise UsageError(
                    f"target {url!r} is not a loopback address: the swarm only targets this machine"
                )
        if not 1 <= self.hubs <= 16:
            raise UsageError("--hubs must be 1-16")
        if not 0 <= self.trackers <= MAX_TRACKERS:
            raise UsageError(f"--trackers must be 0-{MAX_TRACKERS}")
        if not 0 <= self.agents <= MAX_AGENTS:
            raise UsageError(f"--agents must be 0-{MAX_AGENTS}")
        if not 0 < self.duration <= MAX_DURATION:
            raise UsageError(f"--duration must be > 0 and at most {MAX_DURATION:.0f} s")
        if not 0 <= self.qps <= MAX_QPS:
            raise UsageError(f"--qps must be 0-{MAX_QPS:.0f}")
        if self.ramp < 0 or self.heartbeat < 0 or not 0 <= self.jitter < 1:
            raise UsageError("--ramp and --heartbeat must be >= 0, --jitter in [0, 1)")
        if self.trackers > PER_SOURCE * SOURCES:
            raise UsageError("too many trackers for the source addresses")

    @property
    def ramp_time(self) -> float:
        """Seconds the swarm takes to open every tracker."""
        return self.trackers / self.ramp if self.ramp > 0 else 0.0

    def record(self) -> dict[str, Any]:
        """The options as the result file keeps them: no key, nothing about where output goes."""
        return {k: v for k, v in asdict(self).items() if k not in ("api_key", "out", "quiet")}
