"""Who may read which project: the organization key and per-project API keys.

Agents and ``/public/`` clients present a token; ``Auth.may_read`` says
whether it opens a given project. Keys are compared in constant time: the
token is checked against every candidate key (no early exit on a match or a
mismatch), and both sides are hashed first so the comparison does not even
leak the keys' lengths. Keys are never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Final

from .config import Projects, Settings

# A candidate: the key's digest and the projects it opens (None = all).
_Candidate = tuple[bytes, frozenset[str] | None]

_DUMMY: Final = hashlib.sha256(b"no key").digest()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class Auth:
    def __init__(self, org_key: str, project_keys: Mapping[str, tuple[str, ...]] | None = None) -> None:
        scopes: dict[str, set[str]] = {}
        for project, keys in (project_keys or {}).items():
            for key in keys:
                scopes.setdefault(key, set()).add(project)
        candidates: list[_Candidate] = [(_digest(org_key), None)] if org_key else []
        # A per-project key equal to the organization key stays the organization key.
        candidates += [
            (_digest(key), frozenset(projects)) for key, projects in scopes.items() if key != org_key
        ]
        self._candidates: tuple[_Candidate, ...] = tuple(candidates)

    @classmethod
    def from_settings(cls, settings: Settings) -> Auth:
        keys: dict[str, tuple[str, ...]] = {}
        if isinstance(settings.projects, Projects):
            keys.update(settings.projects.api_keys)
        for project, extra in (settings.keys_file or {}).items():
            keys[project] = (*keys.get(project, ()), *extra)
        return cls(settings.api_key, keys)

    def may_read(self, token: str | None, project_key: str) -> bool:
        """May ``token`` read ``project_key``'s sessions? Constant time in the token."""
        given = _digest(token) if token else _DUMMY
        granted = False
        for digest, scope in self._candidates:
            match = hmac.compare_digest(given, digest)
            allowed = scope is None or project_key in scope
            granted |= match & allowed
        return granted and token is not None and token != ""


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of ``Authorization: Bearer TOKEN``, if any."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def origin_allowed(settings: Settings, headers: Mapping[str, str]) -> bool:
    """Does the tracker handshake's Origin pass ``--tracker-origins``?"""
    allowed = settings.tracker_origins
    if allowed is None:
        return True
    origin = headers.get("origin", "").rstrip("/").lower()
    return origin in allowed
