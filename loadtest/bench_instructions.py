"""Instructions per heartbeat and per fan-out change, counted by callgrind: repeatable on a busy machine.

    python -m loadtest.bench_instructions /path/to/old/checkout /path/to/new/checkout

For each tree (a checkout of this repository), runs the hub's I/O-free cores
in a child Python under ``valgrind --tool=callgrind`` twice, without and
with the measured loop, and reports the difference per operation:

- heartbeat: ``TrackerProtocol.receive`` of a heartbeat for 500 started
  sessions (registry, index, fan-out listener with no agent, replication);
- change: one record change fanned out to 100 agents subscribed to its
  project (``FanOut.session_changed`` then ``flush``), 200 sessions.

Callgrind counts instructions, not time: the same tree gives the same count
whatever else runs, so two trees compare in one run on a shared machine.
Module names of older trees (``hub.sessions``, ``hub.agents``, ``hub.session``)
are found too.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

# The child: builds the cores, then runs ``rounds`` of the chosen loop.
CHILD = r"""
import os, sys
import hub
kind, rounds = sys.argv[1], int(sys.argv[2])
here = os.path.dirname(hub.__file__)
old = os.path.exists(os.path.join(here, "agents.py"))
from hub.index import LiveIndex
from hub.tracker import TrackerProtocol
if old:
    from hub.sessions import Registry
    from hub.agents import FanOut, Subscription
    from hub.session import Session
else:
    from hub.registry import Registry
    from hub.fanout import FanOut, Subscription
    from hub.record import Session
index = LiveIndex()
fan = FanOut(index, 1_000_000, wake=lambda: None)
if kind == "heartbeat":
    registry = Registry(index, grace_ms=30_000)
    registry.listeners.append(fan)
    trackers = []
    for i in range(500):
        t = TrackerProtocol(registry, "p", 0)
        start = '{"type":"start","sessionID":"s%d","userID":"u%d","pageTitle":"Home","url":"https://x/y"}'
        t.receive((start % (i, i)).encode(), 1000)
        trackers.append(t)
    beat = b'{"type":"heartbeat"}'
    for k in range(rounds):
        for t in trackers:
            t.receive(beat, 2000 + k)
else:
    class Sink:
        paused = False
        def send(self, frame): pass
        def close(self, code, reason): pass
    sessions = []
    for i in range(200):
        s = Session(sessionID=f"s{i}", projectKey="p", projectId=0, timestamp=1, lastActiveAt=1)
        index.add(s)
        sessions.append(s)
    for _ in range(100):
        fan.subscribe(fan.add(Sink()), Subscription("p"))
    for k in range(rounds):
        for s in sessions:
            changes = {"pageTitle": f"t{k}", "lastActiveAt": 2 + k}
            index.apply(s, changes)
            fan.session_changed(s, changes)
        fan.flush()
"""

OPS = {"heartbeat": 500, "change": 200}  # operations per round
ROUNDS = 10


def run_child(
    tree: str, kind: str, rounds: int, child: str, callgrind: bool = True, env: dict[str, str] | None = None
) -> str:
    """The stderr of ``child kind rounds`` run on ``tree``'s hub (under callgrind or not)."""
    full_env = {**os.environ, "PYTHONPATH": tree, **(env or {})}
    with tempfile.TemporaryDirectory() as out:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg"] if callgrind else []
        proc = subprocess.run(
            [*command, sys.executable, child, kind, str(rounds)],
            env=full_env,
            cwd=out,
            capture_output=True,
            text=True,
            check=True,
        )
    return proc.stderr


def collected(stderr: str) -> int:
    """The instructions callgrind counted, from its stderr."""
    found = re.search(r"Collected : (\d+)", stderr)
    if found is None:
        raise SystemExit(f"no instruction count from valgrind:\n{stderr[-2000:]}")
    return int(found.group(1))


def instructions(tree: str, kind: str, rounds: int, child: str) -> int:
    return collected(run_child(tree, kind, rounds, child))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs="+", help="checkouts of this repository to compare")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CHILD)
        child = f.name
    try:
        print("| tree | instructions per heartbeat | per change to 100 agents |")
        print("|---|---|---|")
        for tree in args.trees:
            cells = []
            for kind, per_round in OPS.items():
                setup = instructions(tree, kind, 0, child)
                loop = instructions(tree, kind, ROUNDS, child)
                cells.append(f"{(loop - setup) / (ROUNDS * per_round):,.0f}")
            print(f"| {tree} | {cells[0]} | {cells[1]} |")
    finally:
        os.unlink(child)


if __name__ == "__main__":
    main()
