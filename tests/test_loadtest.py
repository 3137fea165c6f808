"""Small, fast runs of every loadtest scenario against real hub processes, checking the JSON result.

First, the orchestrator's I/O-free parts driven directly: the count check's
band, a per-second point, latencies, what fails a run, a worker's decoding.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest

from loadtest.checks import band, failed, project_band
from loadtest.fleet import Totals
from loadtest.options import zipf_weights
from loadtest.stats import Latencies, pct
from loadtest.swarm import AgentMessage, Reply, Worker, WorkerConfig, weighted_project
from loadtest.timeseries import Timeseries
from tests.helpers import API_KEY, HubProcess, http
from tests.redis_server import have_redis

ROOT = Path(__file__).resolve().parent.parent


def totals(live: int, starting: int = 0, ramped: bool = True, **sent: int) -> Totals:
    return Totals(
        connected=live + starting, live=live, starting=starting, ramped=ramped, sent=Counter(sent),
        received=0, errors=Counter(), agents_open=0, agent_events=Counter(), backlog=0,
    )  # fmt: skip


def test_count_band_holds_starts_in_flight_and_reports_landing_meanwhile() -> None:
    assert band(totals(100, 5), totals(100, 5), 1000) == (100, 105)
    # Reports landed while the hub answered: the band covers both reads.
    assert band(totals(100, 5), totals(103), 1000) == (100, 105)
    assert band(totals(100), totals(90, 2), 1000) == (90, 100)
    # While the swarm ramps up, its reports trail the hub: anything up to every tracker.
    assert band(totals(100, 5, ramped=False), totals(150, 5), 1000) == (100, 1000)


def test_a_point_counts_frames_per_second_not_churn_events() -> None:
    series = Timeseries(t0=time.monotonic())
    first = series.add(1.0, totals(10, start=10, churn_reload=3, reload_skipped=1), {}, 10, None)
    assert first["sent_total"] == 10 and first["msgs_per_s"] == 10.0 and first["hub_total"] == 10
    second = series.add(
        2.0, totals(10, start=12, heartbeat=8, churn_reload=5), {"connect": [4.0, 2.0]}, None, {"hub_fds": 7}
    )
    assert second["sent_total"] == 20 and second["msgs_per_s"] == 5.0
    assert second["connect_p50"] == 2.0 and second["connect_p99"] == 4.0 and second["search_p99"] is None
    assert "hub_total" not in second and second["hub_fds"] == 7
    assert series.peak("hub_fds", None) == 7 and series.peak("live", 0) == 10


def test_latencies_keep_the_run_and_hand_out_each_second() -> None:
    latencies = Latencies()
    latencies.add("connect", [1.0, 3.0])
    assert latencies.take_tick()["connect"] == [1.0, 3.0]
    latencies.add("connect", [2.0])
    assert latencies.take_tick()["connect"] == [2.0] and latencies.take_tick()["connect"] == []
    assert latencies.whole["connect"] == [1.0, 3.0, 2.0]
    assert pct([float(i) for i in range(1, 101)], 99) == 99.0 and pct([], 50) is None


def test_any_mismatch_fails_a_run_but_a_skipped_final_check_does_not() -> None:
    ok = {"count_mismatches": 0, "sample_missing": 0, "final": {"ok": True}}
    assert not failed(ok)
    assert not failed({**ok, "final": {"skipped": "baseline has no search"}})
    assert failed({**ok, "count_mismatches": 1})
    assert failed({**ok, "sample_missing": 1})
    assert failed({**ok, "final": {"ok": False, "missing": 1}})
    assert failed({**ok, "final": {"error": "RuntimeError: HTTP 500"}})


async def test_a_worker_counts_frames_it_cannot_decode() -> None:
    worker = Worker(WorkerConfig(worker=0, seed=1, targets=[], projects=[], api_key="", first=0, trackers=0))
    replies, agent_messages = msgspec.json.Decoder(Reply), msgspec.json.Decoder(AgentMessage)
    reply = worker.receive(replies, b'{"type":"started"}', "bad_frame")
    assert reply is not None and reply.type == "started"
    assert worker.receive(replies, b"not json", "bad_frame") is None
    assert worker.receive(agent_messages, b'{"type":5}', "agent_bad_frame") is None
    assert worker.received == 3 and worker.errors == {"bad_frame": 1, "agent_bad_frame": 1}


def loadtest(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadtest", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_against(hub: HubProcess, scenario: str, out: Path, *args: str) -> tuple[int, dict[str, Any]]:
    proc = loadtest(
        scenario,
        "--target",
        f"ws://127.0.0.1:{hub.port}",
        "--api-key",
        API_KEY,
        "--quiet",
        "--check-interval",
        "0.5",
        "--out",
        str(out),
        *args,
    )
    assert out.exists(), proc.stderr[-3000:]
    return proc.returncode, json.loads(out.read_text())


def assert_checks_pass(result: dict[str, Any], live: int) -> None:
    checks = result["checks"]
    assert checks["count_checks"] > 0 and checks["count_mismatches"] == 0, checks
    assert checks["sampled"] > 0 and checks["sample_missing"] == 0, checks
    final = checks["final"]
    assert final["ok"] and final["expected"] == live and final["hub_total"] == [live], final


async def test_trackers_with_churn_and_checks(tmp_path: Path) -> None:
    with HubProcess("--api-key", API_KEY) as hub:
        hub.wait_ready()
        rc, result = run_against(
            hub, "trackers", tmp_path / "t.json",
            "-n", "200", "--ramp", "400", "--heartbeat", "0.5", "--duration", "3",
            "--reloads", "4", "--tabs", "4", "--drops", "2", "--ends", "4", "--updates", "8",
        )  # fmt: skip
        assert rc == 0, result["checks"]
        summary = result["summary"]
        assert summary["max_live"] == 200 and summary["errors"] == {}
        sent = summary["sent"]
        assert sent["heartbeat"] > 200 and sent["start"] >= 200
        for kind in ("reload", "tab", "drop", "end", "update"):
            assert sent.get(f"churn_{kind}", 0) > 0, kind
        assert summary["connect_ms"]["n"] >= 200
        # The hub was found by its port: its memory is reported.
        assert summary["memory"]["live"] == 200 and summary["memory"]["kib_per_session"] > 0
        assert_checks_pass(result, 200)
        # The swarm ends its sessions when it stops: the next run starts clean.
        reply = await http(hub.port, "POST", "/public/loadtest/assist/sessions", {"limit": 1})
        assert reply.json()["data"]["total"] == 0


def test_agents_receive_snapshot_and_stream(tmp_path: Path) -> None:
    with HubProcess("--api-key", API_KEY) as hub:
        hub.wait_ready()
        rc, result = run_against(
            hub, "agents", tmp_path / "a.json", "-n", "100", "--agents", "8", "--duration", "2"
        )
        assert rc == 0, result["checks"]
        summary = result["summary"]
        assert summary["agents_open"] == 8
        assert summary["agent_events"]["snapshot"] == 8
        assert summary["agent_events"]["session.start"] >= 100
        assert summary["fanout_ms"]["n"] > 0 and summary["snapshot_ms"]["n"] == 8
        assert_checks_pass(result, 100)


def test_search_mix(tmp_path: Path) -> None:
    with HubProcess("--api-key", API_KEY) as hub:
        hub.wait_ready()
        rc, result = run_against(
            hub, "search", tmp_path / "s.json", "-n", "200", "--qps", "60", "--duration", "2"
        )
        assert rc == 0, result["checks"]
        summary = result["summary"]
        assert summary["search_errors"] == {}
        assert summary["search_ms"]["n"] >= 60
        assert set(summary["search_by_kind_ms"]) >= {"list", "userId"}


def test_mixed(tmp_path: Path) -> None:
    with HubProcess("--api-key", API_KEY) as hub:
        hub.wait_ready()
        rc, result = run_against(
            hub, "mixed", tmp_path / "m.json", "-n", "150", "--agents", "4", "--qps", "20", "--duration", "2"
        )
        assert rc == 0, result["checks"]
        assert result["summary"]["agents_open"] == 4 and result["summary"]["search_ms"]["n"] > 0
        assert_checks_pass(result, 150)


def test_hub_that_loses_sessions_is_reported(tmp_path: Path) -> None:
    # The hub ends dropped sessions after 1 s, while the swarm comes back within 0.2-5 s (its 30 s grace):
    # the hub then holds fewer sessions than the swarm believes, and the run must say so.
    with HubProcess("--api-key", API_KEY, "--grace", "1", "--sweep-interval", "0.1") as hub:
        hub.wait_ready()
        rc, result = run_against(
            hub, "trackers", tmp_path / "x.json", "-n", "100", "--drops", "30", "--duration", "3"
        )
        assert rc == 1
        assert result["checks"]["count_mismatches"] > 0
        example = result["checks"]["count_mismatch_examples"][0]
        assert example["hub_total"] < example["believed"][0]


def test_storm_and_report(tmp_path: Path) -> None:
    out = tmp_path / "storm.json"
    proc = loadtest("storm", "--spawn", "hub", "-n", "1000", "--duration", "1", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert summary["max_live"] == 1000 and summary["errors"] == {}
    assert 0 < summary["all_registered_s"] < 30
    assert result["server"]["command"].startswith("python -m hub serve")
    assert_checks_pass(result, 1000)

    plots = tmp_path / "plots"
    report = loadtest("report", str(out), "--plots", str(plots))
    assert report.returncode == 0, report.stderr
    row = next(line for line in report.stdout.splitlines() if line.startswith("| storm.json"))
    assert "| storm | 1000 |" in row and "final: all 1000 found" in row
    assert (plots / "latency.png").stat().st_size > 1000
    assert (plots / "memory.png").stat().st_size > 1000


def test_ingest_compares_hub_with_baseline(tmp_path: Path) -> None:
    out = tmp_path / "ingest.json"
    proc = loadtest(
        "ingest",
        "-n",
        "100",
        "--ramp",
        "1000",
        "--ladder",
        "300,600",
        "--step",
        "1",
        "--quiet",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for kind in ("baseline", "hub"):
        server = result["servers"][kind]
        assert server["sessions"] == 100
        assert [s["offered"] for s in server["steps"]] == [300, 600]
        assert all(s["achieved"] > 0.8 * s["offered"] for s in server["steps"])
        assert all(s["probe_p50_ms"] is not None for s in server["steps"])
    report = loadtest("report", str(out))
    assert "| ingest.json | hub | 100 |" in report.stdout


def test_refuses_targets_off_this_machine(tmp_path: Path) -> None:
    proc = loadtest(
        "trackers", "--target", "ws://10.1.2.3:9001", "--api-key", "k", "--out", str(tmp_path / "r.json")
    )
    assert proc.returncode == 2
    assert "not a loopback address" in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_bounds_are_enforced() -> None:
    proc = loadtest("trackers", "--spawn", "hub", "-n", "1000000")
    assert proc.returncode == 2 and "--trackers must be" in proc.stderr
    proc = loadtest("trackers", "--spawn", "hub", "--duration", "100000")
    assert proc.returncode == 2 and "--duration" in proc.stderr


def test_independent_hubs_add_up(tmp_path: Path) -> None:
    out = tmp_path / "sharded.json"
    proc = loadtest(
        "trackers", "--spawn", "hub", "--hubs", "2", "-n", "120", "--ends", "5", "--duration", "2",
        "--check-interval", "0.5", "--quiet", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["options"]["sharded"] and len(result["options"]["targets"]) == 2
    final = result["checks"]["final"]
    assert final["ok"] and final["hub_total"] == 120 and result["checks"]["count_mismatches"] == 0


# --projects-zipf (issue 16, figure 1): projects of Zipf-like sizes, checks per project -------------


def test_zipf_shares_put_40_percent_on_the_largest_and_any_run_of_trackers_splits_alike() -> None:
    weights = zipf_weights(20)
    assert abs(weights[0] - 0.4) < 1e-6 and abs(sum(weights) - 1) < 1e-9
    assert all(a > b for a, b in itertools.pairwise(weights))
    assert zipf_weights(2) == [0.5, 0.5] and zipf_weights(1) == [1.0]
    cumulative = list(itertools.accumulate(weights))
    # A worker's share (consecutive indexes) splits over the projects as the shares do.
    counts = Counter(weighted_project(i, cumulative) for i in range(30_000, 45_000))
    assert len(counts) == 20
    for k, share in enumerate(weights):
        assert abs(counts[k] / 15_000 - share) < 0.002, k


def test_project_band_reads_the_keys_it_is_given() -> None:
    def by(live: dict[str, int], starting: dict[str, int], ramped: bool = True) -> Totals:
        t = totals(sum(live.values()), sum(starting.values()), ramped)
        t.live_by, t.starting_by = Counter(live), Counter(starting)
        return t

    before = by({"0:a": 10, "0:b": 5}, {"0:a": 2})
    after = by({"0:a": 11, "0:b": 5}, {"0:a": 1})
    assert project_band(before, after, ["0:a"], 100) == (10, 12)
    assert project_band(before, after, ["0:b"], 100) == (5, 5)
    assert project_band(by({"0:a": 3}, {}, ramped=False), after, ["0:a"], 40) == (3, 40)


def zipf_checks_pass(result: dict[str, Any], live: int, projects: int) -> dict[str, Any]:
    checks = result["checks"]
    assert checks["allowance_s"] == 1.0
    assert checks["count_checks"] > 0 and checks["count_mismatches"] == 0, checks
    assert checks["sampled"] > 0 and checks["sample_missing"] == 0, checks
    final = checks["final"]
    assert final["ok"] and final["expected"] == live, final
    assert sorted(final["by_project"]) == [f"zipf-{k:02d}" for k in range(projects)]
    assert sum(p["expected"] for p in final["by_project"].values()) == live
    largest = final["by_project"]["zipf-00"]["expected"]
    assert largest == max(p["expected"] for p in final["by_project"].values())
    assert result["projects"]["zipf-00"]["trackers"] == largest
    return final


@pytest.mark.skipif(not have_redis(), reason="redis-server is not installed")
def test_zipf_projects_over_workers_with_a_redis_of_its_own(tmp_path: Path) -> None:
    out = tmp_path / "zipf.json"
    proc = loadtest(
        "mixed", "--spawn", "hub", "--redis", "--hub-args", "--workers 2", "--projects-zipf", "4",
        "-n", "240", "--agents", "8", "--qps", "20", "--fresh-searches", "--duration", "4",
        "--steady-skip", "1", "--check-interval", "0.5", "--quiet", "--out", str(out),
        timeout=120,
    )  # fmt: skip
    assert out.exists(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert proc.returncode == 0, result["checks"]
    # Its own redis-server on a free port, handed to the hub: never 6379.
    hub_args = result["options"]["hub_args"]
    assert "--redis-url redis://127.0.0.1:" in hub_args and ":6379" not in hub_args
    assert not result["options"]["sharded"]
    final = zipf_checks_pass(result, 240, 4)
    # Two agents per project; each project's first follows the whole project and holds every session.
    agents = final["agents"]
    assert agents == {**agents, "whole_project_agents": 4, "projects_covered": 4, "sessions_held": 240}
    summary = result["summary"]
    assert summary["agents_open"] == 8 and summary["errors"] == {} and summary["search_errors"] == {}
    searched = {p for p, v in result["projects"].items() if v["search_ms"]["n"]}
    assert searched == {f"zipf-0{k}" for k in range(4)}
    steady = summary["steady"]
    # The mixed swarm ends and restarts sessions: one restarting at a snapshot is not live then.
    assert steady["seconds"] >= 1 and 236 <= min(steady["live"]) <= max(steady["live"]) <= 240
    assert "redis_cpu_pct" in steady
    assert len(steady["hub_cpu_pct_per_process"]) == 3  # the parent and its 2 workers
    assert summary["redis"]["memory"]["live"] == 240
    # Every worker's /metrics: each holds its own trackers, and the index covers what it mirrors.
    metrics = result["processes"]["metrics"]
    assert [m["hub_worker_index"] for m in metrics] == [0, 1]
    # A tab that came back on the other worker is held there, and waits out its grace on the
    # one it left (which does not mirror the project, so it does not see the resume).
    local = sum(m["hub_local_sessions"] for m in metrics)
    assert 240 <= local <= 240 + sum(m["hub_disconnected_sessions"] for m in metrics)
    assert all(m["hub_live_sessions"] >= m["hub_local_sessions"] for m in metrics)
    assert sum(m['hub_handoff_total{result="received"}'] for m in metrics) > 0


def test_zipf_projects_over_independent_hubs_add_up(tmp_path: Path) -> None:
    out = tmp_path / "zipf-sharded.json"
    proc = loadtest(
        "mixed", "--spawn", "hub", "--hubs", "2", "--projects-zipf", "3", "-n", "150", "--agents", "6",
        "--qps", "10", "--duration", "4", "--steady-window", "2", "--check-interval", "0.5", "--quiet",
        "--swarm-idle", "--out", str(out),
        timeout=120,
    )  # fmt: skip
    assert out.exists(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert proc.returncode == 0, result["checks"]
    assert result["options"]["sharded"]
    final = zipf_checks_pass(result, 150, 3)
    assert final["hub_total"] == 150
    assert all(sum(p["hub_total"]) == p["expected"] for p in final["by_project"].values())
    # Sharded: an agent holds its own hub's part of its project.
    agents = final["agents"]
    assert agents["ok"] and agents["whole_project_agents"] == 3 and 0 < agents["sessions_held"] < 150
    assert len(result["processes"]["metrics"]) == 2
    # The steady window was the hold's last 2 s, quiet: no search and no check ran in it.
    steady = result["summary"]["steady"]
    assert steady["quiet"] and 1.5 <= steady["seconds"] <= 3.5 and len(steady["hub_cpu_pct_per_process"]) == 2
    last = result["timeseries"][-1]
    assert last["search_p50"] is None and "hub_total" not in last
    # The searches' window ends where the steady one starts; each side's wait for a CPU is read
    # from the kernel (/proc/<pid>/schedstat), for the hub per ms of CPU it used.
    searched = result["summary"]["search_window"]
    assert 0.5 <= searched["seconds"] <= 3.5 and searched["hub_cpu_pct"] > 0
    # 10/s in that window only (the hold's first 2 s, later if the machine is slow).
    assert 0 < result["summary"]["search_ms"]["n"] <= 10 * searched["seconds"] + 3
    for window in (searched, steady):
        assert window["swarm_policy"] == ["idle"]  # as the kernel has it
        assert window["hub_wait_ms_per_s"] >= 0 and window["swarm_wait_ms_per_s"] >= 0
        assert window["hub_wait_per_cpu"] >= 0


def test_the_allowance_does_not_hide_a_hub_that_loses_sessions(tmp_path: Path) -> None:
    # As test_hub_that_loses_sessions_is_reported, per project: dropped sessions end after 1 s on the hub,
    # the swarm comes back within 0.2-5 s; a 1 s allowance must not cover it.
    with HubProcess("--api-key", API_KEY, "--grace", "1", "--sweep-interval", "0.1") as hub:
        hub.wait_ready()
        rc, result = run_against(
            hub, "trackers", tmp_path / "x.json", "-n", "100", "--drops", "30", "--duration", "4",
            "--projects-zipf", "3",
        )  # fmt: skip
        assert rc == 1
        checks = result["checks"]
        assert checks["allowance_s"] == 1.0 and checks["count_mismatches"] > 0
        example = checks["count_mismatch_examples"][0]
        assert example["project"].startswith("zipf-") and example["hub_total"] < example["believed"][0]


def test_zipf_options_are_checked() -> None:
    proc = loadtest("trackers", "--redis", "--api-key", "k")
    assert proc.returncode == 2 and "--redis" in proc.stderr
    proc = loadtest("trackers", "--spawn", "hub", "--allowance", "60")
    assert proc.returncode == 2 and "--allowance" in proc.stderr


@pytest.mark.skipif(not have_redis(), reason="redis-server not installed")
def test_sigterm_stops_what_the_run_started(tmp_path: Path) -> None:
    args = ["trackers", "--spawn", "hub", "--redis", "--hub-args", "--workers 2", "-n", "20"]
    args += ["--duration", "120", "--quiet", "--out", str(tmp_path / "t.json")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    run = psutil.Process(proc.pid)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        # Its swarm starts once its redis-server and its hub (a parent and 2 workers) run.
        while not any("_worker" in " ".join(p.cmdline()) for p in run.children()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        started = run.children(recursive=True)
        assert any(p.name() == "redis-server" for p in started)
        assert len(started) >= 5, started  # redis-server, the hub and its workers, the swarm
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 143 and "terminated" in stderr, stderr[-2000:]
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive
    finally:
        for p in [run, *started]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
