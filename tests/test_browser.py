"""tracker.js and the dashboard, end to end in Debian's headless Chromium (driven by Playwright).

The hub runs in this event loop (``running_hub``). The tracker's test page
is served by a small HTTP server of its own on another port, so the tracker
works cross-origin like on a customer's site; it is a real loopback server
because Chromium refuses requests from a non-local page to a loopback hub.

Page visibility: headless Chromium keeps every page "visible" (background
tabs, minimized windows and CDP lifecycle states do not change it), so
``set_hidden`` overrides ``document.hidden``/``visibilityState`` in the page
and dispatches ``visibilitychange``, which is what the tracker listens to.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import websockets
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from hub.wire import CloseCode
from loadtest.chromium import FLAGS
from tests.helpers import API_KEY, RunningHub, running_hub, serve_site, wait_for

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (`make test` installs it with apt)"
)

PAGES = Path(__file__).parent / "pages"
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    """Chromium with a fresh profile (``--user-data-dir``) per test."""
    assert CHROMIUM is not None
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            tmp_path / "profile",
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 720},
        )
        try:
            yield context
        finally:
            await context.close()


@contextmanager
def shop_site(hub: RunningHub, heartbeat_ms: int = 1000) -> Iterator[str]:
    """Serves tests/pages/shop.html (filled with the hub's address) at every path; yields its origin."""
    html = (
        (PAGES / "shop.html")
        .read_text()
        .replace("{{HUB_HTTP}}", f"http://127.0.0.1:{hub.port}")
        .replace("{{HUB_WS}}", hub.url)
        .replace("{{HEARTBEAT}}", str(heartbeat_ms))
        .encode()
    )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/favicon.ico":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(html)))
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *args: Any) -> None:
            pass

    with serve_site(Handler) as origin:
        yield origin


async def open_shop(browser: BrowserContext, site: str, path: str = "/") -> Page:
    page = await browser.new_page()
    await page.goto(site + path)
    await page.wait_for_function("window.startedCount >= 1")
    return page


async def only_session(hub: RunningHub, project: str = "shop", **expect_fields: Any) -> dict[str, Any]:
    """The project's one live session, once it has ``expect_fields``."""

    async def check() -> dict[str, Any] | None:
        data = await hub.search(project)
        if data["total"] != 1:
            return None
        session: dict[str, Any] = data["sessions"][0]
        return session if all(session.get(k) == v for k, v in expect_fields.items()) else None

    result: dict[str, Any] = await wait_for(check)
    return result


async def set_hidden(page: Page, hidden: bool) -> None:
    await page.evaluate(
        """hidden => {
            Object.defineProperty(document, "hidden", {configurable: true, get: () => hidden});
            Object.defineProperty(document, "visibilityState",
                {configurable: true, get: () => hidden ? "hidden" : "visible"});
            document.dispatchEvent(new Event("visibilitychange"));
        }""",
        hidden,
    )


# --- tracker.js -------------------------------------------------------------


async def test_page_registers_session_with_its_details(browser: BrowserContext) -> None:
    async with running_hub() as h:
        with shop_site(h) as site:
            page = await open_shop(browser, site)
            session = await only_session(h, pageTitle="Shop · Home")
            sid = await page.evaluate("HubTracker.sessionID")
            assert session["sessionID"] == sid
            assert session["url"] == site + "/"
            assert session["userID"] == "ann@example.com"
            # Options' metadata and a setMetadata() called before start() both arrive.
            assert session["metadata"] == {"release": "42", "plan": "pro"}
            assert session["userBrowser"] == "Chrome" and session["userOs"] == "Linux"
            assert session["userDeviceType"] == "desktop"
            assert session["language"] == await page.evaluate("navigator.language")
            assert session["userAgent"] == await page.evaluate("navigator.userAgent")
            assert session["trackerVersion"] == await page.evaluate("HubTracker.version")
            assert session["active"] is True and session["connected"] is True

            # A single-page app navigates: pushState, then the new title.
            await page.click("#cart")
            await only_session(h, url=site + "/cart", pageTitle="Shop · Cart", referrer=site + "/")

            await page.evaluate("HubTracker.identify('bob@example.com')")
            await page.evaluate("HubTracker.setMetadata('plan', null)")
            await page.evaluate("HubTracker.setMetadata('cart', 3)")
            session = await only_session(h, userID="bob@example.com", metadata={"release": "42", "cart": "3"})
            assert session["sessionID"] == sid

            # Back button: popstate.
            await page.go_back()
            await only_session(h, url=site + "/")


