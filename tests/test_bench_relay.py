"""loadtest.bench_relay at a tiny size, every case against real servers, so the benchmark cannot rot.

No figure is judged here (speed targets are the benchmark's own report): only that each
case relays what it should, byte for byte, and reports its numbers.
"""

from __future__ import annotations

from pathlib import Path

from loadtest.bench_relay import CASES, THROUGHPUT_CASES
from tests.helpers import run_bench
from tests.redis_server import have_redis


def test_every_case_relays_and_reports(tmp_path: Path) -> None:
    cases = [c for c in CASES if have_redis() or c != "latency-cross"]
    out = tmp_path / "relay.json"
    result, _ = run_bench(
        "bench_relay", "--cases", ",".join(cases),
        "--sessions", "4", "--hot-rate", "100", "--latency-duration", "1",
        "--duration", "2", "--mb-per-s", "0.5",
        out=out, timeout=180,
    )  # fmt: skip
    assert set(result["cases"]) == set(cases)
    assert all(len(runs) == 1 for runs in result["cases"].values())
    cases_run = {name: runs[0] for name, runs in result["cases"].items()}
    for name, case in cases_run.items():
        assert case["latency_ms"]["n"] > 0 and case["latency_ms"]["p99"] is not None, name
        assert case["trackers"]["tracker_closes"] == {} and case["agents"]["agent_closes"] == {}, name
        assert case["server_cpu_s"] >= 0 and case["rss_mib"]["at_start"] > 0, name
        if name.endswith("-hub") or name == "latency-cross":
            # The hub counted what it relayed.
            assert case["relay_metrics"], name
    for name in THROUGHPUT_CASES:
        case = cases_run[name]
        agents = case["agents"]
        assert agents["checked"] == agents["frames"] > 0 and agents["bad"] == 0, agents
        assert case["relayed_mb"] > 0 and case["cpu_s_per_mb"] is not None
    for name in ("stall-bare", "stall-hub"):
        stalled = cases_run[name]["agents"]["stalled"]
        assert set(stalled) == {"closed", "close_code", "frames_read_after", "gaps"}, name
        assert cases_run[name]["timeline"] and cases_run[name]["p99_by_second_ms"], name
    summary = result["summary"]
    assert summary["bytes_bad"] == 0 and summary["bytes_checked"] > 0
    assert "throughput_hub_vs_bare" in summary and "stall-hub_p99_vs_healthy" in summary
    assert summary["same_node_p99_ms"] is not None
