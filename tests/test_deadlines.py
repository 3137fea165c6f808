"""The deadline wheel the server sweeps: items come due at the first sweep at or after their time."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hub.deadlines import Deadlines


def test_an_item_is_due_at_the_first_sweep_at_or_after_its_time() -> None:
    wheel: Deadlines[str] = Deadlines(1.0, now=100.0)
    wheel.set("a", 102.5)
    wheel.set("b", 103.0)
    assert wheel.due(102.4) == []
    assert wheel.due(102.9) == []
    assert sorted(wheel.due(103.0)) == ["a", "b"]
    assert len(wheel) == 0


def test_each_item_is_handed_out_once_and_only_when_due() -> None:
    wheel: Deadlines[str] = Deadlines(1.0, now=0.0)
    wheel.set("late", 10.0)
    wheel.set("soon", 2.0)
    assert sorted(wheel.due(5.0)) == ["soon"]
    assert wheel.due(5.0) == []
    assert "late" in wheel and "soon" not in wheel
    assert wheel.due(10.0) == ["late"]


def test_setting_again_moves_an_item_and_inf_takes_it_out() -> None:
    wheel: Deadlines[str] = Deadlines(0.5, now=0.0)
    wheel.set("a", 60.0)
    wheel.set("a", 1.0)  # a closing handshake moved its deadline earlier
    assert len(wheel) == 1
    assert wheel.due(1.0) == ["a"]
    wheel.set("a", 5.0)
    wheel.set("a", math.inf)
    assert len(wheel) == 0 and wheel.due(100.0) == []


def test_discard_forgets_an_item() -> None:
    wheel: Deadlines[str] = Deadlines(1.0, now=0.0)
    wheel.set("a", 3.0)
    wheel.set("b", 3.0)
    wheel.discard("a")
    wheel.discard("never filed")
    assert wheel.due(3.0) == ["b"]


def test_a_time_already_past_is_due_at_the_next_sweep_not_the_last_one() -> None:
    wheel: Deadlines[str] = Deadlines(1.0, now=0.0)
    assert wheel.due(7.2) == []
    wheel.set("past", 2.0)
    assert wheel.due(7.9) == []  # the tick of 7 was handed out already
    assert wheel.due(8.0) == ["past"]


def test_a_sweep_long_after_the_last_one_finds_everything_passed() -> None:
    wheel: Deadlines[int] = Deadlines(0.001, now=0.0)
    for i in range(5):
        wheel.set(i, 0.01 * (i + 1))
    wheel.set(99, 1e6)
    assert sorted(wheel.due(3600.0)) == [0, 1, 2, 3, 4]
    assert len(wheel) == 1


def test_resolution_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Deadlines(0, now=0.0)


# Times on a 1/64 grid and power-of-two ticks: the model's arithmetic is exact.
TIMES = st.integers(0, 3200).map(lambda i: i / 64)


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("set"), st.integers(0, 9), TIMES | st.just(math.inf)),
            st.tuples(st.just("discard"), st.integers(0, 9), st.just(0.0)),
            st.tuples(st.just("sweep"), st.just(0), st.integers(0, 320).map(lambda i: i / 64)),
        ),
        max_size=60,
    ),
    st.sampled_from([0.25, 1.0, 2.0]),
)
def test_against_a_full_scan(ops: list[tuple[str, int, float]], resolution: float) -> None:
    """What scanning every item at every sweep would find, give or take a tick: never
    early, never left behind once its tick has come, never lost or handed out twice."""
    wheel: Deadlines[int] = Deadlines(resolution, now=0.0)
    # When each item is due: its time, or the next sweep's tick if that time had passed.
    times: dict[int, float] = {}
    now = 0.0
    for op, item, value in ops:
        if op == "set":
            wheel.set(item, value)
            times.pop(item, None)
            if value != math.inf:
                times[item] = max(value, (math.floor(now / resolution) + 1) * resolution)
        elif op == "discard":
            wheel.discard(item)
            times.pop(item, None)
        else:
            now += value
            due = wheel.due(now)
            assert len(due) == len(set(due))
            for got in due:
                assert times.pop(got) <= now
            swept_to = math.floor(now / resolution) * resolution
            assert all(at > swept_to for at in times.values())
    assert len(wheel) == len(times)