async def test_reload_keeps_the_session(browser: BrowserContext) -> None:
    async with running_hub() as h:
        with shop_site(h) as site:
            page = await open_shop(browser, site)
            first = await only_session(h)
            await page.reload()
            await page.wait_for_function("window.startedCount >= 1")
            assert await page.evaluate("HubTracker.sessionID") == first["sessionID"]
            assert await page.evaluate("sessionStorage.getItem('hubTracker:shop')") == first["sessionID"]
            # The old connection's close and the new start may land in either order.
            session = await only_session(h, tabs=1, connected=True)
            assert session["sessionID"] == first["sessionID"]
            assert session["timestamp"] == first["timestamp"]


async def test_hidden_page_is_inactive(browser: BrowserContext) -> None:
    async with running_hub() as h:
        with shop_site(h) as site:
            page = await open_shop(browser, site)
            await only_session(h, active=True)
            await set_hidden(page, True)
            await only_session(h, active=False)
            await set_hidden(page, False)
            await only_session(h, active=True)


async def test_closed_page_disconnects_then_ends_after_grace(browser: BrowserContext) -> None:
    async with running_hub(grace=1.0) as h:
        with shop_site(h) as site:
            page = await open_shop(browser, site)
            sid = (await only_session(h, connected=True))["sessionID"]
            await page.close()
            held = await only_session(h, connected=False)
            assert held["sessionID"] == sid and held["tabs"] == 0
            await wait_for(_no_sessions(h))


def _no_sessions(h: RunningHub) -> Any:
    async def check() -> bool:
        return (await h.search("shop"))["total"] == 0

    return check


async def test_reconnects_and_resumes_after_the_hub_drops_it(browser: BrowserContext) -> None:
    async with running_hub() as h:
        with shop_site(h) as site:
            page = await open_shop(browser, site)
            first = await only_session(h)
            h.hub.server.close_all(CloseCode.RESTART, "hub restarting")
            await page.wait_for_function("window.startedCount >= 2")
            session = await only_session(h, connected=True, tabs=1)
            assert session["sessionID"] == first["sessionID"]
            assert session["timestamp"] == first["timestamp"]


async def test_stop_ends_the_session_at_once(browser: BrowserContext) -> None:
    async with running_hub() as h:  # the default 30 s grace: only `end` can end it in time
        with shop_site(h) as site:
            page = await open_shop(browser, site)
            await only_session(h)
            await page.evaluate("HubTracker.stop()")
            await wait_for(_no_sessions(h))
            assert await page.evaluate("sessionStorage.getItem('hubTracker:shop')") is None


# --- dashboard --------------------------------------------------------------


class Trackers:
    """Python trackers (websockets clients) for the dashboard to show."""

    def __init__(self, hub: RunningHub, stack: AsyncExitStack) -> None:
        self.hub = hub
        self.stack = stack
        self.conns: dict[str, Any] = {}

    async def start(self, sid: str, project: str = "shop", **fields: Any) -> Any:
        ws = await self.stack.enter_async_context(websockets.connect(self.hub.tracker_url(project)))
        await ws.send(json.dumps({"type": "start", "sessionID": sid, **fields}))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "started", reply
        self.conns[sid] = ws
        return ws

    async def send(self, sid: str, **msg: Any) -> None:
        await self.conns[sid].send(json.dumps(msg))


async def open_dashboard(browser: BrowserContext, h: RunningHub, key: str = API_KEY) -> Page:
    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{h.port}/dashboard?project=shop")
    await page.fill("#key", key)
    await page.click("#connect button[type=submit]")
    return page


