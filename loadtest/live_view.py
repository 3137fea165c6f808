"""What a run shows as it goes: a two-column table on stderr that fits 80 columns, redrawn each second.

With ``--quiet``, a JSON line of the latest point every 10 s instead.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table


def _text(v: Any) -> str:
    return "-" if v is None else str(v)


def table(title: str, point: dict[str, Any], errors: Counter[str], mismatches: tuple[int, int]) -> Table:
    """The latest point, the most frequent errors, and the checks' mismatches (count, sample)."""
    p, f = point, _text
    out = Table(title=title, show_header=False)
    out.add_column("what", style="bold")
    out.add_column("value", justify="right")
    out.add_column("what", style="bold")
    out.add_column("value", justify="right")
    rows = [
        ("elapsed s", f(p["t"]), "load average", f(p["loadavg"])),
        ("connected", f(p["connected"]), "agents", f(p["agents"])),
        ("live (swarm)", f(p["live"]), "hub total", f(p.get("hub_total"))),
        ("msgs/s sent", f(p["msgs_per_s"]), "msgs/s received", f(p["recv_per_s"])),
        (
            "connect p50/p99 ms",
            f"{f(p['connect_p50'])} / {f(p['connect_p99'])}",
            "search p50/p99 ms",
            f"{f(p['search_p50'])} / {f(p['search_p99'])}",
        ),
        ("hub RSS MiB", f(p.get("hub_rss_mib")), "KiB per session", f(p.get("kib_per_session"))),
        ("hub CPU %", f(p.get("hub_cpu_pct")), "fan-out p99 ms", f(p["fanout_p99"])),
        ("errors", f(p["errors"]), "check mismatches", f"{mismatches[0]} count, {mismatches[1]} sample"),
    ]
    for row in rows:
        out.add_row(*row)
    if errors:
        out.caption = "errors: " + ", ".join(f"{k}={v}" for k, v in errors.most_common(6))
    return out


class LiveView:
    """A context: the table while it is open (or the quiet lines), warnings in red."""

    def __init__(self, title: str, quiet: bool) -> None:
        self.title = title
        self.console = Console(stderr=True)
        self.live = None if quiet else Live(console=self.console, auto_refresh=False, transient=False)
        self.shown = 0

    def __enter__(self) -> LiveView:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.live is not None:
            self.live.__exit__(kind, exc, tb)

    def show(self, point: dict[str, Any], errors: Counter[str], mismatches: tuple[int, int]) -> None:
        self.shown += 1
        if self.live is not None:
            self.live.update(table(self.title, point, errors, mismatches), refresh=True)
        elif self.shown % 10 == 0:
            print(f"loadtest: {json.dumps(point)}", file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        self.console.print(f"[red]{text}[/red]")
