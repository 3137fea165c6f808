"""Instructions per HTTP request through the transport, counted by callgrind: tree against tree.

    python -m loadtest.bench_http_path /path/to/old/checkout /path/to/new/checkout

For each tree (a checkout of this repository), a child Python builds a route
table with the search routes over 200 sessions of one project and feeds
``HttpConnection.data_received`` (a transport that only collects the bytes
written) a keep-alive ``GET /public/p/assist/sessions?limit=10`` search, under
``valgrind --tool=callgrind`` twice, without and with the loop; the difference
per request is reported, and the same loop's wall time per request (noisy on a
shared machine: the instruction count is the figure to compare). ``GET
/healthz`` the same way shows the transport's own share.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile

from loadtest import bench_instructions

CHILD = r"""
import gc, sys, time
from collections import Counter
from hub.auth import Auth
from hub.config import Settings
from hub.http1 import HttpConnection
from hub.http_api import HttpApi
from hub.index import LiveIndex
from hub.record import Session
from hub.routes import RouteTable
from hub.server import Server

kind, rounds = sys.argv[1], int(sys.argv[2])
settings = Settings(api_key="k")
index = LiveIndex()
for i in range(200):
    index.add(Session(sessionID=f"s{i}", projectKey="p", projectId=0, timestamp=i, lastActiveAt=i,
                      userID=f"u{i}", userBrowser="Chrome"))
limits = Counter()
api = HttpApi(settings, index, ready=lambda: True, limits=limits)
routes = RouteTable(settings, Auth.from_settings(settings), accepting_websockets=lambda: True)
routes.http("/public/{projectKey}/assist/sessions", get=api.list_sessions, post=api.search, auth=True)
routes.http("/healthz", get=api.healthz)
server = Server(settings, routes, limits=limits)

class Transport:
    written = 0
    def write(self, data): self.written += len(data)
    def close(self): pass
    def abort(self): pass
    def is_closing(self): return False
    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 5555) if name == "peername" else default
    def pause_reading(self): pass
    def resume_reading(self): pass
    def get_write_buffer_size(self): return 0

conn = HttpConnection(server)
transport = Transport()
conn.connection_made(transport)
path = b"/public/p/assist/sessions?limit=10&sortBy=timestamp" if kind == "search" else b"/healthz"
request = (b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n"
           b"Authorization: Bearer k\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n")
# No collection in the loop: where one falls would move the count between runs.
gc.disable()
started = time.perf_counter()
for _ in range(rounds):
    conn.data_received(request)
elapsed = time.perf_counter() - started
assert transport.written > 0 or rounds == 0
print(f"wall {elapsed / max(rounds, 1) * 1e6:.2f}", file=sys.stderr)
"""

ROUNDS = 2000
KINDS = {"search": "GET search, 200 sessions, limit 10", "healthz": "GET /healthz"}


def run_child(tree: str, kind: str, rounds: int, child: str, callgrind: bool) -> tuple[int, float]:
    """(instructions, wall µs per request) of one child run."""
    # One hash seed: dict and set layouts, so instruction counts, repeat.
    stderr = bench_instructions.run_child(tree, kind, rounds, child, callgrind, {"PYTHONHASHSEED": "0"})
    if not callgrind:
        wall = re.search(r"wall ([\d.]+)", stderr)
        assert wall is not None
        return 0, float(wall.group(1))
    return bench_instructions.collected(stderr), 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs="+", help="checkouts of this repository to compare")
    parser.add_argument("--wall-rounds", type=int, default=20_000, help="requests in the timed loop")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CHILD)
        child = f.name
    try:
        print("| tree | request | instructions per request | wall µs per request (best of 3) |")
        print("|---|---|---|---|")
        for kind in KINDS:
            for tree in args.trees:
                setup, _ = run_child(tree, kind, 0, child, callgrind=True)
                loop, _ = run_child(tree, kind, ROUNDS, child, callgrind=True)
                wall = min(
                    run_child(tree, kind, args.wall_rounds, child, callgrind=False)[1] for _ in range(3)
                )
                print(f"| {tree} | {KINDS[kind]} | {(loop - setup) / ROUNDS:,.0f} | {wall:.2f} |")
    finally:
        os.unlink(child)


if __name__ == "__main__":
    main()