def row(page: Page, sid: str) -> Any:
    return page.locator(f'#rows .row[data-session-id="{sid}"]')


PEOPLE = [
    ("s-ann", "ann@example.com", "DE", "Berlin", "Chrome", "131.0.6778.85", "Windows", "Checkout · Payment"),
    ("s-bob", "bob@example.org", "FR", "Lyon", "Firefox", "133.0", "macOS", "Running shoes · Shop"),
    ("s-chen", "chen@example.net", "US", "Austin", "Safari", "18.1", "iOS", "Order #1042 · Tracking"),
    ("s-dara", None, "BR", "Recife", "Edge", "131.0.2903.70", "Windows", "Search: trail jackets"),
    ("s-eve", "eve@example.com", "JP", "Osaka", "Chrome", "130.0.6723.117", "Android", "Help · Returns"),
]


async def test_dashboard_follows_sessions_live(browser: BrowserContext) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    async with running_hub() as h, AsyncExitStack() as stack:
        trackers = Trackers(h, stack)
        page = await open_dashboard(browser, h)
        await expect(page.locator("#status")).to_contain_text("live")
        for i, (sid, user, country, city, browser_name, version, os_name, title) in enumerate(PEOPLE):
            await trackers.start(
                sid,
                userID=user,
                userUUID="device-" + sid[2:],
                userCountry=country,
                userCity=city,
                userBrowser=browser_name,
                userBrowserVersion=version,
                userOs=os_name,
                pageTitle=title,
                url=f"https://shop.example.com/p/{i}",
                userDeviceType="mobile" if os_name in ("iOS", "Android") else "desktop",
                active=sid != "s-chen",
                metadata={"plan": "pro" if i % 2 else "free"},
            )
        # A second tab of Ann's session.
        second_tab = await stack.enter_async_context(websockets.connect(h.tracker_url("shop")))
        await second_tab.send(json.dumps({"type": "start", "sessionID": "s-ann"}))
        await second_tab.recv()

        for sid, user, country, *_ in PEOPLE:
            await expect(row(page, sid)).to_have_count(1)
            await expect(row(page, sid).locator(".country")).to_contain_text(country)
            if user:
                await expect(row(page, sid).locator(".who")).to_have_text(user)
        await expect(row(page, "s-ann").locator(".tabs")).to_have_text("2")
        await expect(row(page, "s-chen").locator(".state")).to_have_text("idle")
        await expect(row(page, "s-bob").locator(".browser")).to_have_text("Firefox 133 · macOS")
        await expect(page.locator("#status")).to_have_text("live · 5 sessions")

        # Changing page updates the row in place.
        await trackers.send("s-bob", type="update", url="https://shop.example.com/cart", pageTitle="Cart (2)")
        await expect(row(page, "s-bob").locator(".page")).to_have_text("Cart (2)")

        # Clicking a row shows the full record, then its update stream.
        await row(page, "s-bob").click()
        await expect(page.locator("#detail")).to_be_visible()
        await expect(page.locator("#record")).to_contain_text('"sessionID": "s-bob"')
        await trackers.send("s-bob", type="heartbeat", active=False)
        await expect(page.locator("#stream li").first).to_contain_text('"active":false')
        await expect(row(page, "s-bob").locator(".state")).to_have_text("idle")

        await page.screenshot(path=str(ARTIFACTS / "dashboard.png"))

        # An ended session leaves the table.
        await trackers.send("s-dara", type="end")
        await expect(row(page, "s-dara")).to_have_count(0)
        await expect(page.locator("#status")).to_have_text("live · 4 sessions")
        await trackers.send("s-bob", type="end")
        await expect(page.locator("#detail-state")).to_have_text("ended: ended")


