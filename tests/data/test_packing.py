"""Planner guarantees (property tests against plain checks), lower bound, FFD reference count, compute
cost."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minitrain.data.packing import lower_bound, plan_minibatches, sample_costs
from minitrain.errors import UserError


def check_guarantees(lengths: list[int], budget: int, world: int, plan: list[list[list[int]]]) -> None:
    placed = sorted(i for mb in plan for rank in mb for i in rank)
    assert placed == [i for i, n in enumerate(lengths) if n <= budget]  # each fitting index exactly once
    for mb in plan:
        assert len(mb) == world
        for rank in mb:
            assert sum(lengths[i] for i in rank) <= budget
    assert len(plan) >= lower_bound(lengths, budget, world)
    assert len(plan) <= -(-ffd_reference(lengths, budget) // world)  # never worse than plain FFD


def ffd_reference(lengths: list[int], budget: int) -> int:
    """Obviously-right first-fit decreasing (quadratic)."""
    rooms: list[int] = []
    for n in sorted((n for n in lengths if n <= budget), reverse=True):
        for b, room in enumerate(rooms):
            if n <= room:
                rooms[b] -= n
                break
        else:
            rooms.append(budget - n)
    return len(rooms)


lengths_strategy = st.lists(st.integers(min_value=0, max_value=600), min_size=0, max_size=160)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=lengths_strategy, budget=st.integers(1, 700), world=st.integers(1, 9))
def test_plan_guarantees(lengths: list[int], budget: int, world: int) -> None:
    check_guarantees(lengths, budget, world, plan_minibatches(lengths, budget, world))


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 4096), min_size=1, max_size=300),
    budget=st.sampled_from([512, 1024, 4096]),
    world=st.sampled_from([1, 2, 8, 64]),
)
def test_plan_guarantees_compute_cost(lengths: list[int], budget: int, world: int) -> None:
    check_guarantees(lengths, budget, world, plan_minibatches(lengths, budget, world, cost="compute"))


def test_plan_is_deterministic_and_uses_positional_contract() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 3000, 2000).tolist()
    a = plan_minibatches(lengths, 4096, 8)
    b = plan_minibatches(list(lengths), 4096, 8)
    assert a == b
    check_guarantees(lengths, 4096, 8, a)


@pytest.mark.parametrize("world", [1, 2, 8])
def test_heavy_tailed_batch_hits_bound_and_balances(world: int) -> None:
    rng = np.random.default_rng(world)
    lengths = np.maximum(1, rng.lognormal(np.log(256), 1.0, 2000)).astype(int)
    lengths = np.minimum(lengths, 4096).tolist()
    plan = plan_minibatches(lengths, 4096, world)
    check_guarantees(lengths, 4096, world, plan)
    assert len(plan) == lower_bound(lengths, 4096, world)
    busiest = sum(max(sum(lengths[i] for i in r) for r in mb) for mb in plan)
    floor = max(sum(lengths) / world, max(lengths))
    assert floor / busiest > 0.98


def test_too_long_samples_are_left_out() -> None:
    plan = plan_minibatches([10, 500, 20, 501], 100, 2)
    assert sorted(i for mb in plan for r in mb for i in r) == [0, 2]
    assert plan_minibatches([500, 600], 100, 2) == []
    assert plan_minibatches([], 100, 2) == []


def test_empty_ranks_are_empty_lists() -> None:
    plan = plan_minibatches([5], 100, 4)
    assert len(plan) == 1 and sorted(plan[0], key=len) == [[], [], [], [0]]


def test_lower_bound_counts_halves() -> None:
    assert lower_bound([60, 60, 60, 10], 100, 1) == 3  # three samples longer than half the budget
    assert lower_bound([50, 50, 50, 50], 100, 2) == 1
    assert lower_bound([], 100, 2) == 0


def test_compute_cost_weighs_long_samples_more() -> None:
    costs = sample_costs(np.array([100, 8192]), "compute", (1.0, 1.0 / 8192))
    assert costs[0] == pytest.approx(100 + 100**2 / 8192)
    assert costs[1] == pytest.approx(2 * 8192)
    # one long sample against many short ones: compute balancing gives the long sample's rank fewer tokens
    lengths = [2048] + [128] * 32
    by_tokens = plan_minibatches(lengths, 4096, 2)
    by_compute = plan_minibatches(lengths, 4096, 2, cost="compute", compute_coeffs=(1.0, 1.0 / 512))

    def tokens_with_long(plan: list[list[list[int]]]) -> int:
        return sum(lengths[i] for mb in plan for r in mb if 0 in r for i in r)

    assert tokens_with_long(by_compute) < tokens_with_long(by_tokens)


@pytest.mark.parametrize(("budget", "world", "cost"), [(0, 1, "tokens"), (10, 0, "tokens"), (10, 1, "flops")])
def test_bad_arguments_are_user_errors(budget: int, world: int, cost: str) -> None:
    with pytest.raises(UserError):
        plan_minibatches([1, 2, 3], budget, world, cost=cost)
