"""Preference objectives (DPO and its cousins) on per-sequence log-probabilities from packed rows.

A preference pair is two sequences, chosen and rejected, that share a prompt. Every objective here is a
function of four numbers per pair and side: the policy's summed log-probability of the trained tokens,
the number of trained tokens, and (for the objectives that have one) the reference model's summed
log-probability. In a packed minibatch the sequences sit side by side on one row; `segment_sums` turns
token log-probabilities into per-sequence sums with one scatter-add.

    logits_p = beta * ((pi_c - ref_c) - (pi_r - ref_r))          pi, ref: SUMS over trained tokens

    sigmoid (DPO)  -log sigmoid(logits_p)                         Rafailov et al. 2023
    hinge          max(0, 1 - logits_p)                           SLiC (Zhao et al. 2023)
    ipo            (h - 1 / (2 beta))^2, h = (avg_pi_c - avg_ref_c) - (avg_pi_r - avg_ref_r)
                                                                  Azar et al. 2023 (log-probs averaged
                                                                  per token)
    simpo          -log sigmoid(beta * (avg_pi_c - avg_pi_r) - gamma)      Meng et al. 2024, reference-free
    orpo           nll_c - beta * log sigmoid(log_odds),
                   log_odds = (a_c - log(1 - e^a_c)) - (a_r - log(1 - e^a_r)),
                   a = avg_pi, nll_c = -a_c                       Hong et al. 2024, reference-free

Rewards (logged, not trained): beta * (pi - ref) for the objectives with a reference, beta * avg_pi for
SimPO and ORPO. `--sft-weight w` adds w * nll_c (the chosen side's per-token NLL) to any objective; ORPO has
its own NLL term already.

Gradients without the logits: the loss of a pair depends on its sequences only through their sums, so
dL/dtheta = sum_t c_t * dCE_t/dtheta with c_t = -dL/dpi_seq(t) (a per-sequence constant, spread over that
sequence's trained tokens). `token_weights` computes c_t from the per-sequence sums; the loss head then
back-propagates the weighted sum of token cross-entropies, chunk by chunk, exactly like SFT's (whose
weights are all 1 / trained tokens). The objective's value is computed from the same sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from minitrain.config import PREFERENCE_LOSSES

REFERENCE_FREE = frozenset({"simpo", "orpo"})


def segment_sums(values: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """float64 [num_segments]: sum of `values` [N] per segment id in `segment` [N] (ids in 0..num_segments-1).

    float64 so that a 4k-token sequence's log-probability keeps ~1e-12 relative precision: preference
    logits are small differences of large sums.
    """
    out = torch.zeros(num_segments, dtype=torch.float64, device=values.device)
    return out.index_add_(0, segment, values.to(torch.float64))


@dataclass(frozen=True)
class PairTerms:
    """Per-pair tensors [P] of one objective: the loss and what is logged about each pair."""

    loss: Tensor
    rewards_chosen: Tensor
    rewards_rejected: Tensor

    @property
    def margins(self) -> Tensor:
        return self.rewards_chosen - self.rewards_rejected

    @property
    def accuracies(self) -> Tensor:
        """1.0 where the chosen side's reward is strictly higher (TRL's convention), else 0.0."""
        return (self.rewards_chosen > self.rewards_rejected).to(self.loss.dtype)


def _log1m_exp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a < 0, stable at both ends (Maechler 2012)."""
    return torch.where(a > -0.6931471805599453, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def pair_terms(
    kind: str,
    *,
    chosen: Tensor,
    rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    sft_weight: float = 0.0,
) -> PairTerms:
    """The objective `kind` per pair, from per-sequence log-probability SUMS [P] and trained-token counts [P].

    `ref_*` are the reference model's sums (needed unless `kind` is reference-free). Differentiable in
    `chosen` and `rejected`.
    """
    if kind not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {kind!r}; one of {', '.join(PREFERENCE_LOSSES)}")
    n_c = chosen_tokens.to(chosen.dtype).clamp(min=1)
    n_r = rejected_tokens.to(rejected.dtype).clamp(min=1)
    avg_c, avg_r = chosen / n_c, rejected / n_r
    nll_c = -avg_c
    if kind in REFERENCE_FREE:
        rewards_c, rewards_r = beta * avg_c.detach(), beta * avg_r.detach()
        if kind == "simpo":
            loss = -F.logsigmoid(beta * (avg_c - avg_r) - simpo_gamma)
        else:  # orpo
            log_odds = (avg_c - _log1m_exp(avg_c)) - (avg_r - _log1m_exp(avg_r))
            loss = nll_c - beta * F.logsigmoid(log_odds)
    else:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"the {kind} loss needs the reference model's log-probabilities")
        ratio_c, ratio_r = chosen - ref_chosen, rejected - ref_rejected
        rewards_c, rewards_r = beta * ratio_c.detach(), beta * ratio_r.detach()
        if kind == "sigmoid":
            loss = -F.logsigmoid(beta * (ratio_c - ratio_r))
        elif kind == "hinge":
            loss = torch.relu(1.0 - beta * (ratio_c - ratio_r))
        else:  # ipo
            h = (avg_c - ref_chosen / n_c) - (avg_r - ref_rejected / n_r)
            loss = (h - 1.0 / (2.0 * beta)) ** 2
    if sft_weight and kind != "orpo":
        loss = loss + sft_weight * nll_c
    return PairTerms(loss, rewards_c, rewards_r)


def token_weights(sums_grad: Tensor, segment: Tensor) -> Tensor:
    """c_t [N] for the loss head: minus dL/d(sequence sum) of each trained token's sequence.

    `sums_grad` [S] is the gradient of the (already normalised) loss with respect to the per-sequence
    log-probability sums; `segment` [N] maps each trained token to its sequence. Since log p = -CE, the
    loss's gradient equals that of sum_t c_t * CE_t with these constants.
    """
    return (-sums_grad).index_select(0, segment)
