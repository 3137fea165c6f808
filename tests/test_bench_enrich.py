"""loadtest.bench_enrich --wired at a tiny size against real hub processes, so the benchmark cannot rot.

No figure is judged here (the 1.1x target is the benchmark's own report): only that every
case ran on its own hub and its records got what its enrichment finds (the benchmark checks
each started record and exits non-zero otherwise), and that it reports its numbers.
"""

from __future__ import annotations

from pathlib import Path

from loadtest.bench_enrich import BEFORE_CASES, CASES, DIAGNOSTIC_CASES
from tests.helpers import run_bench


def test_wired_cases_enrich_and_report(tmp_path: Path) -> None:
    out = tmp_path / "enrich.json"
    result, printed = run_bench(
        "bench_enrich", "--wired", "--diagnose", "--rounds", "2",
        "--trackers", "30", "--warmup", "25", "--distinct", "20",
        out=out, timeout=180,
    )  # fmt: skip
    assert set(result["cases"]) == {c.name for c in CASES + DIAGNOSTIC_CASES}
    for name, case in result["cases"].items():
        assert len(case["us_per_connect"]) == 2 and min(case["us_per_connect"]) > 0, name
        if name != "none":
            assert len(case["ratio_per_round"]) == 2 and case["ratio_of_bests"] > 0, name
    assert result["load_before"] and result["load_after"]
    assert "x without" in printed


def test_before_runs_the_with_cases_on_another_trees_hub_in_the_same_rounds(tmp_path: Path) -> None:
    out = tmp_path / "enrich.json"
    result, printed = run_bench(
        "bench_enrich", "--wired", "--rounds", "1", "--trackers", "20",
        "--warmup", "5", "--distinct", "10", "--before", "HEAD",
        out=out, timeout=180,
    )  # fmt: skip
    assert set(result["cases"]) == {c.name for c in CASES + BEFORE_CASES}
    for case in BEFORE_CASES:
        assert len(result["cases"][case.name]["now_per_round"]) == 1
    assert "ua now / before" in printed
