"""The checks: what the hub answers against what the swarm believes, as the run goes and at its end.

Every ``--check-interval``: the hub's ``total`` against the live count the
swarm reports, and the sessions the workers sampled, searched by id. At the
end, churn stopped, every session the swarm holds, page by page. With
``--sharded`` each target holds its own share and the totals add up;
otherwise every target is one cluster and holds every session.

With ``--projects-zipf`` every check is per project: the count band of each
project from the swarm's per-project counts, samples and the final paging per
project, and every whole-project agent's live set against the project's
sessions. ``--allowance`` (1 s with ``--projects-zipf``, else 0) is the
propagation allowance: a check that finds a mismatch asks again (every
0.1 s, the swarm's counts read afresh) until it agrees or the allowance has
passed since its first question; only then is it a mismatch. Checks that
needed a retry are counted (``retried``) with the longest wait.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from .fleet import Fleet, Totals
from .options import Options
from .searches import HubSearch
from .swarm import weighted_project

EXAMPLES = 20  # mismatches kept as examples, per kind
RETRY = 0.1  # seconds between the attempts of a check within the allowance


def band(before: Totals, after: Totals, trackers: int) -> tuple[int, int]:
    """The totals a hub may answer between two reads of the swarm's reports: [believed, + in flight]."""
    # Reports may land while we ask: widen the band by what changed meanwhile. While the
    # swarm ramps up, reports trail the hub by up to a report interval of new sessions.
    lo = min(before.live, after.live)
    hi = max(before.live + before.starting, after.live + after.starting)
    if not (before.ramped and after.ramped):
        hi = trackers
    return lo, hi


