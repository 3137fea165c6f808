"""Dashboard responsiveness: N live sessions against a small baseline, same run, headless Chromium.

    python -m loadtest.bench_dashboard --sessions 5000 --baseline 50 --seconds 5

For each size: a hub process (``python -m hub serve``), that many tracker
WebSockets from this process each sending a realistic ``start``, then churn
(``--rate`` updates per second: page changes and active flips on random
sessions) while the dashboard is open in headless Chromium and scrolls its
table every frame. Measured in the page: time from Connect until the whole
snapshot is in the model, frame intervals (requestAnimationFrame), long
tasks (> 50 ms, PerformanceObserver), rows in the DOM and JS heap.
Figures are printed with the ratio of the large run to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import websockets
from playwright.async_api import async_playwright

from loadtest.chromium import FLAGS
from loadtest.procs import free_port

KEY = "bench-key"
COUNTRIES = ["DE", "FR", "US", "BR", "JP", "IN", "GB", "ES", "IT", "CA"]
BROWSERS = [("Chrome", "131.0"), ("Firefox", "133.0"), ("Safari", "18.1"), ("Edge", "131.0")]

SAMPLER = """seconds => new Promise(resolve => {
    const frames = [], longTasks = [];
    new PerformanceObserver(list => list.getEntries().forEach(e => longTasks.push(e.duration)))
        .observe({type: "longtask"});
    const viewport = document.getElementById("viewport");
    const end = performance.now() + seconds * 1000;
    let last = performance.now();
    function step(now) {
        frames.push(now - last);
        last = now;
        // Scroll every frame, wrapping: the table re-renders a new window each time.
        const range = Math.max(1, viewport.scrollHeight - viewport.clientHeight);
        viewport.scrollTop = (viewport.scrollTop + 97) % range;
        if (now < end) requestAnimationFrame(step);
        else resolve({frames, longTasks, rows: document.querySelectorAll("#rows .row").length,
                      heap: performance.memory ? performance.memory.usedJSHeapSize : 0});
    }
    requestAnimationFrame(step);
})"""


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


async def wait_http(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("hub did not start")


async def run_size(n: int, seconds: float, rate: float, chromium: str) -> dict[str, Any]:
    port = free_port()
    command = [sys.executable, "-m", "hub", "serve", "--port", str(port), "--api-key", KEY]
    hub = subprocess.Popen([*command, "--log-level", "warning"], stdout=subprocess.DEVNULL)
    conns: list[Any] = []
    try:
        await wait_http(port)
        url = f"ws://127.0.0.1:{port}/ws/tracker/bench"
        gate = asyncio.Semaphore(200)

        async def start(i: int) -> None:
            async with gate:
                ws = await websockets.connect(url, compression=None, max_queue=None)
                browser, version = BROWSERS[i % len(BROWSERS)]
                await ws.send(
                    json.dumps(
                        {
                            "type": "start",
                            "sessionID": f"s{i:06d}",
                            "userID": f"user{i}@example.com",
                            "userCountry": COUNTRIES[i % len(COUNTRIES)],
                            "userBrowser": browser,
                            "userBrowserVersion": version,
                            "userOs": "Windows",
                            "pageTitle": f"Product {i % 977}",
                            "url": f"https://shop.example.com/p/{i % 977}",
                            "metadata": {"plan": "pro" if i % 3 else "free"},
                        }
                    )
                )
                await ws.recv()
                conns.append(ws)

        await asyncio.gather(*(start(i) for i in range(n)))

        stop = asyncio.Event()

        async def churn() -> None:
            # Every 10 ms, rate/100 random sessions change page or flip active.
            per_tick = max(1, int(rate / 100))
            tick = 0
            while not stop.is_set():
                tick += 1
                for ws in random.sample(conns, min(per_tick, len(conns))):
                    msg: dict[str, Any]
                    if tick % 2:
                        msg = {"type": "update", "pageTitle": f"Page {tick}", "url": f"https://x/{tick}"}
                    else:
                        msg = {"type": "heartbeat", "active": bool(tick % 4)}
                    await ws.send(json.dumps(msg))
                await asyncio.sleep(0.01)

        async with async_playwright() as pw:
            context = await pw.chromium.launch_persistent_context(
                tempfile.mkdtemp(prefix="bench-dashboard-"),
                executable_path=chromium,
                headless=True,
                args=FLAGS,
                viewport={"width": 1280, "height": 800},
            )
            page = await context.new_page()
            await page.goto(f"http://127.0.0.1:{port}/dashboard?project=bench")
            await page.fill("#key", KEY)
            t0 = time.perf_counter()
            await page.click("#connect button[type=submit]")
            while not await page.evaluate(f"window.hubDashboard.count() === {n}"):
                await asyncio.sleep(0.005)
            loaded = time.perf_counter() - t0
            churner = asyncio.create_task(churn())
            sample = await page.evaluate(SAMPLER, seconds)
            stop.set()
            await churner
            await context.close()
        frames = sample["frames"][1:]
        return {
            "sessions": n,
            "snapshot_s": loaded,
            "frame_p50_ms": pct(frames, 50),
            "frame_p95_ms": pct(frames, 95),
            "frame_max_ms": max(frames) if frames else 0.0,
            "fps": len(frames) / seconds,
            "long_tasks": len(sample["longTasks"]),
            "long_task_ms": sum(sample["longTasks"]),
            "dom_rows": sample["rows"],
            "heap_mb": sample["heap"] / 2**20,
        }
    finally:
        for ws in conns:
            await ws.close()
        hub.terminate()
        hub.wait(10)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--baseline", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=1000.0, help="tracker updates/s while sampling")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    base = await run_size(args.baseline, args.seconds, args.rate, args.chromium)
    big = await run_size(args.sessions, args.seconds, args.rate, args.chromium)
    print(f"{'figure':<14} {'baseline':>10} {'large':>10} {'ratio':>7}")
    for name in base:
        b, g = base[name], big[name]
        ratio = f"{g / b:.2f}" if isinstance(b, (int, float)) and b else "-"
        print(f"{name:<14} {b:>10.2f} {g:>10.2f} {ratio:>7}")


if __name__ == "__main__":
    asyncio.run(main())
