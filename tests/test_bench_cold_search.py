"""loadtest.bench_cold_search at a tiny size, against real redis-server and hub nodes, so the
benchmark cannot rot. No latency is judged here: only that each repetition was a cold search
(the node read both holders' parts) answering exactly as a warm node does."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import run_bench
from tests.redis_server import have_redis

pytestmark = pytest.mark.skipif(not have_redis(), reason="needs redis-server and redis-cli")


def test_cold_then_warm_searches(tmp_path: Path) -> None:
    out = tmp_path / "cold.json"
    result, printed = run_bench(
        "bench_cold_search", "--sizes", "40,400", "--reps", "2",
        "--mirror-idle", "0.3",
        out=out, timeout=120,
    )  # fmt: skip
    assert [r["sessions"] for r in result["sizes"]] == [40, 400]
    for r in result["sizes"]:
        assert r["reps"] == 2 and r["answers_equal"] is True
        # Every first search read both holders' parts: it was cold each time.
        assert r["snapshot_reads_per_cold_search"] == [2.0]
        assert r["first"]["p50"] > 0 and r["second_over_warm"] > 0
    assert "| 400 | 2 |" in printed
