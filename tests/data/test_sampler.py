"""Sampler: determinism, per-epoch reshuffle, seamless epochs, exact resume at any position and world size."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minitrain.data.packing import plan_minibatches
from minitrain.data.sampler import InfiniteSampler, StopRule, epoch_permutation, split_validation
from minitrain.errors import UserError


def reference_stream(num_samples: int, seed: int, count: int) -> list[int]:
    """Obviously-right: concatenate the epoch permutations."""
    out: list[int] = []
    epoch = 0
    while len(out) < count:
        out += np.random.default_rng([seed, epoch]).permutation(num_samples).tolist()
        epoch += 1
    return out[:count]


def test_same_sequence_for_same_seed_and_epochs_reshuffle() -> None:
    a = InfiniteSampler(num_samples=50, seed=3)
    b = InfiniteSampler(num_samples=50, seed=3)
    assert [a.next_batch(7) for _ in range(20)] == [b.next_batch(7) for _ in range(20)]
    e0, e1 = epoch_permutation(50, 3, 0), epoch_permutation(50, 3, 1)
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(50))
    assert e0.tolist() != e1.tolist()
    assert InfiniteSampler(num_samples=50, seed=4).next_batch(50) != e0.tolist()


def test_batches_cross_epochs_seamlessly_and_count() -> None:
    s = InfiniteSampler(num_samples=10, seed=0)
    got = s.next_batch(7) + s.next_batch(7) + s.next_batch(7)
    assert got == reference_stream(10, 0, 21)
    assert (s.epoch, s.position, s.samples_consumed) == (2, 1, 21)
    assert s.epochs_consumed == pytest.approx(2.1)
    assert s.next_batch(25) == reference_stream(10, 0, 46)[21:]  # a batch larger than the data


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    seed=st.integers(0, 2**31),
    batch=st.integers(1, 30),
    stop=st.integers(0, 12),
)
def test_resume_anywhere_gives_the_uninterrupted_stream(n: int, seed: int, batch: int, stop: int) -> None:
    full = InfiniteSampler(num_samples=n, seed=seed)
    expected = [full.next_batch(batch) for _ in range(stop + 5)]
    first = InfiniteSampler(num_samples=n, seed=seed)
    for _ in range(stop):
        first.next_batch(batch)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = InfiniteSampler.from_state_dict(state)
    assert [resumed.next_batch(batch) for _ in range(5)] == expected[stop:]
    assert InfiniteSampler.at(n, seed, stop * batch).state_dict() == state


def test_resume_on_another_world_size_trains_the_same_samples() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 900, 300)
    run = InfiniteSampler(num_samples=300, seed=1)
    for _ in range(3):
        run.next_batch(64)
    state = run.state_dict()
    on_2 = InfiniteSampler.from_state_dict(state)
    on_8 = InfiniteSampler.from_state_dict(state)
    for _ in range(4):
        b2, b8 = on_2.next_batch(64), on_8.next_batch(64)
        assert b2 == b8
        p2 = plan_minibatches(lengths[b2].tolist(), 1024, 2)
        p8 = plan_minibatches(lengths[b8].tolist(), 1024, 8)
        assert sorted(i for mb in p2 for r in mb for i in r) == sorted(i for mb in p8 for r in mb for i in r)


def test_bad_states_are_user_errors() -> None:
    with pytest.raises(UserError):
        InfiniteSampler(num_samples=0, seed=0)
    with pytest.raises(UserError):
        InfiniteSampler(num_samples=5, seed=0, position=9)
    with pytest.raises(UserError):
        InfiniteSampler(num_samples=5, seed=0).next_batch(0)
    with pytest.raises(UserError):
        InfiniteSampler.from_state_dict({"seed": 1})


def test_stop_rule_ends_at_the_first_limit_reached() -> None:
    assert not StopRule().reached(steps=10**9, samples_seen=10**9, epochs=1e9)  # no limit: never
    rule = StopRule(max_steps=5, max_samples=100, max_epochs=2.0)
    assert not rule.reached(steps=4, samples_seen=99, epochs=1.9)
    assert rule.reached(steps=5, samples_seen=0, epochs=0.0)
    assert rule.reached(steps=0, samples_seen=100, epochs=0.0)
    assert rule.reached(steps=0, samples_seen=0, epochs=2.0 - 1e-13)  # float epochs: a tolerance
    tokens = StopRule(max_tokens=1000)
    assert not tokens.reached(steps=10**9 - 1, samples_seen=10**9, epochs=1e9, tokens_seen=999)
    assert tokens.reached(steps=0, samples_seen=0, epochs=0.0, tokens_seen=1000)


# --- --validation-split ------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 300), fraction=st.floats(0.01, 0.99), seed=st.integers(0, 2**31))
def test_validation_split_holds_out_floor_of_the_fraction_from_the_seed_alone(n, fraction, seed) -> None:
    held = int(fraction * n)  # the reference: floor of F x N
    if not 1 <= held < n:
        with pytest.raises(UserError, match="--validation-split"):
            split_validation(n, fraction, seed)
        return
    trained, held_out = split_validation(n, fraction, seed)
    assert len(held_out) == held and len(trained) == n - held
    assert sorted(np.concatenate([trained, held_out]).tolist()) == list(range(n))  # a partition
    again_trained, again_held = split_validation(n, fraction, seed)  # no hidden state, no rank in it
    assert again_held.tolist() == held_out.tolist() and again_trained.tolist() == trained.tolist()


def test_validation_split_depends_on_the_seed() -> None:
    assert split_validation(100, 0.2, 1)[1].tolist() != split_validation(100, 0.2, 2)[1].tolist()


def test_validation_split_refuses_a_fraction_that_holds_out_nothing() -> None:
    with pytest.raises(UserError, match=r"--validation-split 0.05 of 10 samples holds out none; raise it to"):
        split_validation(10, 0.05, 0)
    assert len(split_validation(3, 0.99, 0)[0]) == 1  # floor(2.97) = 2 held out: one left to train


def test_a_sampler_over_the_trained_ids_never_draws_a_held_out_sample_and_resumes() -> None:
    trained, held_out = split_validation(50, 0.3, seed=5)
    sampler = InfiniteSampler(num_samples=len(trained), seed=5, ids=trained)
    drawn = [sampler.next_batch(7) for _ in range(15)]  # 105 draws: 3 epochs of 35
    flat = [i for batch in drawn for i in batch]
    assert not set(flat) & set(held_out.tolist())
    for e in range(3):  # every trained sample exactly once per epoch, in the epoch's permutation
        assert flat[35 * e : 35 * (e + 1)] == trained[epoch_permutation(35, 5, e)].tolist()
    resumed = InfiniteSampler.from_state_dict(InfiniteSampler.at(35, 5, 21).state_dict(), ids=trained)
    assert resumed.next_batch(7) == drawn[3]
    with pytest.raises(UserError, match="ids"):
        InfiniteSampler(num_samples=36, seed=5, ids=trained)
