"""``python -m loadtest <scenario>`` and ``python -m loadtest report``.

Scenarios are presets of one swarm (trackers, agents, a search load); every
option can override them. A run is bounded in count and time, stops by
itself, targets loopback only, and writes one JSON result file. Exit code 0
when the hub held what the swarm believes, 1 when a check found a mismatch,
2 for a bad option.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .options import Options

T = TypeVar("T")

SCENARIOS: dict[str, dict[str, Any]] = {
    "trackers": {"trackers": 1000},
    "agents": {"trackers": 500, "agents": 50, "updates": 20.0},
    "search": {"trackers": 2000, "qps": 100.0},
    "mixed": {
        "trackers": 2000,
        "agents": 20,
        "qps": 50.0,
        "reloads": 2.0,
        "tabs": 2.0,
        "drops": 1.0,
        "ends": 2.0,
        "updates": 10.0,
    },
    # 10k trackers connecting and starting at once; the hub's total is polled until it holds them all.
    # Two swarm processes: the connecting side costs more CPU per connection than the hub.
    "storm": {"trackers": 10_000, "ramp": 0.0, "duration": 2.0, "procs": 2},
    # Heartbeats/s absorbed, bare websockets baseline then the hub, same swarm, same run.
    "ingest": {
        "trackers": 4000,
        "ramp": 4000.0,
        "ladder": [5000.0, 10000.0, 20000.0, 30000.0, 40000.0, 50000.0, 60000.0, 80000.0],
    },
}

SCENARIO_HELP = {
    "trackers": "N trackers: ramp, heartbeats with jitter, optional churn",
    "agents": "N agents subscribing with filters while trackers update",
    "search": "a search query mix at a given rate over live trackers",
    "mixed": "trackers with churn, agents and searches at once",
    "storm": "10k trackers connecting and starting at once",
    "ingest": "heartbeat ingest ladder: baseline websockets receiver vs the hub",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="scenario")
    for name, help_text in SCENARIO_HELP.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--target",
            action="append",
            dest="targets",
            metavar="URL",
            help="hub URL, ws://127.x.y.z:PORT (repeatable; default ws://127.0.0.1:9001)",
        )
        p.add_argument(
            "--spawn",
            choices=["none", "hub", "baseline"],
            default="none",
            help="start a server on a free port for this run and kill it at the end",
        )
        p.add_argument("--hub-args", default="", help="extra `hub serve` flags with --spawn hub")
        p.add_argument(
            "--hubs", type=int, default=1, help="with --spawn hub: N independent single-node hubs (sharded)"
        )
        p.add_argument(
            "--hub-pid",
            type=int,
            action="append",
            dest="hub_pids",
            default=[],
            help="hub process to watch for RSS/CPU (default: found by its listening port)",
        )
        p.add_argument("--projects", default="loadtest", help="project keys, comma-separated")
        p.add_argument(
            "--projects-zipf",
            type=int,
            default=0,
            metavar="N",
            help="N projects zipf-00 … with Zipf-like sizes (the largest 40%%), checked per project; "
            "agents and searches on every project (replaces --projects)",
        )
        p.add_argument(
            "--allowance",
            type=float,
            help="seconds a failing check may retry within, for propagation between nodes "
            "(default 0; 1 with --projects-zipf)",
        )
        p.add_argument(
            "--redis",
            action="store_true",
            help="with --spawn hub: start a redis-server on a free port and give the hubs --redis-url",
        )
        p.add_argument(
            "--fresh-searches",
            action="store_true",
            help="each search on a new connection (with --workers, it lands on any worker)",
        )
        p.add_argument(
            "--steady-skip",
            type=float,
            default=20.0,
            help="seconds of the hold before the steady CPU window (which runs to the hold's end)",
        )
        p.add_argument(
            "--steady-window",
            type=float,
            default=0.0,
            help="instead: the hold's last S seconds, searches stopped and checks paused (heartbeat load)",
        )
        p.add_argument(
            "--swarm-idle",
            action="store_true",
            help="run the swarm's processes under SCHED_IDLE: the hub, and the orchestrator that "
            "times its searches, come first for a CPU on a machine they share with the swarm",
        )
        p.add_argument(
            "--api-key", default=os.environ.get("HUB_API_KEY", ""), help="organization API key [HUB_API_KEY]"
        )
        p.add_argument("-n", "--trackers", type=int, help="tracker sessions")
        p.add_argument("--agents", type=int, help="agents")
        p.add_argument("--ramp", type=float, help="tracker connects per second, 0 = all at once")
        p.add_argument("--heartbeat", type=float, help="seconds between a tracker's heartbeats (default 30)")
        p.add_argument(
            "--jitter", type=float, help="heartbeat jitter, a fraction of the interval (default 0.2)"
        )
        for churn in ("reloads", "tabs", "drops", "ends", "updates"):
            p.add_argument(f"--{churn}", type=float, help=f"{churn} per second over the swarm")
        p.add_argument("--qps", type=float, help="searches per second")
        p.add_argument("--duration", type=float, help="seconds to hold once every tracker has connected")
        p.add_argument("--seed", type=int, default=1)
        p.add_argument(
            "--procs", type=int, default=0, help="swarm processes (default: one per 15k connections)"
        )
        p.add_argument("--grace", type=float, default=30.0, help="the hub's reconnect grace (seconds)")
        p.add_argument(
            "--sharded",
            action="store_true",
            help="targets are independent single-node hubs: their totals add up",
        )
        p.add_argument("--check-interval", type=float, default=2.0)
        p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds for connect + handshake")
        p.add_argument("--ladder", help="ingest: heartbeat rates per second, comma-separated")
        p.add_argument("--step", type=float, help="ingest: seconds per ladder step")
        p.add_argument("--out", default="", help="result file (default results/<scenario>-<time>.json)")
        p.add_argument("--quiet", action="store_true", help="no live view")  # fmt: skip
    rep = sub.add_parser("report", help="result files to a Markdown table and PNG plots")
    rep.add_argument("files", nargs="+")
    rep.add_argument("--plots", default="", help="directory for PNG plots (needs matplotlib)")
    rep.add_argument("--out", default="", help="Markdown file (default: stdout)")
    sub.add_parser("_worker", help=argparse.SUPPRESS)
    sub.add_parser("_searches", help=argparse.SUPPRESS)
    return parser


def options(args: argparse.Namespace) -> Options:
    from .options import Options

    preset = dict(SCENARIOS[args.command])
    values: dict[str, Any] = {"scenario": args.command, **preset}
    for name in ("trackers", "agents", "ramp", "heartbeat", "jitter", "reloads", "tabs", "drops", "ends",
                 "updates", "qps", "duration", "step"):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    if args.ladder:
        values["ladder"] = [float(x) for x in args.ladder.split(",") if x.strip()]
    values.update(
        targets=args.targets or ["ws://127.0.0.1:9001"],
        spawn="hub" if args.command == "ingest" else args.spawn,
        hub_args=args.hub_args,
        hubs=args.hubs,
        hub_pids=args.hub_pids,
        projects=[p.strip() for p in args.projects.split(",") if p.strip()],
        api_key=args.api_key,
        seed=args.seed,
        procs=args.procs or preset.get("procs", 0),
        grace=args.grace,
        sharded=args.sharded,
        check_interval=args.check_interval,
        connect_timeout=args.connect_timeout,
        projects_zipf=args.projects_zipf,
        allowance=args.allowance if args.allowance is not None else (1.0 if args.projects_zipf else 0.0),
        redis=args.redis,
        fresh_searches=args.fresh_searches,
        steady_skip=args.steady_skip,
        steady_window=args.steady_window,
        swarm_idle=args.swarm_idle,
        out=args.out,
        quiet=args.quiet,
    )
    return Options(**values)


async def _terminable(opts: Options) -> dict[str, Any]:
    """``run(opts)``, cancelled by SIGTERM: its ``finally`` then stops the hubs and the
    redis-server it started (the signal's default would leave them running)."""
    from .orchestrator import run

    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run(opts)


def _loop_run(coro: Coroutine[Any, Any, T]) -> T:
    """``coro`` on uvloop (the lean clients cost less of the shared CPU there), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "_worker":
        from .swarm import serve as serve_worker

        _loop_run(serve_worker())
        return 0
    if args.command == "_searches":
        from .searches import serve as serve_searches

        _loop_run(serve_searches())
        return 0
    if args.command == "report":
        from .report import main as report_main

        return report_main(args.files, args.out, args.plots)
    from .checks import failed
    from .options import UsageError
    from .result import write

    try:
        opts = options(args)
        opts.validate()
        if not opts.api_key and opts.spawn == "none":
            raise UsageError("--api-key (or HUB_API_KEY) is needed to search a hub this run did not start")
    except (UsageError, TypeError, ValueError) as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = _loop_run(_terminable(opts))
    except asyncio.CancelledError:
        print("loadtest: terminated (SIGTERM); the servers it started are stopped", file=sys.stderr)
        return 128 + signal.SIGTERM
    out = write(result, opts)
    print(json.dumps({"result": out, **result["summary"]}, default=str)[:4000])
    checks = result.get("checks")
    if checks and failed(checks):
        print(
            "loadtest: the hub disagrees with the swarm or the final check failed (see checks in the result)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
