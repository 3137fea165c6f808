"""loadtest.bench_pauses at a tiny size against real hub processes, so the benchmark cannot rot.
No pause is judged here: only that both hubs (policy off, then on) served the swarm and had
their sweeps and collections timed over the hold."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import run_bench


def test_both_runs_are_timed_and_searched(tmp_path: Path) -> None:
    out = tmp_path / "pauses.json"
    result, _ = run_bench(
        "bench_pauses", "--trackers", "300", "--ramp", "1000",
        "--hold", "4",
        out=out, timeout=180,
    )  # fmt: skip
    assert [r["policy"] for r in result["runs"]] == ["off", "on"]
    for run in result["runs"]:
        assert run["search_ms"]["n"] > 0
        assert run["pauses_in_hold"]["sweep"]["n"] >= 2  # one sweep a second
        # With the policy on, the hub's own collection on each sweep (a full one, of what is not frozen).
        if run["policy"] == "on":
            assert run["pauses_in_hold"]["gen2"]["n"] >= 2
    assert result["search_p99_on_over_off"] > 0