async def test_dashboard_filters_like_the_api(browser: BrowserContext) -> None:
    async with running_hub() as h, AsyncExitStack() as stack:
        trackers = Trackers(h, stack)
        await trackers.start("s1", userID="ann@example.com", userCountry="DE")
        await trackers.start("s2", userID="bob@example.com", userCountry="FR")
        page = await open_dashboard(browser, h)
        await expect(page.locator("#rows .row")).to_have_count(2)

        await page.fill(".filter .f-name", "userCountry")
        await page.select_option(".filter .f-op", "is")
        await page.fill(".filter .f-value", "de, it")
        await page.click("#apply")
        await expect(page.locator("#rows .row")).to_have_count(1)
        await expect(row(page, "s1")).to_have_count(1)

        await trackers.start("s3", userID="carla@example.com", userCountry="IT")
        await trackers.start("s4", userID="dan@example.com", userCountry="ES")
        await expect(row(page, "s3")).to_have_count(1)
        # A session that stops matching leaves the view.
        await trackers.send("s1", type="update", userCountry="AT")
        await expect(row(page, "s1")).to_have_count(0)
        await expect(page.locator("#rows .row")).to_have_count(1)

        # The filters survive a reload (sessionStorage), and so does the key.
        await page.reload()
        await expect(page.locator("#rows .row")).to_have_count(1)
        await expect(page.locator(".filter .f-value")).to_have_value("de, it")


async def test_dashboard_renders_only_the_visible_rows(browser: BrowserContext) -> None:
    count = 400
    async with running_hub() as h, AsyncExitStack() as stack:
        trackers = Trackers(h, stack)
        await asyncio.gather(
            *(
                trackers.start(f"s{i:04d}", userID=f"user{i}@example.com", timestamp=1_700_000_000_000 + i)
                for i in range(count)
            )
        )
        page = await open_dashboard(browser, h)
        # The dashboard's CSP forbids eval, which wait_for_function needs: poll instead.
        await wait_for(lambda: page.evaluate(f"window.hubDashboard.count() === {count}"), timeout=15)
        # Newest first, like the API; the oldest is reached by scrolling.
        await expect(row(page, f"s{count - 1:04d}")).to_have_count(1)
        rendered = await page.locator("#rows .row").count()
        assert 0 < rendered < 60, rendered
        await expect(row(page, "s0000")).to_have_count(0)
        await page.eval_on_selector("#viewport", "v => { v.scrollTop = v.scrollHeight; }")
        await expect(row(page, "s0000")).to_have_count(1)
        assert await page.locator("#rows .row").count() < 60


async def test_dashboard_says_when_the_key_is_refused(browser: BrowserContext) -> None:
    async with running_hub() as h:
        page = await open_dashboard(browser, h, key="wrong-key")
        status = page.locator("#status")
        await expect(status).to_contain_text("could not connect")
        # It stays said through the retries (the first comes within a second).
        await page.wait_for_timeout(1500)
        await expect(status).to_contain_text("could not connect")


async def test_dashboard_suggests_live_values_as_you_type(browser: BrowserContext) -> None:
    async with running_hub() as h, AsyncExitStack() as stack:
        trackers = Trackers(h, stack)
        await trackers.start("s1", userBrowser="Chrome")
        await trackers.start("s2", userBrowser="Chrome")
        await trackers.start("s3", userBrowser="Firefox")
        page = await open_dashboard(browser, h)
        await expect(page.locator("#rows .row")).to_have_count(3)
        await page.fill(".filter .f-name", "userBrowser")
        await page.locator(".filter .f-value").press_sequentially("chr")
        # The value box's datalist: what Chromium offers under it.
        options = page.locator(".filter datalist option")
        await expect(options).to_have_count(1)
        assert await options.first.get_attribute("value") == "Chrome"
        assert await options.first.get_attribute("label") == "2 sessions"
        # An earlier value of the box is kept; the last one is completed.
        await page.fill(".filter .f-value", "")
        await page.locator(".filter .f-value").press_sequentially("Firefox, chr")
        await expect(options.first).to_have_attribute("value", "Firefox, Chrome")
        # The name box suggests the record's fields, the new ones too.
        names = await page.eval_on_selector_all("#filter-names option", "os => os.map(o => o.value)")
        assert {"userBrowser", "pageViews", "activeTime", "userDeviceType"} <= set(names)
