"""The transport's parts alone, without a socket: admission, the HTTP request reader, the route table.

End-to-end behaviour over real sockets is in test_http_api.py, test_security.py and test_conformance.py.
"""

from __future__ import annotations

import pytest

from hub.admission import PerIpLimit, TokenBucket
from hub.auth import Auth
from hub.config import Settings
from hub.http1 import CONTINUE, Event, Refusal, RequestReader, Upgrade, encode_response
from hub.http_api import Request, Response
from hub.routes import RouteTable
from hub.websocket import Fragments, is_utf8

KEY = "org-key"

# Admission -------------------------------------------------------------


def test_per_ip_limit_admits_up_to_the_limit_and_forgets_an_address_when_its_last_closes() -> None:
    limit = PerIpLimit(2)
    assert limit.admit("a") and limit.admit("a")
    assert not limit.admit("a"), "the third from one address"
    assert limit.admit("b"), "other addresses are not affected"
    limit.release("a")
    assert limit.admit("a")
    for _ in range(2):
        limit.release("a")
    limit.release("b")
    assert limit.open == {}


def test_per_ip_limit_zero_admits_everyone() -> None:
    limit = PerIpLimit(0)
    assert all(limit.admit("a") for _ in range(1000))
    assert limit.open == {"a": 1000}


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=5.0, now=0.0)
    assert bucket.take(5, 0.0), "the whole burst at once"
    assert not bucket.take(1, 0.0), "nothing left"
    bucket = TokenBucket(rate=10.0, burst=5.0, now=0.0)
    assert bucket.take(5, 0.0)
    assert bucket.take(1, 0.1), "0.1 s refills one message at 10/s"
    assert not bucket.take(2, 0.2)


def test_token_bucket_never_refills_past_the_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=5.0, now=0.0)
    assert not bucket.take(6, 3600.0), "an hour of silence still allows only the burst"


# WebSocket messages ---------------------------------------------------------