def project_band(before: Totals, after: Totals, keys: Iterable[str], most: int) -> tuple[int, int]:
    """``band`` for the sessions of some "target:project" keys; ``most``: their trackers while ramping."""
    keys = list(keys)
    lo = min(sum(before.live_by[k] for k in keys), sum(after.live_by[k] for k in keys))
    hi = max(
        sum(before.live_by[k] + before.starting_by[k] for k in keys),
        sum(after.live_by[k] + after.starting_by[k] for k in keys),
    )
    if not (before.ramped and after.ramped):
        hi = most
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
        self.per_project = opts.per_project
        self.allowance = opts.allowance
        self.retried = 0  # checks that agreed only on a retry within the allowance
        self.retry_wait_max = 0.0  # the longest such wait, seconds
        # Trackers per "target:project" (the most a key can hold while the swarm ramps up).
        self.trackers_by: Counter[str] = Counter()
        if self.per_project:
            cumulative = [sum(opts.project_weights[: k + 1]) for k in range(len(opts.project_weights))]
            for i in range(opts.trackers):
                self.trackers_by[f"{i % self.targets}:{self.projects[weighted_project(i, cumulative)]}"] += 1

    def agreed_after(self, started: float, attempts: int) -> None:
        """A check agreed on attempt ``attempts`` (a retry when > 1) of one begun at ``started``."""
        if attempts > 1:
            self.retried += 1
            self.retry_wait_max = max(self.retry_wait_max, time.monotonic() - started)

    def holders(self, target: int) -> list[int]:
        """The targets that must hold a session the swarm opened on ``target``."""
        return [target] if self.sharded else list(range(self.targets))

    async def count(self) -> int | list[int] | None:
        """``total`` must lie in [believed, believed + starts in flight]; returns what the hub said."""
        if self.per_project:
            return await self.count_per_project()
        started, attempts = time.monotonic(), 0
        while True:
            attempts += 1
            agg = self.fleet.totals()
            try:
                totals = await self.api.totals()
            except Exception as exc:
                self.errors[f"count: {type(exc).__name__}: {str(exc)[:80]}"] += 1
                return None
            lo, hi = band(agg, self.fleet.totals(), self.trackers)
            observed = [sum(totals)] if self.sharded else totals
            bad = [total for total in observed if not lo <= total <= hi]
            if not bad or time.monotonic() - started >= self.allowance:
                break
            await asyncio.sleep(RETRY)
        self.count_checks += 1
        if not bad:
            self.agreed_after(started, attempts)
        for total in bad:
            self.count_mismatch(total, lo, hi)
        return observed[0] if len(observed) == 1 else observed

    def count_mismatch(self, total: int, lo: int, hi: int, project: str | None = None) -> None:
        self.count_mismatches += 1
        if len(self.count_mismatch_examples) < EXAMPLES:
            example: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 2)}
            if project is not None:
                example["project"] = project
            example.update(hub_total=total, believed=[lo, hi])
            self.count_mismatch_examples.append(example)

    async def count_per_project(self) -> list[int] | int | None:
        """Each project's ``total`` on each target, in its own band; returns each target's sum."""
        results = await asyncio.gather(*(self.count_project(p) for p in self.projects))
        if any(r is None for r in results):
            return None
        sums = [sum(r[t] for r in results if r is not None) for t in range(self.targets)]
        return sum(sums) if self.sharded else (sums[0] if len(sums) == 1 else sums)

    async def count_project(self, project: str) -> list[int] | None:
        """One project on every target: retried within the allowance while any target disagrees."""
        every = [f"{t}:{project}" for t in range(self.targets)]
        started, attempts = time.monotonic(), 0
        while True:
            attempts += 1
            before = self.fleet.totals()
            try:
                asked = (self.api.total(t, project) for t in range(self.targets))
                totals = list(await asyncio.gather(*asked))
            except Exception as exc:
                self.errors[f"count: {type(exc).__name__}: {str(exc)[:80]}"] += 1
                return None
            after = self.fleet.totals()
            checked: list[tuple[int, int, int]] = []  # (total, lo, hi)
            if self.sharded:
                for t, total in enumerate(totals):
                    key = f"{t}:{project}"
                    checked.append((total, *project_band(before, after, [key], self.trackers_by[key])))
            else:
                most = sum(self.trackers_by[k] for k in every)
                lo, hi = project_band(before, after, every, most)
                checked += [(total, lo, hi) for total in totals]
            bad = [c for c in checked if not c[1] <= c[0] <= c[2]]
            if not bad or time.monotonic() - started >= self.allowance:
                break
            await asyncio.sleep(RETRY)
        self.count_checks += len(checked)
        if not bad:
            self.agreed_after(started, attempts)
        for total, lo, hi in bad:
            self.count_mismatch(total, lo, hi, project)
        return totals

    async def sample(self) -> None:
        """Sessions the workers just reported live must be found by a sessionId search."""
        groups: dict[tuple[int, str], set[str]] = {}
        for target, project, sid in self.fleet.samples():
            groups.setdefault((target, project), set()).add(sid)
        if self.allowance > 0:
            pairs = [(t, p, sids) for (target, p), sids in groups.items() for t in self.holders(target)]
            await asyncio.gather(*(self.sample_on(t, p, sids) for t, p, sids in pairs))
        else:
            for (target, project), sids in groups.items():
                for t in self.holders(target):
                    await self.sample_on(t, project, sids)
        self.confirm_missing(final=False)

    async def sample_on(self, t: int, project: str, sids: set[str]) -> None:
        """``sids`` searched on target ``t``; those not found asked again within the allowance."""
        started, attempts = time.monotonic(), 0
        left = sids
        while True:
            attempts += 1
            ids = {"name": "sessionId", "operator": "is", "value": sorted(left)}
            body = {"filters": [ids], "limit": 1000}
            try:
                data = await self.api.search(t, project, body)
            except Exception as exc:
                self.errors[f"sample: {type(exc).__name__}: {str(exc)[:80]}"] += 1
                return
            left = left - {s["sessionID"] for s in data["sessions"]}
            if not left or time.monotonic() - started >= self.allowance:
                break
            await asyncio.sleep(RETRY)
        self.sampled += len(sids)
        if not left:
            self.agreed_after(started, attempts)
        self.unconfirmed |= left

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
        totals = [0] * self.targets
        by_project: dict[str, dict[str, Any]] = {}
        started = time.monotonic()
        for t in range(self.targets):
            for project in self.projects:
                want = expected.get((t, project), set())
                first, attempts = time.monotonic(), 0
                while True:
                    attempts += 1
                    try:
                        total, got = await self.every_session(t, project)
                    except Exception as exc:
                        result["error"] = f"{type(exc).__name__}: {exc}"
                        return result
                    if got == want or time.monotonic() - first >= self.allowance:
                        break
                    await asyncio.sleep(RETRY)
                if got == want:
                    self.agreed_after(first, attempts)
                totals[t] += total
                missing += len(want - got)
                extra += len(got - want)
                examples += [f"missing {s}" for s in sorted(want - got)[:5]]
                examples += [f"extra {s}" for s in sorted(got - want)[:5]]
                if self.per_project:
                    entry = by_project.setdefault(
                        project, {"expected": 0, "hub_total": [], "missing": 0, "extra": 0}
                    )
                    entry["expected"] = len(want) if not self.sharded else entry["expected"] + len(want)
                    entry["hub_total"].append(total)
                    entry["missing"] += len(want - got)
                    entry["extra"] += len(got - want)
        result.update(
            hub_total=sum(totals) if self.sharded else totals,
            missing=missing,
            extra=extra,
            examples=examples[:EXAMPLES],
            seconds=round(time.monotonic() - started, 2),
            ok=missing == 0 and extra == 0,
        )
        if self.per_project:
            result["by_project"] = by_project
            result["agents"] = agents = await self.agents_final(expected)
            result["ok"] = result["ok"] and agents["ok"]
        return result

    async def agents_final(self, expected: dict[tuple[int, str], set[str]]) -> dict[str, Any]:
        """Every whole-project agent holds live exactly its project's sessions (its target's if sharded)."""
        started, attempts = time.monotonic(), 0
        while True:
            attempts += 1
            sets = await self.fleet.agent_sets()
            wrong: list[tuple[int, str, set[str], set[str]]] = []
            for n, t, p, got in sets:
                want = expected.get((t, p), set())
                if got != want:
                    wrong.append((n, p, want - got, got - want))
            if not wrong or time.monotonic() - started >= self.allowance:
                break
            await asyncio.sleep(RETRY)
        if not wrong and sets:
            self.agreed_after(started, attempts)
        examples = [f"agent {n} ({p}): {len(m)} missing, {len(x)} extra" for n, p, m, x in wrong[:EXAMPLES]]
        return {
            "whole_project_agents": len(sets),
            "projects_covered": len({p for _, _, p, _ in sets}),
            "sessions_held": sum(len(got) for *_, got in sets),
            "wrong": len(wrong),
            "missing": sum(len(m) for _, _, m, _ in wrong),
            "extra": sum(len(x) for *_, x in wrong),
            "examples": examples,
            "ok": not wrong,
        }

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
            "allowance_s": self.allowance,
            "retried": self.retried,
            "retry_wait_max_s": round(self.retry_wait_max, 3),
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
