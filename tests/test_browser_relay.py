"""The live relay in the browser (CONTRACT §7): tracker.js streams a watched page, the dashboard
watches it and messages its user; in Debian's headless Chromium, like ``test_browser``, whose
fixtures and page this reuses.

Whether the page streams is read from the hub's ``hub_relay_events_total`` (every tab event the
relay accepted, watched or not): it must not move while no agent is joined.
"""

from __future__ import annotations

import json
import re
from contextlib import AsyncExitStack
from typing import Any

import websockets
from playwright.async_api import BrowserContext, Page, expect

from tests import test_browser
from tests.helpers import API_KEY, FrameLog, RunningHub, http, running_hub, wait_for
from tests.test_browser import ARTIFACTS, Trackers, browser, open_dashboard, open_shop, row, shop_site

pytestmark = test_browser.pytestmark
__all__ = ["browser"]  # the fixture, found by pytest in this module's namespace

SECRET = "4111-1111-secret"

# A payment form for the shop page: what the user types must never reach an agent.
FORM = """() => {
    const form = document.createElement("form");
    form.id = "pay";
    form.innerHTML = `
        <label id="card-label">Card number <input id="card" name="card"></label>
        <textarea id="note"></textarea>
        <div id="editor" contenteditable="true">Write here</div>
        <p class="hint" data-hub-private>Private: account 991</p>
        <button id="pay-now" type="button"><span>Pay   now</span></button>`;
    document.body.appendChild(form);
}"""


async def metric(h: RunningHub, name: str, labels: str = "") -> float:
    """A counter of /metrics, summed over the series whose labels contain ``labels``."""
    text = (await http(h.port, "GET", "/metrics", key=None)).body.decode()
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + " ") or line.startswith(name + "{")) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def settled(h: RunningHub, page: Page, user: str) -> None:
    """Whatever the page sent before now has reached the hub: an ``update`` sent after it has."""
    await page.evaluate("user => HubTracker.identify(user)", user)

    async def seen() -> bool:
        session: dict[str, Any] = (await h.search("shop"))["sessions"][0]
        return bool(session["userID"] == user)

    await wait_for(seen)


async def join(h: RunningHub, sid: str) -> FrameLog:
    ws = await websockets.connect(
        h.agent_url("shop"), additional_headers={"Authorization": f"Bearer {API_KEY}"}
    )
    log = FrameLog(ws)
    await ws.send(json.dumps({"type": "join", "sessionID": sid, "agent": {"name": "Dana"}}))
    await wait_for(lambda: any(f["type"] == "joined" for f in log.frames))
    return log


def events(log: FrameLog, name: str) -> list[Any]:
    return [f["data"] for f in log.frames if f["type"] == "session.event" and f["event"] == name]


async def test_dashboard_watches_the_page_and_messages_its_user(browser: BrowserContext) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    async with running_hub() as h:
        with shop_site(h) as site:
            shop = await open_shop(browser, site)
            sid = await shop.evaluate("HubTracker.sessionID")
            tab = await shop.evaluate("HubTracker.tabID")
            dash = await open_dashboard(browser, h)
            # A CSP violation (inline style or script) or an exception in dashboard.js shows here.
            problems: list[str] = []
            dash.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            dash.on("pageerror", lambda e: problems.append(str(e)))
            await row(dash, sid).click()
            await dash.click("#watch-open")
            await expect(dash.locator("#watch-state")).to_contain_text("watching")
            await expect(dash.locator("#watch-tabs li")).to_have_text([tab])
            # The page learns who watches it: the name the dashboard joined with.
            await shop.wait_for_function("HubTracker.agents().length === 1")
            assert (await shop.evaluate("HubTracker.agents()"))[0]["agent"] == {"name": "Support"}

            timeline = dash.locator("#timeline li")

            def entry(event: str) -> Any:
                return timeline.filter(has=dash.locator(".event", has_text=re.compile(f"^{event}$")))

            # The timeline starts with where the page is; then the page's own events.
            await expect(entry("navigate").last.locator(".summary")).to_have_text(f"Shop · Home — {site}/")
            await shop.click("#cart")
            await expect(entry("click").first.locator(".summary")).to_have_text("a#cart “Cart”")
            await expect(entry("click").first.locator(".tab")).to_have_text(tab[:10])
            await expect(entry("navigate").first.locator(".summary")).to_have_text(
                f"Shop · Cart — {site}/cart"
            )

            await shop.evaluate("console.error('payment failed', {code: 402})")
            await shop.evaluate("setTimeout(() => { throw new Error('kaboom'); })")
            await shop.evaluate("Promise.reject(new Error('card declined')); null")
            errors = entry("error").locator(".summary")
            await expect(errors).to_have_count(3)
            assert sorted(await errors.all_text_contents()) == [
                'console: payment failed {"code":402}',
                "rejection: Error: card declined",
                "uncaught: Uncaught Error: kaboom",
            ]

            await dash.fill("#message-text", "Hi Ann, I see the card was declined <b>here</b>")
            await dash.click("#message button[type=submit]")
            notice = shop.locator("#hub-tracker-notices [role=status]")
            await expect(notice).to_contain_text("Message from Support")
            # Text, never markup.
            await expect(notice.locator(".text")).to_have_text(
                "Hi Ann, I see the card was declined <b>here</b>"
            )
            await expect(entry("you").first.locator(".summary")).to_contain_text("card was declined")
            await dash.screenshot(path=str(ARTIFACTS / "dashboard-watch.png"))
            await shop.screenshot(path=str(ARTIFACTS / "tracker-notice.png"))
            await notice.get_by_role("button", name="Dismiss").click()
            await expect(notice).to_have_count(0)

            # Leaving the view leaves the session: the page stops streaming.
            await dash.click("#watch-back")
            await expect(dash.locator("#rows .row")).to_have_count(1)
            await shop.wait_for_function("HubTracker.agents().length === 0")
            before = await metric(h, "hub_relay_events_total")
            await shop.click("#cart")
            await settled(h, shop, "after-leave@example.com")
            assert await metric(h, "hub_relay_events_total") == before
            assert problems == []


