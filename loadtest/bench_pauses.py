"""Event-loop pauses of one hub under a tracker swarm: garbage collections and sweeps.

    python -m loadtest.bench_pauses --trackers 16000 --hold 90

Runs twice, one hub process each (``hub serve`` on a free port, its swarm from
``python -m loadtest trackers``: heartbeats every 30 s, 20 searches/s on new
connections, 8 agents), the same swarm each time: first with the collector
policy off (``hub/collector.py`` replaced by a no-op: start-up objects frozen,
CPython's collections as they come), then on (the hub as shipped). Inside the
hub, every collection is timed through ``gc.callbacks`` and every
``Server.sweep`` call by a wrapper; what happened during the hold (after the
ramp) is summed up per generation. The swarm's search latency is its own
(client-side, the hub's pauses included).
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .procs import free_port
from .stats import percentiles

RESULTS = Path(__file__).parent / "results"
API_KEY = "bench-pauses-key-123456"


def _serve(port: int, out: Path, policy: bool) -> None:
    """The hub process: hub serve with timers on its pauses; their log written once it stops."""
    from hub import app, server
    from hub.collector import Collector

    if not policy:

        class Off(Collector):
            def install(self) -> None:
                pass

            def tick(self) -> None:
                pass

        app.Collector = Off  # type: ignore[attr-defined]
    events: list[tuple[float, str, float]] = []  # (monotonic time, what, seconds)
    began = [0.0]

    def timed(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            events.append((time.monotonic(), f"gen{info['generation']}", time.perf_counter() - began[0]))

    gc.callbacks.append(timed)
    sweep = server.Server.sweep

    def timed_sweep(self: server.Server) -> None:
        t = time.perf_counter()
        sweep(self)
        events.append((time.monotonic(), "sweep", time.perf_counter() - t))

    server.Server.sweep = timed_sweep  # type: ignore[method-assign]

    from hub.cli import main

    # SIGTERM drains the hub and main returns (the hub's own handler): then the log is written.
    main(["serve", "--port", str(port), "--api-key", API_KEY, "--log-level", "warning"])
    out.write_text(json.dumps(events))


def _summary(durations: list[float]) -> dict[str, Any]:
    """Milliseconds: how many, percentiles, and their sum."""
    return {**percentiles([d * 1000 for d in durations]), "total_ms": round(sum(durations) * 1000, 1)}


def one_run(args: argparse.Namespace, policy: bool, workdir: Path) -> dict[str, Any]:
    port = free_port()
    events_file = workdir / f"events-{policy}.json"
    swarm_file = workdir / f"swarm-{policy}.json"
    hub_proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest.bench_pauses", "--serve", str(port), str(events_file), str(policy)]
    )
    try:
        deadline = time.monotonic() + 20
        import urllib.request

        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).read()
                break
            except OSError:
                if hub_proc.poll() is not None:
                    raise SystemExit(f"the hub exited {hub_proc.returncode} before it was ready") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        started = time.monotonic()
        subprocess.run(
            [
                sys.executable, "-m", "loadtest", "trackers",
                "--target", f"ws://127.0.0.1:{port}", "--api-key", API_KEY,
                "-n", str(args.trackers), "--ramp", str(args.ramp), "--duration", str(args.hold),
                "--qps", "20", "--fresh-searches", "--projects-zipf", "4", "--agents", "8",
                "--quiet", "--out", str(swarm_file),
            ],
            check=False,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        hub_proc.send_signal(signal.SIGTERM)
        hub_proc.wait(30)
    swarm = json.loads(swarm_file.read_text())
    # The hold: from when every tracker was live to the end of the swarm's run.
    hold_from = started + float(swarm["summary"]["all_live_s"])
    events = [e for e in json.loads(events_file.read_text()) if e[0] >= hold_from]
    by_kind: dict[str, list[float]] = {}
    for _, what, seconds in events:
        by_kind.setdefault(what, []).append(seconds)
    return {
        "policy": "on" if policy else "off",
        "hold_s": round(args.hold, 1),
        "pauses_in_hold": {k: _summary(v) for k, v in sorted(by_kind.items())},
        "search_ms": swarm["summary"]["search_ms"],
        "fanout_ms": swarm["summary"]["fanout_ms"],
        "steady_hub_cpu_pct": swarm["summary"]["steady"]["hub_cpu_pct"],
        "kib_per_session": swarm["summary"]["memory"]["kib_per_session"],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        _serve(int(argv[1]), Path(argv[2]), argv[3] == "True")
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trackers", type=int, default=16000)
    parser.add_argument("--ramp", type=float, default=2000.0, help="tracker connects per second")
    parser.add_argument("--hold", type=float, default=90.0, help="seconds once every tracker is live")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench-pauses.json")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"command": " ".join(["python -m loadtest.bench_pauses", *argv]), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-pauses-") as tmp:
        for policy in (False, True):
            run = one_run(args, policy, Path(tmp))
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
    off, on = result["runs"]
    result["search_p99_on_over_off"] = round(on["search_ms"]["p99"] / off["search_ms"]["p99"], 3)
    result["search_max_on_over_off"] = round(on["search_ms"]["max"] / off["search_ms"]["max"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
