"""Autobahn|Testsuite's fuzzingclient against the hub's own WebSocket transport.

    make conformance
    python -m tests.autobahn --python2 PATH --autobahn DIR [--cases '1.*,6.*'] [--report DIR]

The hub's ``Server`` runs in this process with a route table of one route,
``/echo``, whose endpoint sends every message back (text as text, binary as
binary): a harness, never one of the product's routes. Everything else is
the product's transport: the HTTP phase, the upgrade, websockets' Sans-I/O
protocol, fragments, UTF-8 checks, read batching. ``wstest -m fuzzingclient``
(Python 2.7, installed into DIR by ``make conformance``) runs every case but
the performance and compression groups (9, 12, 13); the result is a table of
behaviours per case group, and the exit status is 1 unless every case is
OK, NON-STRICT or INFORMATIONAL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Final

from hub.auth import Auth
from hub.config import Settings
from hub.http_api import Request
from hub.routes import RouteTable
from hub.server import Server
from hub.websocket import WebSocketConnection

EXCLUDED: Final = ["9.*", "12.*", "13.*"]
PASSING: Final = {"OK", "NON-STRICT", "INFORMATIONAL"}
BEHAVIOURS: Final = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]

# The largest message of the groups that run (1.1.x, 10.1.1: 64 KiB) fits with room to spare.
SETTINGS: Final = Settings(port=0, max_frame=16 * 1024 * 1024, rate_limit=0)

WSTEST: Final = """
import site, sys
site.addsitedir(sys.argv[1])
from autobahntestsuite.wstest import run
sys.argv = ["wstest", "-m", "fuzzingclient", "-s", sys.argv[2]]
sys.exit(run())
"""


class Echo:
    """Sends every message back as it came."""

    __slots__ = ("conn",)
    idle_timeout: float | None = None
    keepalive: bool = False

    def __init__(self, conn: WebSocketConnection) -> None:
        self.conn = conn

    def receive(self, data: bytes, now: int) -> bytes | None:
        return data

    def receive_binary(self, data: bytes, now: int) -> bytes | None:
        self.conn.send_binary(data)
        return None

    def closed(self, now: int, timed_out: bool) -> None:
        pass

    def writable(self) -> None:
        pass


def echo_server() -> Server:
    routes = RouteTable(SETTINGS, Auth(""), accepting_websockets=lambda: True)

    def echo(_request: Request, conn: WebSocketConnection) -> Echo:
        return Echo(conn)

    routes.websocket("/echo", echo)
    return Server(SETTINGS, routes)


async def fuzz(python2: str, autobahn: Path, cases: list[str], report: Path) -> dict[str, dict[str, str]]:
    server = echo_server()
    await server.start()
    try:
        report.mkdir(parents=True, exist_ok=True)
        spec = report / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "outdir": str(report),
                    "servers": [{"agent": "hub", "url": f"ws://127.0.0.1:{server.port}/echo"}],
                    "cases": cases,
                    "exclude-cases": EXCLUDED,
                    "exclude-agent-cases": {},
                },
                indent=2,
            )
        )
        wstest = await asyncio.create_subprocess_exec(
            python2, "-c", WSTEST, str(autobahn), str(spec), stdout=asyncio.subprocess.DEVNULL
        )
        if await wstest.wait() != 0:
            raise SystemExit(f"wstest exited {wstest.returncode}")
    finally:
        server.stop_accepting()
        server.close_all(1001, "done")
        await server.wait_closed(2.0)
    results: dict[str, dict[str, str]] = json.loads((report / "index.json").read_text())["hub"]
    return results


def group(case: str) -> int:
    return int(case.split(".", 1)[0])


def table(results: dict[str, dict[str, str]]) -> str:
    """Cases by group and behaviour (the close behaviour in brackets where it differs)."""
    by_group: dict[int, Counter[str]] = {}
    for case, result in results.items():
        by_group.setdefault(group(case), Counter())[result["behavior"]] += 1
    total = Counter(result["behavior"] for result in results.values())
    lines = ["| group | cases | " + " | ".join(BEHAVIOURS) + " |", "|---" * (len(BEHAVIOURS) + 2) + "|"]
    for number in sorted(by_group):
        counts = by_group[number]
        cells = " | ".join(str(counts[b]) for b in BEHAVIOURS)
        lines.append(f"| {number} | {sum(counts.values())} | {cells} |")
    cells = " | ".join(f"**{total[b]}**" for b in BEHAVIOURS)
    lines.append(f"| all | **{sum(total.values())}** | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--python2", required=True, help="a Python 2.7 interpreter")
    parser.add_argument("--autobahn", type=Path, required=True, help="where autobahntestsuite is installed")
    parser.add_argument("--cases", default="*", help="comma-separated case patterns (default: all)")
    parser.add_argument("--report", type=Path, default=Path("test-artifacts/autobahn"))
    args = parser.parse_args()
    report = args.report.resolve()
    results = asyncio.run(fuzz(args.python2, args.autobahn.resolve(), args.cases.split(","), report))
    print(table(results))
    failing = {case: r["behavior"] for case, r in results.items() if r["behavior"] not in PASSING}
    closes = Counter(r["behaviorClose"] for r in results.values())
    print(f"\nclose behaviour: {dict(sorted(closes.items()))}; report: {report / 'index.html'}")
    if failing:
        print(f"failing: {failing}")
        sys.exit(1)


if __name__ == "__main__":
    main()
