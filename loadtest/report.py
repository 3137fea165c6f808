"""``python -m loadtest report``: result files to a Markdown table and PNG plots.

One row per run with its headline figures and its check results (never
hidden: a mismatch is a column); plots of latency over time and of hub
memory per live session, for BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _ms(p: dict[str, Any] | None, key: str) -> str:
    value = (p or {}).get(key)
    return "-" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _checks(result: dict[str, Any]) -> str:
    checks = result.get("checks")
    if not checks:
        return "-"
    final = checks.get("final", {})
    if "skipped" in final:
        final_text = "final: skipped"
    elif final.get("ok"):
        final_text = f"final: all {final.get('expected')} found"
    else:
        final_text = (
            f"final: {final.get('missing')} missing, {final.get('extra')} extra {final.get('error', '')}"
        )
    return (
        f"count {checks['count_checks'] - checks['count_mismatches']}/{checks['count_checks']} ok; "
        f"sample {checks['sampled'] - checks['sample_missing']}/{checks['sampled']} found; {final_text}"
    )


def swarm_row(path: str, r: dict[str, Any]) -> str:
    s = r["summary"]
    mem = s.get("memory") or {}
    load = r["machine"]["loadavg_before"][0], r["machine"]["loadavg_after"][0]
    errors = sum(s["errors"].values()) + sum(s.get("search_errors", {}).values())
    cells = [
        os.path.basename(path),
        r["scenario"],
        str(s["max_live"]),
        str(r["client_processes"]),
        f"{_ms(s['connect_ms'], 'p50')} / {_ms(s['connect_ms'], 'p99')}",
        f"{_ms(s['search_ms'], 'p50')} / {_ms(s['search_ms'], 'p99')}" if s["search_ms"]["n"] else "-",
        f"{_ms(s['fanout_ms'], 'p50')} / {_ms(s['fanout_ms'], 'p99')}" if s["fanout_ms"]["n"] else "-",
        "-" if s.get("all_registered_s") is None else f"{s['all_registered_s']:.2f}",
        "-" if mem.get("kib_per_session") is None else f"{mem['kib_per_session']:.2f}",
        "-" if s.get("hub_max_cpu_pct") is None else f"{s['hub_max_cpu_pct']:.0f}",
        str(errors),
        _checks(r),
        f"{load[0]:.1f} → {load[1]:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


SWARM_HEAD = (
    "| file | scenario | max live | client procs | connect+start p50 / p99 ms | search p50 / p99 ms "
    "| fan-out p50 / p99 ms | all registered s | hub KiB/session | hub max CPU % | errors | checks "
    "| load avg |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)

INGEST_HEAD = (
    "| file | server | sessions | best rate ≤ 80% CPU /s | CPU µs per heartbeat | capacity at 80% /s "
    "| hub / baseline | load avg |\n|---|---|---|---|---|---|---|---|"
)


def ingest_rows(path: str, r: dict[str, Any]) -> list[str]:
    load = r["machine"]["loadavg_before"][0], r["machine"]["loadavg_after"][0]
    rows = []
    for kind, srv in r["servers"].items():
        ratio = r["summary"]["ratio"] if kind == "hub" else 1.0
        rows.append(
            f"| {os.path.basename(path)} | {kind} | {srv['sessions']} | {srv['best_rate_under_80pct']} "
            f"| {srv['median_cpu_us_per_hb']} | {srv['capacity_at_80pct']} | {ratio} "
            f"| {load[0]:.1f} → {load[1]:.1f} |"
        )
    return rows


def markdown(results: list[tuple[str, dict[str, Any]]]) -> str:
    swarm = [swarm_row(p, r) for p, r in results if r["scenario"] != "ingest"]
    ingest = [row for p, r in results if r["scenario"] == "ingest" for row in ingest_rows(p, r)]
    parts = []
    if swarm:
        parts.append(SWARM_HEAD + "\n" + "\n".join(swarm))
    if ingest:
        parts.append(INGEST_HEAD + "\n" + "\n".join(ingest))
    return "\n\n".join(parts) + "\n"


Runs = list[tuple[str, list[dict[str, Any]]]]  # (name, time series)


def _latency(ax: Axes, runs: Runs) -> None:
    from matplotlib import colormaps

    tab20 = colormaps["tab20"]
    ax.set_prop_cycle(color=[tab20(i) for i in range(tab20.N)])
    for name, ts in runs:
        for key, style in (("search_p99", "-"), ("connect_p99", ":")):
            points = [(p["t"], p[key]) for p in ts if p.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=f"{name} {key.replace('_', ' ')}")
    ax.set_yscale("log")


def _memory(ax: Axes, runs: Runs) -> None:
    for name, ts in runs:
        points = [(p["live"], p["kib_per_session"]) for p in ts if p.get("kib_per_session")]
        points = [pt for pt in points if pt[0] >= 100]
        if points:
            ax.plot(*zip(*points, strict=True), ".-", label=name)
    ax.axhline(16, color="red", linestyle="--", linewidth=1, label="target 16 KiB")


# file name, title, x label, y label, what draws the lines
PLOTS: list[tuple[str, str, str, str, Callable[[Axes, Runs], None]]] = [
    ("latency", "Latency over time", "seconds into the run", "ms (p99 per second)", _latency),
    (
        "memory",
        "Hub memory per live session",
        "live tracker sessions",
        "hub RSS growth per session (KiB)",
        _memory,
    ),
]


def plots(results: list[tuple[str, dict[str, Any]]], directory: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    runs = [
        (os.path.splitext(os.path.basename(path))[0], r["timeseries"])
        for path, r in results
        if r.get("timeseries")
    ]
    if not runs:
        return []
    written = []
    for name, title, xlabel, ylabel, draw in PLOTS:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        draw(ax, runs)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out = os.path.join(directory, f"{name}.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def main(files: list[str], out: str, plot_dir: str) -> int:
    results = []
    for path in files:
        with open(path) as f:
            results.append((path, json.load(f)))
    text = markdown(results)
    if out:
        with open(out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    if plot_dir:
        try:
            written = plots(results, plot_dir)
        except ImportError:
            print(
                "loadtest report: matplotlib is not installed (pip install -e '.[loadtest]')", file=sys.stderr
            )
            return 2
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    return 0
