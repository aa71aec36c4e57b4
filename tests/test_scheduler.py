"""The scheduler alone: plain data in, decisions out, no model."""

from __future__ import annotations

from engine.api import UpscaleRequest
from engine.request import Request
from engine.scheduler import Scheduler


def req(rid: str, shape=(8, 8), steps: int = 3, rows: int = 1, arrival: float = 0.0) -> Request:
    r = Request(UpscaleRequest(rid, b"", steps=steps), arrival=arrival, shape=shape, rows=rows)
    return r


def drive(s: Scheduler, limit: int = 1000) -> list[tuple[tuple[int, int], list[str]]]:
    """Run the scheduler to completion, advancing each scheduled request one step."""
    trace = []
    while s.has_work and len(trace) < limit:
        batch = s.schedule()
        trace.append((batch.shape, [r.request_id for r in batch.requests]))
        for r in batch.requests:
            r.step_index += 1
            if r.done_denoising:
                s.remove(r)
    return trace


def test_round_robin_groups_alternate_so_a_short_job_never_waits_for_a_long_one():
    s = Scheduler(max_rows=8, policy="round-robin")
    s.add(req("long", shape=(8, 8), steps=50))
    s.add(req("short", shape=(16, 16), steps=2))
    trace = drive(s)
    short_ticks = [i for i, (_, ids) in enumerate(trace) if "short" in ids]
    assert short_ticks == [1, 3]
    assert len(trace) == 52


def test_deadline_policy_runs_short_jobs_first_and_lets_newcomers_join():
    s = Scheduler(max_rows=8)
    s.add(req("long", shape=(8, 8), steps=6))
    s.add(req("short", shape=(16, 16), steps=2))
    first = s.schedule()
    assert [r.request_id for r in first.requests] == ["short"]  # deadline 2 beats 6
    first.requests[0].step_index += 1
    s.add(req("joiner", shape=(16, 16), steps=1))  # joins at tick 1: deadline 2
    trace = [(shape, sorted(ids)) for shape, ids in drive(s)]
    assert trace[0] == ((16, 16), ["joiner", "short"])
    assert trace[1:] == [((8, 8), ["long"])] * 6


def test_deadline_policy_serves_earlier_work_first_and_never_starves_a_group():
    s = Scheduler(max_rows=1)
    s.add(req("old", shape=(16, 16), steps=4))  # deadline 4
    trace = []
    for i in range(12):  # a stream of short jobs of another shape, one per tick
        s.add(req(f"new{i}", shape=(8, 8), steps=2))
        batch = s.schedule()
        trace.append([r.request_id for r in batch.requests])
        for r in batch.requests:
            r.step_index += 1
            if r.done_denoising:
                s.remove(r)
    old_ticks = [i for i, ids in enumerate(trace) if ids == ["old"]]
    assert len(old_ticks) == 4 and old_ticks[-1] < 8


def test_unknown_policy_is_refused():
    import pytest

    with pytest.raises(ValueError, match="round-robin"):
        Scheduler(max_rows=8, policy="fastest")


def test_round_robin_row_budget_and_fairness_within_a_group():
    s = Scheduler(max_rows=4, policy="round-robin")
    for i in range(6):
        s.add(req(f"r{i}", steps=2, rows=2 if i % 2 else 1, arrival=i))
    first = s.schedule()
    assert first.rows <= 4
    for r in first.requests:
        r.step_index += 1
    second = s.schedule()
    # Those left out of the first call go first in the second.
    assert [r.request_id for r in first.requests] == ["r0", "r1", "r2"]
    assert [r.request_id for r in second.requests][:2] == ["r3", "r4"]


def test_a_request_larger_than_the_budget_still_runs_alone():
    s = Scheduler(max_rows=1)
    s.add(req("guided", rows=2))
    batch = s.schedule()
    assert [r.request_id for r in batch.requests] == ["guided"] and batch.rows == 2


def test_static_mode_waits_then_runs_a_frozen_batch_to_completion():
    now = [0.0]
    s = Scheduler(max_rows=8, mode="static", static_delay=0.05, clock=lambda: now[0])
    s.add(req("a", steps=2, arrival=0.0))
    assert s.schedule() is None and 0 < s.wait_time() <= 0.05
    now[0] = 0.06
    first = s.schedule()
    assert [r.request_id for r in first.requests] == ["a"]
    s.add(req("late", steps=1, arrival=0.06))
    first.requests[0].step_index += 1
    assert [r.request_id for r in s.schedule().requests] == ["a"]  # nobody joins late


def test_shrink_halves_the_budget_and_full_calls_grow_it_back():
    from engine.scheduler import GROW_AFTER

    s = Scheduler(max_rows=16)
    assert s.settle(s.max_rows) is None  # at the configured budget there is nothing to regain
    assert s.shrink() == 8 and s.shrink() == 4
    assert all(s.settle(3) is None for _ in range(2 * GROW_AFTER))  # calls under the budget prove nothing
    assert [s.settle(s.max_rows) for _ in range(GROW_AFTER - 1)] == [None] * (GROW_AFTER - 1)
    assert s.settle(s.max_rows) == 8
    for _ in range(GROW_AFTER - 1):
        s.settle(s.max_rows)
    assert s.shrink() == 4  # another out-of-memory error restarts the count
    assert all(s.settle(s.max_rows) is None for _ in range(GROW_AFTER - 1))
    assert s.settle(s.max_rows) == 8 and [s.settle(s.max_rows) for _ in range(GROW_AFTER)][-1] == 16
    assert all(s.settle(s.max_rows) is None for _ in range(GROW_AFTER)) and s.max_rows == 16


def test_static_mode_releases_a_batch_results_together_when_the_batch_is_done():
    now = [1.0]
    s = Scheduler(max_rows=8, mode="static", static_delay=0.0, clock=lambda: now[0])
    short, long = req("short", steps=1), req("long", steps=3)
    s.add(short)
    s.add(long)
    done: list[list[str]] = []
    while s.has_work:
        batch = s.schedule()
        for r in batch.requests:
            r.step_index += 1
        s.finish([r for r in batch.requests if r.done_denoising])
        done.append([r.request_id for r in s.take_released()])
        assert len(batch.requests) == (2 if len(done) == 1 else 1)  # finished rows leave the calls
    assert done == [[], [], ["short", "long"]]


def one_step_of_two(s: Scheduler, long_steps: int) -> tuple[Request, Request]:
    """A one-step and a ``long_steps`` request of one shape, after their first call."""
    short, long = req("short", steps=1), req("long", steps=long_steps)
    s.add(short)
    s.add(long)
    assert s.schedule().requests == (short, long)
    short.step_index = long.step_index = 1
    return short, long


def test_static_mode_releases_held_results_when_the_rest_of_the_batch_is_aborted():
    s = Scheduler(max_rows=8, mode="static", static_delay=0.0, clock=lambda: 1.0)
    short, long = one_step_of_two(s, long_steps=5)
    s.finish([short])
    assert s.take_released() == []
    s.remove(long)  # aborted
    assert s.take_released() == [short] and s.take_released() == []


def test_continuous_mode_releases_results_at_once():
    s = Scheduler(max_rows=8)
    short, _ = one_step_of_two(s, long_steps=2)
    s.finish([short])
    assert s.take_released() == [short] and s.has_work
