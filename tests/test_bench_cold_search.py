"""loadtest.bench_cold_search at a tiny size, against real redis-server and hub nodes, so the
benchmark cannot rot. No latency is judged here: only that each repetition was a cold search
(the node read both holders' parts) answering exactly as a warm node does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_server import have_redis

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not have_redis(), reason="needs redis-server and redis-cli")


def test_cold_then_warm_searches(tmp_path: Path) -> None:
    out = tmp_path / "cold.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "loadtest.bench_cold_search", "--sizes", "40,400", "--reps", "2",
            "--mirror-idle", "0.3", "--out", str(out),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["sessions"] for r in result["sizes"]] == [40, 400]
    for r in result["sizes"]:
        assert r["reps"] == 2 and r["answers_equal"] is True
        # Every first search read both holders' parts: it was cold each time.
        assert r["snapshot_reads_per_cold_search"] == [2.0]
        assert r["first"]["p50"] > 0 and r["second_over_warm"] > 0
    assert "| 400 | 2 |" in proc.stdout
