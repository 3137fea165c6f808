"""The browser files the hub serves: content types, caching, ETag revalidation."""

import pytest

from tests.helpers import http, running_hub


@pytest.mark.parametrize(
    ("path", "content_type", "cache", "needle"),
    [
        ("/static/tracker.js", "text/javascript; charset=utf-8", "public, max-age=3600", b"HubTracker"),
        ("/dashboard", "text/html; charset=utf-8", "no-cache", b"/static/dashboard.js"),
        ("/static/dashboard.js", "text/javascript; charset=utf-8", "no-cache", b"/ws/agent/"),
        ("/static/dashboard.css", "text/css; charset=utf-8", "no-cache", b"#viewport"),
    ],
)
async def test_static_files(path: str, content_type: str, cache: str, needle: bytes) -> None:
    async with running_hub() as h:
        reply = await http(h.port, "GET", path, key=None)
        assert reply.status == 200
        assert reply.headers["content-type"] == content_type
        assert reply.headers["cache-control"] == cache
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert needle in reply.body
        etag = reply.headers["etag"]

        again = await http(h.port, "GET", path, key=None, headers={"If-None-Match": f'"other", W/{etag}'})
        assert again.status == 304 and again.body == b"" and again.headers["etag"] == etag
        stale = await http(h.port, "GET", path, key=None, headers={"If-None-Match": '"other"'})
        assert stale.status == 200 and stale.body == reply.body

        head = await http(h.port, "HEAD", path, key=None)
        assert head.status == 200 and head.headers["etag"] == etag
        assert head.body == b"" and head.headers["content-length"] == str(len(reply.body))


async def test_dashboard_policy_and_api_stays_uncached() -> None:
    async with running_hub() as h:
        page = await http(h.port, "GET", "/dashboard", key=None)
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        tracker = await http(h.port, "GET", "/static/tracker.js", key=None)
        assert tracker.headers["access-control-allow-origin"] == "*"
        health = await http(h.port, "GET", "/healthz", key=None)
        assert health.headers["cache-control"] == "no-store"
        missing = await http(h.port, "GET", "/static/nope.js", key=None)
        assert missing.status == 404
        posted = await http(h.port, "POST", "/dashboard", body="", key=None)
        assert posted.status == 405
