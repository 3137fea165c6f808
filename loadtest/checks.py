"""The checks: what the hub answers against what the swarm believes, as the run goes and at its end.

Every ``--check-interval``: the hub's ``total`` against the live count the
swarm reports, and the sessions the workers sampled, searched by id. At the
end, churn stopped, every session the swarm holds, page by page. With
``--sharded`` each target holds its own share and the totals add up;
otherwise every target is one cluster and holds every session.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from .fleet import Fleet, Totals
from .options import Options
from .searches import HubSearch

EXAMPLES = 20  # mismatches kept as examples, per kind


def band(before: Totals, after: Totals, trackers: int) -> tuple[int, int]:
    """The totals a hub may answer between two reads of the swarm's reports: [believed, + in flight]."""
    # Reports may land while we ask: widen the band by what changed meanwhile. While the
    # swarm ramps up, reports trail the hub by up to a report interval of new sessions.
    lo = min(before.live, after.live)
    hi = max(before.live + before.starting, after.live + after.starting)
    if not (before.ramped and after.ramped):
        hi = trackers
    return lo, hi


class Checks:
    def __init__(self, opts: Options, api: HubSearch, fleet: Fleet, t0: float) -> None:
        self.api = api
        self.fleet = fleet
        self.targets = len(opts.targets)
        self.projects = opts.projects
        self.sharded = opts.sharded
        self.trackers = opts.trackers
        self.t0 = t0
        self.count_checks = 0
        self.count_mismatches = 0
        self.count_mismatch_examples: list[dict[str, Any]] = []
        self.sampled = 0
        self.sample_missing = 0
        self.sample_missing_examples: list[str] = []
        self.errors: Counter[str] = Counter()
        # Sampled sessions a search did not find, judged once the reports after them are in.
        self.unconfirmed: set[str] = set()
        self.previous_unconfirmed: set[str] = set()

    def holders(self, target: int) -> list[int]:
        """The targets that must hold a session the swarm opened on ``target``."""
        return [target] if self.sharded else list(range(self.targets))

    async def count(self) -> int | list[int] | None:
        """``total`` must lie in [believed, believed + starts in flight]; returns what the hub said."""
        agg = self.fleet.totals()
        try:
            totals = await self.api.totals()
        except Exception as exc:
            self.errors[f"count: {type(exc).__name__}: {str(exc)[:80]}"] += 1
            return None
        lo, hi = band(agg, self.fleet.totals(), self.trackers)
        self.count_checks += 1
        observed = [sum(totals)] if self.sharded else totals
        for total in observed:
            if not lo <= total <= hi:
                self.count_mismatches += 1
                if len(self.count_mismatch_examples) < EXAMPLES:
                    self.count_mismatch_examples.append(
                        {"t": round(time.monotonic() - self.t0, 2), "hub_total": total, "believed": [lo, hi]}
                    )
        return observed[0] if len(observed) == 1 else observed

    async def sample(self) -> None:
        """Sessions the workers just reported live must be found by a sessionId search."""
        groups: dict[tuple[int, str], set[str]] = {}
        for target, project, sid in self.fleet.samples():
            groups.setdefault((target, project), set()).add(sid)
        for (target, project), sids in groups.items():
            for t in self.holders(target):
                body = {
                    "filters": [{"name": "sessionId", "operator": "is", "value": sorted(sids)}],
                    "limit": 1000,
                }
                try:
                    data = await self.api.search(t, project, body)
                except Exception as exc:
                    self.errors[f"sample: {type(exc).__name__}: {str(exc)[:80]}"] += 1
                    continue
                found = {s["sessionID"] for s in data["sessions"]}
                self.sampled += len(sids)
                self.unconfirmed |= sids - found
        self.confirm_missing(final=False)

    def confirm_missing(self, final: bool) -> None:
        """A sample can race an ``end`` churn, which the next reports tell: judge misses one round later."""
        missing = self.previous_unconfirmed - self.fleet.ended
        self.sample_missing += len(missing)
        examples = self.sample_missing_examples
        examples.extend(sorted(missing)[: max(0, EXAMPLES - len(examples))])
        self.previous_unconfirmed, self.unconfirmed = self.unconfirmed, set()
        if final:
            self.confirm_missing(final=False)

    async def final(self) -> dict[str, Any]:
        """With churn stopped: the hub holds exactly the sessions the swarm holds."""
        settled = await self.fleet.settle()
        self.confirm_missing(final=True)
        result: dict[str, Any] = {"workers_settled": len(settled)}
        expected: dict[tuple[int, str], set[str]] = {}
        for s in settled:
            for target, project, sid in s.ids:
                for t in self.holders(target):
                    expected.setdefault((t, project), set()).add(sid)
        result["transitional"] = sum(s.transitional for s in settled)
        result["expected"] = len({sid for ids in expected.values() for sid in ids})
        missing = extra = 0
        examples: list[str] = []
        totals: list[int] = []
        started = time.monotonic()
        for t in range(self.targets):
            for project in self.projects:
                want = expected.get((t, project), set())
                try:
                    total, got = await self.every_session(t, project)
                except Exception as exc:
                    result["error"] = f"{type(exc).__name__}: {exc}"
                    return result
                totals.append(total)
                missing += len(want - got)
                extra += len(got - want)
                examples += [f"missing {s}" for s in sorted(want - got)[:5]]
                examples += [f"extra {s}" for s in sorted(got - want)[:5]]
        result.update(
            hub_total=sum(totals) if self.sharded else totals,
            missing=missing,
            extra=extra,
            examples=examples[:EXAMPLES],
            seconds=round(time.monotonic() - started, 2),
            ok=missing == 0 and extra == 0,
        )
        return result

    async def every_session(self, target: int, project: str) -> tuple[int, set[str]]:
        """The hub's total on its first page, and every sessionID, paging by sessionID."""
        got: set[str] = set()
        total = 0
        page = 1
        while True:
            body = {"sort": "sessionID", "order": "asc", "page": page, "limit": 1000}
            data = await self.api.search(target, project, body)
            if page == 1:
                total = int(data["total"])
            got.update(s["sessionID"] for s in data["sessions"])
            if len(data["sessions"]) < 1000:
                return total, got
            page += 1

    def record(self, final: dict[str, Any]) -> dict[str, Any]:
        """The checks as the result file keeps them."""
        return {
            "count_checks": self.count_checks,
            "count_mismatches": self.count_mismatches,
            "count_mismatch_examples": self.count_mismatch_examples,
            "sampled": self.sampled,
            "sample_missing": self.sample_missing,
            "sample_missing_examples": self.sample_missing_examples,
            "errors": dict(self.errors),
            "final": final,
        }


def failed(checks: dict[str, Any]) -> bool:
    """A result's checks found the hub disagreeing with the swarm (a skipped final check is no failure)."""
    final = checks["final"]
    return bool(
        checks["count_mismatches"]
        or checks["sample_missing"]
        or ("skipped" not in final and not final.get("ok"))
    )