async def test_unwatched_page_streams_nothing_and_typed_text_never_leaves_it(browser: BrowserContext) -> None:
    async with running_hub() as h:
        with shop_site(h) as site:
            shop = await open_shop(browser, site)
            sid = await shop.evaluate("HubTracker.sessionID")
            await shop.evaluate(FORM)

            # Nobody watches: clicks, typing, errors and navigation send no relay event.
            await shop.click("#pay-now")
            await shop.fill("#card", SECRET)
            await shop.evaluate("console.error('unwatched')")
            await shop.click("#cart")
            assert await shop.evaluate("HubTracker.emit('custom', {})") is False
            await settled(h, shop, "unwatched@example.com")
            assert await metric(h, "hub_relay_events_total") == 0

            agent = await join(h, sid)
            await shop.wait_for_function("HubTracker.agents().length === 1")
            assert (await shop.evaluate("HubTracker.agents()"))[0]["agent"] == {"name": "Dana"}
            await shop.click("#card")
            await shop.fill("#card", SECRET)
            await shop.locator("#card").press_sequentially("-more")
            await shop.click("#note")
            await shop.locator("#note").press_sequentially(SECRET)
            await shop.click("#editor")
            await shop.keyboard.type(SECRET)
            await shop.click("#card-label", position={"x": 4, "y": 4})  # its text, not its input
            await shop.click(".hint")
            await shop.click("#pay-now")
            await shop.evaluate("HubTracker.emit('done', {step: 'checkout'})")
            await wait_for(lambda: events(agent, "done"))

            clicks = events(agent, "click")
            assert {"path": "button#pay-now", "text": "Pay now"} in clicks
            for path in (
                "input#card",
                "textarea#note",
                "div#editor",
                "label#card-label",
                "form#pay > p.hint",
            ):
                assert {"path": path, "text": ""} in clicks, (path, clicks)
            assert events(agent, "done") == [{"step": "checkout"}]
            everything = json.dumps(agent.frames)
            assert SECRET not in everything and "991" not in everything
            assert await shop.locator("#card").input_value() == SECRET + "-more"

            await agent.ws.close()
            await shop.wait_for_function("HubTracker.agents().length === 0")
            before = await metric(h, "hub_relay_events_total")
            assert before > 0
            await shop.click("#pay-now")
            await settled(h, shop, "left@example.com")
            assert await metric(h, "hub_relay_events_total") == before


