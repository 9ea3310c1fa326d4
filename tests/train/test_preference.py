"""minitrain/train/preference.py: each objective against its textbook formula written out in plain floats,
segment sums against a Python loop, and the weighted-token surrogate against autograd through the sums."""

from __future__ import annotations

import math

import pytest
import torch

from minitrain.train.preference import PREFERENCE_LOSSES, pair_terms, segment_sums, token_weights


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def textbook(kind: str, pc, pr, nc, nr, rc, rr, beta, gamma, sft) -> tuple[float, float, float]:
    """(loss, reward_chosen, reward_rejected) of one pair, straight from the papers' definitions."""
    ac, ar = pc / nc, pr / nr
    if kind == "sigmoid":
        loss = -log_sigmoid(beta * ((pc - rc) - (pr - rr)))
    elif kind == "hinge":
        loss = max(0.0, 1 - beta * ((pc - rc) - (pr - rr)))
    elif kind == "ipo":
        loss = ((ac - rc / nc) - (ar - rr / nr) - 1 / (2 * beta)) ** 2
    elif kind == "simpo":
        loss = -log_sigmoid(beta * ac - beta * ar - gamma)
    else:  # orpo: odds = P / (1 - P) with P the per-token geometric mean probability
        p_c, p_r = math.exp(ac), math.exp(ar)
        loss = -ac - beta * log_sigmoid(math.log((p_c / (1 - p_c)) / (p_r / (1 - p_r))))
    if sft and kind != "orpo":
        loss += sft * -ac
    if kind in ("simpo", "orpo"):
        return loss, beta * ac, beta * ar
    return loss, beta * (pc - rc), beta * (pr - rr)


PAIRS = [  # (pi_c, pi_r, n_c, n_r, ref_c, ref_r): sums of log-probs and trained-token counts
    (-12.0, -15.5, 10, 12, -13.0, -14.0),
    (-40.2, -20.1, 30, 9, -41.0, -19.5),
    (-3.0, -3.0, 4, 4, -3.0, -3.0),
    (-0.02, -250.0, 2, 200, -0.5, -240.0),
]


@pytest.mark.parametrize("kind", PREFERENCE_LOSSES)
@pytest.mark.parametrize("sft", [0.0, 0.7])
def test_each_objective_matches_its_formula(kind: str, sft: float) -> None:
    t = torch.tensor(PAIRS, dtype=torch.float64)
    terms = pair_terms(
        kind,
        chosen=t[:, 0],
        rejected=t[:, 1],
        chosen_tokens=t[:, 2].long(),
        rejected_tokens=t[:, 3].long(),
        ref_chosen=t[:, 4],
        ref_rejected=t[:, 5],
        beta=0.3,
        simpo_gamma=0.4,
        sft_weight=sft,
    )
    for i, (pc, pr, nc, nr, rc, rr) in enumerate(PAIRS):
        loss, wc, wr = textbook(kind, pc, pr, nc, nr, rc, rr, 0.3, 0.4, sft)
        assert terms.loss[i].item() == pytest.approx(loss, rel=1e-12, abs=1e-12)
        assert terms.rewards_chosen[i].item() == pytest.approx(wc, rel=1e-12, abs=1e-12)
        assert terms.rewards_rejected[i].item() == pytest.approx(wr, rel=1e-12, abs=1e-12)
    assert terms.accuracies.tolist() == [
        float(a > b) for a, b in zip(terms.rewards_chosen, terms.rewards_rejected, strict=True)
    ]


def test_dpo_with_the_reference_equal_to_the_policy_is_ln2_with_zero_rewards() -> None:
    pc, pr = torch.tensor([-5.0, -80.0]), torch.tensor([-9.0, -3.0])
    terms = pair_terms(
        "sigmoid",
        chosen=pc,
        rejected=pr,
        chosen_tokens=torch.tensor([3, 40]),
        rejected_tokens=torch.tensor([5, 2]),
        ref_chosen=pc.clone(),
        ref_rejected=pr.clone(),
    )
    assert torch.equal(terms.loss, torch.full((2,), math.log(2.0)))
    assert torch.equal(terms.margins, torch.zeros(2)) and torch.equal(terms.accuracies, torch.zeros(2))


def test_reference_losses_refuse_to_run_without_a_reference() -> None:
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="needs the reference"):
        pair_terms("sigmoid", chosen=x, rejected=x, chosen_tokens=x + 1, rejected_tokens=x + 1)


def test_segment_sums_match_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(50, generator=g)
    segment = torch.randint(0, 7, (50,), generator=g)
    expected = [
        sum(v for v, s in zip(values.tolist(), segment.tolist(), strict=True) if s == k) for k in range(8)
    ]
    assert segment_sums(values, segment, 8).tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("kind", PREFERENCE_LOSSES)
def test_weighted_token_surrogate_has_the_objectives_gradient(kind: str) -> None:
    """d/dCE of sum_t c_t * CE_t equals d/dCE of the objective computed through the sequence sums."""
    g = torch.Generator().manual_seed(1)
    lengths = [5, 8, 3, 11, 6, 2]  # sequences 2k (chosen) and 2k + 1 (rejected) form pair k
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    ce = (torch.rand(int(sum(lengths)), generator=g, dtype=torch.float64) * 3 + 0.05).requires_grad_()
    ref = -torch.rand(len(lengths), generator=g, dtype=torch.float64) * 20

    counts = torch.tensor(lengths)

    def mean_loss(sums: torch.Tensor) -> torch.Tensor:  # the objective of 3 pairs from 6 sequence sums
        terms = pair_terms(
            kind,
            chosen=sums[0::2],
            rejected=sums[1::2],
            chosen_tokens=counts[0::2],
            rejected_tokens=counts[1::2],
            ref_chosen=ref[0::2],
            ref_rejected=ref[1::2],
            beta=0.2,
            sft_weight=0.3,
        )
        return terms.loss.sum() / 3

    # log p = -CE: autograd through the sums, straight to the token CEs
    (direct,) = torch.autograd.grad(mean_loss(segment_sums(-ce, segment, len(lengths))), ce)
    sums = segment_sums(-ce.detach(), segment, len(lengths)).requires_grad_()
    loss = mean_loss(sums)
    (sums_grad,) = torch.autograd.grad(loss, sums)
    c = token_weights(sums_grad, segment)
    (surrogate,) = torch.autograd.grad((c * ce).sum(), ce)
    assert torch.allclose(direct, surrogate, rtol=1e-12, atol=1e-15)
    assert direct.abs().sum() > 0  # the check compared something
