"""Search queries of the assist API: parsing (CONTRACT §4) and matching.

``parse_body``/``parse_params`` turn untrusted input into a ``Query`` or
raise ``QueryError`` with a message saying what was wrong. ``Query.matches``
is the plain per-session rule; indexes must answer exactly as it does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final, Literal

import msgspec
from msgspec import Struct

from .record import DESCRIPTIVE_FIELDS, MAX_JSON_DEPTH, SCALAR_FIELDS, Session, scalar_text, too_deep

DEFAULT_LIMIT: Final = 10
MAX_LIMIT: Final = 1000

# Filter names, lower-cased, to record fields.
FIELD_NAMES: Final[dict[str, str]] = {f.lower(): f for f in SCALAR_FIELDS}
FIELD_NAMES.update(
    {
        "userid": "userID",
        "useranonymousid": "userUUID",
        "useruuid": "userUUID",
        "platform": "userDeviceType",
        "sessionid": "sessionID",
    }
)
# Every field whose value a filter can read (metadata is read per key).
FILTERABLE: Final = frozenset(FIELD_NAMES.values())
STRING_FIELDS: Final = frozenset(DESCRIPTIVE_FIELDS) | {"sessionID", "projectKey"}

Scalar = str | int | float | bool


class QueryError(ValueError):
    """A malformed query; the message says what was wrong (HTTP 400)."""


class FilterIn(Struct, forbid_unknown_fields=False):
    name: str
    operator: str | None = None
    # CONTRACT §4: a list of strings, numbers or booleans; null or missing: "set".
    value: list[Scalar] | None = None
    source: str | None = None


class SearchBody(Struct, forbid_unknown_fields=False):
    filters: list[FilterIn] | None = None
    sort: str | None = None
    order: str | None = None
    page: int | None = None
    limit: int | None = None


class Criterion(Struct, frozen=True):
    """One resolved filter: ``field`` (or ``metadata[key]``) matched by ``op``.

    ``values`` are lower-cased; empty means "set to a non-empty value".
    """

    field: str
    key: str | None
    op: Literal["is", "contains"]
    values: tuple[str, ...]

    def text_of(self, session: Session) -> str | None:
        return text_of(session, self.field, self.key)

    def matches(self, session: Session) -> bool:
        text = text_of(session, self.field, self.key)
        if not text:
            return False
        if not self.values:
            return True
        if self.op == "is":
            return text in self.values
        return any(v in text for v in self.values)


class Query(Struct, frozen=True):
    criteria: tuple[Criterion, ...] = ()
    sort: str = "timestamp"
    descending: bool = True
    page: int = 1
    limit: int = DEFAULT_LIMIT

    def matches(self, session: Session) -> bool:
        return all(c.matches(session) for c in self.criteria)

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.limit


def text_of(session: Session, field: str, key: str | None) -> str | None:
    """The lower-cased text a filter compares, or None when unset."""
    if key is not None:
        value: Any = session.metadata.get(key)
    else:
        value = getattr(session, field)
    return None if value is None else compare_text(value)


def compare_text(value: Scalar) -> str:
    """The text a filter compares, for a record's value and a filter's alike:
    ``scalar_text``, lower-cased (its text of a non-string is lower-case already)."""
    return value.lower() if type(value) is str else scalar_text(value)


def sort_key(field: str, descending: bool) -> Callable[[Session], tuple[bool, Any, str]]:
    """A total order on ``field`` then sessionID, unset values last.

    Meant for ``sorted(..., reverse=descending)``: ties then fall by
    sessionID in the same direction, so pages of one query never overlap.
    """

    def key(s: Session) -> tuple[bool, Any, str]:
        v = getattr(s, field)
        return ((v is None) != descending, v if v is not None else 0, s.sessionID)

    return key


def ordered(sessions: Iterable[Session], query: Query) -> list[Session]:
    return sorted(sessions, key=sort_key(query.sort, query.descending), reverse=query.descending)


def parse_filter(f: FilterIn, where: str) -> Criterion:
    name = f.name.strip()
    if not name:
        raise QueryError(f"{where}: a filter needs a non-empty name")
    op = (f.operator or "contains").lower()
    if op not in ("is", "contains"):
        raise QueryError(f"{where}: unknown operator {f.operator!r} (use 'is' or 'contains')")
    values = tuple(dict.fromkeys(compare_text(v) for v in f.value or () if v != ""))
    lowered = name.lower()
    if lowered == "metadata":
        if not f.source:
            raise QueryError(f"{where}: a METADATA filter needs a 'source' (the metadata key)")
        return Criterion(field="metadata", key=f.source, op=op, values=values)  # type: ignore[arg-type]
    if lowered in ("userproperties",):
        raise QueryError(f"{where}: cannot filter on userProperties (an object)")
    field = FIELD_NAMES.get(lowered)
    if field is None:
        return Criterion(field="metadata", key=name, op=op, values=values)  # type: ignore[arg-type]
    return Criterion(field=field, key=None, op=op, values=values)  # type: ignore[arg-type]


def resolve_sort(sort: str | None) -> str:
    if sort is None or sort == "":
        return "timestamp"
    field = FIELD_NAMES.get(sort.lower())
    if field is None:
        raise QueryError(f"unknown sort key {sort!r}: use timestamp or another scalar session field")
    return field


def resolve_order(order: str | None) -> bool:
    if order is None or order == "":
        return True
    low = order.lower()
    if low not in ("asc", "desc"):
        raise QueryError(f"unknown order {order!r}: use 'asc' or 'desc'")
    return low == "desc"


def resolve_page(page: int | None) -> int:
    if page is None or page == 0:
        return 1
    if page < 0:
        raise QueryError(f"page must be >= 1, got {page}")
    return page


def resolve_limit(limit: int | None) -> int:
    if limit is None or limit == 0:
        return DEFAULT_LIMIT
    if limit < 0 or limit > MAX_LIMIT:
        raise QueryError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit


_body_decoder: Final = msgspec.json.Decoder(SearchBody)


def parse_filters(filters: list[FilterIn] | None) -> tuple[Criterion, ...]:
    return tuple(parse_filter(f, f"filters[{i}]") for i, f in enumerate(filters or ()))


def convert_filters(raw: Any) -> tuple[Criterion, ...]:
    """Filters from an already-decoded JSON value (the agent subscribe frame)."""
    try:
        filters = msgspec.convert(raw, list[FilterIn] | None)
    except msgspec.ValidationError as exc:
        raise QueryError(f"invalid filters: {_where(exc, '$.filters')}") from None
    return parse_filters(filters)


def _where(exc: msgspec.ValidationError, root: str) -> str:
    return str(exc).replace("`$", f"`{root}")


def parse_body(body: bytes) -> Query:
    """A POST search body (required: ``{}`` asks for the defaults)."""
    if not body.strip():
        raise QueryError("a search body is required: send {} for the defaults")
    if too_deep(body):
        raise QueryError(f"invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels, or malformed")
    try:
        parsed = _body_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise QueryError(f"invalid search body: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec: bad UTF-8 in a string
        raise QueryError(f"invalid JSON: {exc}") from None
    return Query(
        criteria=parse_filters(parsed.filters),
        sort=resolve_sort(parsed.sort),
        descending=resolve_order(parsed.order),
        page=resolve_page(parsed.page),
        limit=resolve_limit(parsed.limit),
    )


def _int_param(params: dict[str, str], name: str) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    # ASCII digits only: int() would also take "+5", "1_0", " 5" and other scripts' digits.
    if not (raw.isascii() and raw.isdigit()):
        raise QueryError(f"{name} must be a whole number in ASCII digits (0-9), got {raw[:40]!r}")
    try:
        return int(raw)
    except ValueError:  # past Python's 4300 digits
        raise QueryError(f"{name} has too many digits ({len(raw)})") from None


def parse_params(params: dict[str, str]) -> Query:
    """A GET search: ``userId`` filters with ``is``; sort/order/page/limit as in POST."""
    criteria: tuple[Criterion, ...] = ()
    user_id = params.get("userId")
    if user_id is not None:
        criteria = (Criterion(field="userID", key=None, op="is", values=(user_id.lower(),)),)
    return Query(
        criteria=criteria,
        sort=resolve_sort(params.get("sort")),
        descending=resolve_order(params.get("order")),
        page=resolve_page(_int_param(params, "page")),
        limit=resolve_limit(_int_param(params, "limit")),
    )


def brute_force(sessions: list[Session], query: Query) -> tuple[int, list[Session]]:
    """The reference answer: scan, sort, page."""
    matched = [s for s in sessions if query.matches(s)]
    page = ordered(matched, query)[query.offset : query.offset + query.limit]
    return len(matched), page