async def test_a_burst_is_capped_in_the_page_not_closed_by_the_hub(browser: BrowserContext) -> None:
    """300 events at once would pass the hub's message rate (100/s, 200 at once) and close the tab
    with 1008; the tracker sends 20 a second, queues 100, sends the same event once with a count,
    and reports what it dropped."""
    async with running_hub() as h:
        with shop_site(h) as site:
            shop = await open_shop(browser, site)
            agent = await join(h, await shop.evaluate("HubTracker.sessionID"))
            await shop.wait_for_function("HubTracker.agents().length === 1")
            accepted = await shop.evaluate(
                """() => {
                    let n = 0;
                    for (let i = 0; i < 50; i++) console.error("same error");
                    for (let i = 0; i < 300; i++) if (HubTracker.emit("tick", {i, pad: "x".repeat(100)})) n++;
                    return n;
                }"""
            )
            assert 50 < accepted < 300
            # Too big for one event: refused at once.
            assert await shop.evaluate("HubTracker.emit('big', 'x'.repeat(10000))") is False
            dropped = await wait_for(lambda: events(agent, "dropped"), timeout=15)
            ticks = events(agent, "tick")
            assert dropped == [{"count": 300 - accepted}] and len(ticks) == accepted
            assert [t["i"] for t in ticks] == list(range(accepted))
            repeats = [e.get("repeat", 1) for e in events(agent, "error")]
            assert sum(repeats) == 50 and len(repeats) < 50
            assert await shop.evaluate("window.startedCount") == 1
            assert await metric(h, "hub_relay_closes_total") == 0
            assert await metric(h, "hub_limits_reached_total", 'limit="rate_limit"') == 0
            assert await metric(h, "hub_connections_closed_total", 'code="1008"') == 0
            await agent.ws.close()


async def test_a_reload_keeps_the_tab_and_its_watchers_a_duplicated_tab_gets_its_own(
    browser: BrowserContext,
) -> None:
    async with running_hub() as h:
        with shop_site(h) as site:
            shop = await open_shop(browser, site)
            sid = await shop.evaluate("HubTracker.sessionID")
            tab = await shop.evaluate("HubTracker.tabID")
            assert await shop.evaluate("sessionStorage.getItem('hubTracker:shop:tab')") == tab
            agent = await join(h, sid)
            await shop.wait_for_function("HubTracker.agents().length === 1")

            # The reloaded page is the same tab, and is told at once that it is watched.
            await shop.reload()
            await shop.wait_for_function("window.startedCount >= 1 && HubTracker.agents().length === 1")
            assert await shop.evaluate("HubTracker.tabID") == tab
            await shop.click("#cart")
            await wait_for(lambda: events(agent, "click"))
            assert {f["tab"] for f in agent.frames if f["type"] == "session.event"} == {tab}

            # A duplicated browser tab copies sessionStorage: the hub names the copy anew.
            copy = await browser.new_page()
            await copy.add_init_script(
                f"sessionStorage.setItem('hubTracker:shop', {json.dumps(sid)});"
                f"sessionStorage.setItem('hubTracker:shop:tab', {json.dumps(tab)});"
            )
            await copy.goto(site + "/")
            await copy.wait_for_function("window.startedCount >= 1 && HubTracker.agents().length === 1")
            assert await copy.evaluate("HubTracker.sessionID") == sid
            other = await copy.evaluate("HubTracker.tabID")
            assert other != tab
            assert await copy.evaluate("sessionStorage.getItem('hubTracker:shop:tab')") == other
            await agent.ws.close()


async def test_the_watch_view_says_when_it_fell_behind(browser: BrowserContext) -> None:
    """The dashboard's page is kept busy while a tab streams past its relay buffer: the hub drops
    its events, then tells it with ``session.gap``, which the view shows."""
    async with running_hub(relay_agent_buffer=64 << 10) as h, AsyncExitStack() as stack:
        tracker = await Trackers(h, stack).start("s-gap", userID="gap@example.com")
        dash = await open_dashboard(browser, h)
        await row(dash, "s-gap").click()
        await dash.click("#watch-open")
        await expect(dash.locator("#watch-state")).to_contain_text("watching")
        # Its main thread busy, Chromium stops reading the socket once its own buffers are full.
        await dash.evaluate(
            "() => { setTimeout(() => { const end = Date.now() + 3000; while (Date.now() < end); }); }"
        )
        pad = "x" * 6000
        for i in range(150):
            await tracker.send(json.dumps({"type": "emit", "event": "tick", "data": {"i": i, "pad": pad}}))
        gap = dash.locator("#watch-gap")
        await expect(gap).to_be_visible(timeout=15_000)
        await expect(gap).to_contain_text("events were dropped")

        # The view may fall behind more than once before it catches up: one gap row per
        # session.gap, and the notice adds up every event the hub dropped.
        async def settled() -> bool:
            gaps = await metric(h, "hub_relay_gaps_total")
            dropped = await metric(h, "hub_relay_dropped_total")
            rows = await dash.locator("#timeline li.gap").count()
            notice = await gap.text_content() or ""
            return gaps >= 1 and rows == gaps and notice.startswith(f"{int(dropped)} events were dropped")

        await wait_for(settled, timeout=15, what="the gap rows and the notice match the hub's counts")
