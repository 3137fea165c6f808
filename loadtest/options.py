"""One run's settings (``Options``), their bounds, and ``UsageError`` for a bad one."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from .swarm import PER_SOURCE

MAX_TRACKERS: Final = 200_000
MAX_AGENTS: Final = 5_000
MAX_DURATION: Final = 3_600.0
MAX_QPS: Final = 5_000.0
SOURCES: Final = 250  # 127.0.0.1 .. 127.0.0.250
ZIPF_TOP: Final = 0.4  # --projects-zipf: the largest project's share of the trackers
MAX_ALLOWANCE: Final = 10.0


def zipf_weights(n: int, top: float = ZIPF_TOP) -> list[float]:
    """Shares of ``n`` projects, the k-th ∝ 1/k^s with s such that the first holds ``top`` (≥ 1/n)."""
    if n <= 1:
        return [1.0] * n
    top = max(top, 1.0 / n)

    def share(s: float) -> float:
        return 1.0 / sum(math.exp(-s * math.log(k)) for k in range(1, n + 1))

    lo, hi = 0.0, 20.0  # share(s) grows with s, from 1/n at s = 0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share(mid) < top else (lo, mid)
    weights = [math.exp(-lo * math.log(k)) for k in range(1, n + 1)]
    total = sum(weights)
    return [w / total for w in weights]


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
    # Trackers over this many projects ``zipf-00`` … with Zipf-like sizes (the largest ZIPF_TOP);
    # checks per project, agents and searches on every project. 0 = ``projects`` round-robin.
    projects_zipf: int = 0
    project_weights: list[float] = field(default_factory=list)  # set by validate() with projects_zipf
    allowance: float = 0.0  # seconds a check may retry within (propagation between nodes)
    redis: bool = False  # start a redis-server on a free port; spawned hubs get --redis-url
    fresh_searches: bool = False  # each search on a new connection (lands on any --workers worker)
    steady_skip: float = 20.0  # seconds of the hold before the steady CPU window starts
    # > 0: the steady window is instead the hold's last this many seconds, searches stopped and
    # checks paused there (the hub's CPU at heartbeat load, agents connected).
    steady_window: float = 0.0
    # The swarm's processes under SCHED_IDLE: a hub process (or the orchestrator, which times the
    # searches) that wakes takes the CPU from them at once, as on a machine of its own; the swarm
    # still has every cycle they leave.
    swarm_idle: bool = False
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
        if not 0 <= self.projects_zipf <= 1000:
            raise UsageError("--projects-zipf must be 0-1000")
        if self.steady_skip < 0 or self.steady_window < 0:
            raise UsageError("--steady-skip and --steady-window must be >= 0")
        if not 0 <= self.allowance <= MAX_ALLOWANCE:
            raise UsageError(f"--allowance must be 0-{MAX_ALLOWANCE:.0f} s")
        if self.redis and self.spawn != "hub":
            raise UsageError("--redis starts a Redis for hubs this run spawns: use it with --spawn hub")
        if self.projects_zipf:
            self.projects = [f"zipf-{k:02d}" for k in range(self.projects_zipf)]
            self.project_weights = zipf_weights(self.projects_zipf)

    @property
    def per_project(self) -> bool:
        """Checks count and compare per project (with --projects-zipf)."""
        return self.projects_zipf > 0

    @property
    def ramp_time(self) -> float:
        """Seconds the swarm takes to open every tracker."""
        return self.trackers / self.ramp if self.ramp > 0 else 0.0

    def record(self) -> dict[str, Any]:
        """The options as the result file keeps them: no key, nothing about where output goes."""
        return {k: v for k, v in asdict(self).items() if k not in ("api_key", "out", "quiet")}