def test_is_utf8() -> None:
    assert is_utf8("Grüße 🎉".encode()) and is_utf8(b"")
    for bad in (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\xc0\xaf"):
        assert not is_utf8(bad), bad


def test_fragments_join_and_accept_a_code_point_split_across_them() -> None:
    euro = "€".encode()
    fragments = Fragments(b"a" + euro[:1], binary=False)
    fragments.add(euro[1:2], fin=False)
    fragments.add(euro[2:] + b"b", fin=True)
    assert fragments.join() == b"a" + euro + b"b"


def test_fragments_of_text_fail_at_the_first_fragment_that_cannot_be_utf8() -> None:
    with pytest.raises(UnicodeDecodeError):
        Fragments(b"ok \xff", binary=False)
    fragments = Fragments(b"ok", binary=False)
    with pytest.raises(UnicodeDecodeError):
        fragments.add(b"\xf4\x90", fin=False)  # past U+10FFFF: no continuation can save it
    fragments = Fragments(b"ok \xe2\x82", binary=False)
    with pytest.raises(UnicodeDecodeError):
        fragments.add(b"", fin=True)  # the message ends inside a code point


def test_fragments_of_binary_are_never_decoded() -> None:
    fragments = Fragments(b"\xff", binary=True)
    fragments.add(b"\xfe", fin=True)
    assert fragments.join() == b"\xff\xfe"


# The HTTP request reader -------------------------------------------------


def reader(max_head: int = 16384, max_body: int = 1 << 20) -> RequestReader:
    return RequestReader(max_head, max_body)


def test_reader_parses_a_request_with_its_query_headers_and_body() -> None:
    raw = b"POST /a/b?c=1 HTTP/1.1\r\nHost: x\r\nX-Key: V\r\nContent-Length: 2\r\n\r\n{}"
    [request] = reader().feed(raw)
    assert isinstance(request, Request)
    assert (request.method, request.path, request.query, request.body) == ("POST", "/a/b", "c=1", b"{}")
    assert request.headers["x-key"] == "V" and request.keep_alive


def test_reader_hands_over_an_upgrade_with_the_bytes_after_it() -> None:
    r = reader()
    head = b"GET /ws/tracker/p1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    [upgrade] = r.feed(head + b"\x81\x80")
    assert isinstance(upgrade, Upgrade)
    assert upgrade.request.path == "/ws/tracker/p1" and upgrade.rest == b"\x81\x80"
    assert ("Upgrade", "websocket") in upgrade.headers
    assert r.done and r.feed(b"more") == []


def test_reader_refuses_malformed_http_and_reads_no_more() -> None:
    r = reader()
    [refusal] = r.feed(b"GARBAGE\r\n\r\n")
    assert isinstance(refusal, Refusal) and refusal.response.status == 400
    assert r.done and r.feed(b"GET / HTTP/1.1\r\n\r\n") == []


def head_of(size: int, method: str = "GET") -> bytes:
    """A request head of exactly ``size`` bytes, padded with one header."""
    start = f"{method} /x HTTP/1.1\r\nHost: x\r\nX-Pad: ".encode()
    return start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_reader_bounds_one_head_at_and_past_max_header(method: str) -> None:
    assert len(head_of(4000, method)) == 4000
    [request] = reader(max_head=4000).feed(head_of(4000, method))
    assert isinstance(request, Request)
    [refusal] = reader(max_head=4000).feed(head_of(4001, method))
    assert isinstance(refusal, Refusal) and refusal.response.status == 431
    assert refusal.limit == "max_header"


def test_paths_allowed_a_longer_head_get_it_others_do_not() -> None:
    # OpenReplay's Socket.IO handshake carries a JSON document in its query.
    long_heads = ((b"/ws-assist/socket", b"/socket"), 8000)
    query = b"/ws-assist/socket/?sessionInfo=" + b"q" * 6000
    [request] = RequestReader(4000, 1000, long_heads).feed(b"GET " + query + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(request, Request) and request.path == "/ws-assist/socket/"
    [refusal] = RequestReader(4000, 1000, long_heads).feed(
        b"GET " + query + b"q" * 3000 + b" HTTP/1.1\r\n\r\n"
    )
    assert isinstance(refusal, Refusal) and refusal.response.status == 414
    [refusal] = RequestReader(4000, 1000, long_heads).feed(head_of(4001))
    assert isinstance(refusal, Refusal) and refusal.response.status == 431, "other paths keep --max-header"
    # The next request on the connection is held to --max-header again.
    r = RequestReader(4000, 1000, long_heads)
    [first] = r.feed(b"GET " + query + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    [second] = r.feed(head_of(4001))
    assert isinstance(first, Request) and isinstance(second, Refusal)


def test_reader_refuses_a_too_long_uri_with_414() -> None:
    [refusal] = reader(max_head=100).feed(b"GET /" + b"u" * 200 + b" HTTP/1.1\r\n\r\n")
    assert isinstance(refusal, Refusal) and refusal.response.status == 414


def test_reader_never_counts_a_body_or_the_requests_after_a_head() -> None:
    body = b"b" * 50_000
    raw = b"POST /x HTTP/1.1\r\nContent-Length: 50000\r\n\r\n" + body + head_of(900) * 300
    events = reader(max_head=1000).feed(raw)
    assert len(events) == 301 and all(isinstance(e, Request) for e in events)
    assert isinstance(events[0], Request) and events[0].body == body


def test_reader_bounds_a_header_line_that_never_ends() -> None:
    # httptools holds an unfinished header line without a callback: whole reads count.
    r = reader(max_head=4096)
    assert r.feed(b"GET / HTTP/1.1\r\nX-Endless: ") == []
    fed = 0
    while not r.done:
        events = r.feed(b"a" * 1000)
        fed += 1000
    [refusal] = events
    assert isinstance(refusal, Refusal) and refusal.response.status == 431
    assert fed <= 4096 + 1000


def test_reader_bounds_the_body_by_length_and_as_it_arrives() -> None:
    [refusal] = reader(max_body=10).feed(b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n")
    assert isinstance(refusal, Refusal) and refusal.response.status == 413
    assert refusal.limit == "max_http_body"
    chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n6\r\nghijkl\r\n0\r\n\r\n"
    [refusal] = reader(max_body=10).feed(chunked)
    assert isinstance(refusal, Refusal) and refusal.response.status == 413
    [request] = reader(max_body=12).feed(chunked)
    assert isinstance(request, Request) and request.body == b"abcdefghijkl"


def parsed(events: list[Event]) -> list[tuple[str, str, str, bytes, bool]]:
    return [(e.method, e.path, e.query, e.body, e.keep_alive) for e in events if isinstance(e, Request)]


def test_reader_gives_the_same_requests_for_a_stream_split_at_every_byte() -> None:
    raw = (
        b"POST /public/p1/assist/sessions?x=%20y HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n[1,2]"
        + b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    whole = parsed(reader().feed(raw))
    assert len(whole) == 2 and whole[1][4] is False
    for cut in range(1, len(raw)):
        r = reader()
        assert parsed(r.feed(raw[:cut]) + r.feed(raw[cut:])) == whole, cut
    r = reader()
    assert parsed([e for i in range(len(raw)) for e in r.feed(raw[i : i + 1])]) == whole


def test_reader_asks_for_an_expected_body_only_when_the_head_is_acceptable() -> None:
    head = b"POST /x HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-Continue\r\n\r\n"
    r = reader()
    assert r.feed(head) == [CONTINUE]
    [request] = r.feed(b"{}")
    assert isinstance(request, Request) and request.body == b"{}"
    [request] = reader().feed(head + b"{}")
    assert isinstance(request, Request), "the body came with the head: nothing to ask for"
    [refusal] = reader(max_body=1).feed(head)
    assert isinstance(refusal, Refusal) and refusal.response.status == 413, "too large: a 413, not a 100"
    assert reader().feed(head.replace(b"HTTP/1.1", b"HTTP/1.0")) == [], "HTTP/1.0 does not know 100"


def test_encode_response_head_204_and_304() -> None:
    answer = Response(200, b'{"a":1}', headers=[("X-A", "b")])
    full = encode_response(answer, keep_alive=True)
    assert full.endswith(b'\r\n\r\n{"a":1}') and b"Content-Length: 7\r\n" in full
    assert b"Connection: close" not in full and b"Cache-Control: no-store" in full
    head = encode_response(answer, keep_alive=False, head=True)
    assert head == full[: -len(answer.body)].replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    for status in (204, 304):
        empty = encode_response(Response(status, headers=[("ETag", '"x"')]), keep_alive=True)
        assert b"Content-Length" not in empty and b"Content-Type" not in empty, "no body, no length"
        assert empty.startswith(f"HTTP/1.1 {status} ".encode()) and empty.endswith(b'ETag: "x"\r\n\r\n')


# The route table ---------------------------------------------------------


def table(projects: dict[str, int] | None = None) -> RouteTable:
    routes = RouteTable(Settings(projects=projects), Auth(KEY), accepting_websockets=lambda: True)

    def echo(request: Request) -> Response:
        return Response(200, repr(sorted(request.params.items())).encode())

    routes.http("/public/{projectKey}/things/{id}", get=echo, post=echo, auth=True)
    routes.http("/healthz", get=echo)
    return routes


def get(path: str, method: str = "GET", key: str | None = KEY) -> Request:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return Request(method=method, path=path, query="", headers=headers)


def test_routes_match_templates_and_unquote_parameters() -> None:
    reply = table().answer(get("/public/p1/things/a%2Fb"))
    assert reply.status == 200 and reply.body == b"[('id', 'a/b'), ('projectKey', 'p1')]"
    assert table().answer(get("/public/p1/things")).status == 404
    assert table().answer(get("/public/p1/others/x")).status == 404


def test_routes_check_the_key_then_the_project() -> None:
    routes = table({"p1": 1})
    assert routes.answer(get("/public/p2/things/x", key="wrong")).status == 401, "the key first"
    assert routes.answer(get("/public/p2/things/x")).status == 404, "then the project"
    assert routes.answer(get("/public/p1/things/x")).status == 200
    assert routes.answer(get("/healthz", key=None)).status == 200, "a route without auth"


def test_routes_answer_head_with_the_get_handler_and_405_with_allow() -> None:
    routes = table()
    assert routes.answer(get("/public/p1/things/x", "HEAD")).status == 200
    reply = routes.answer(get("/public/p1/things/x", "DELETE"))
    assert reply.status == 405 and ("Allow", "GET, HEAD, POST") in reply.headers
    assert routes.answer(get("/healthz", "POST", key=None)).status == 405


def test_a_route_that_checks_a_key_must_name_a_project() -> None:
    routes = table()
    with pytest.raises(ValueError, match="project"):
        routes.http("/secret", get=lambda r: Response(200), auth=True)
