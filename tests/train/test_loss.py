"""Chunked linear + cross-entropy against the obviously-right reference: full logits and F.cross_entropy."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minitrain.train.loss import (
    chunked_cross_entropy_sum,
    liger_available,
    linear_cross_entropy_sum,
    scale_for_fsdp,
)


def _problem(t: int = 37, h: int = 16, v: int = 50, masked: float = 0.3, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=dtype) * 0.5).requires_grad_()
    labels = torch.randint(0, v, (t,), generator=g)
    labels[torch.rand(t, generator=g) < masked] = -100
    return hidden, weight, labels


def _reference(hidden, weight, labels):
    logits = (hidden @ weight.T).float()  # (T, V): the thing the chunked path never holds
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def _grads(fn, hidden, weight, labels):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, labels)
    loss.backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 36, 37, 1024])
def test_chunked_matches_full_logits_value_and_gradients(chunk_size: int) -> None:
    hidden, weight, labels = _problem()
    ref = _grads(_reference, hidden, weight, labels)
    got = _grads(
        lambda h, w, y: chunked_cross_entropy_sum(h, w, y, chunk_size=chunk_size), hidden, weight, labels
    )
    assert got[0].dtype == torch.float32 and got[0].ndim == 0
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)  # d loss / d hidden
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)  # d loss / d weight


def test_batched_shapes_and_downstream_scaling_follow_the_chain_rule() -> None:
    # (1, T, H) hidden as the model gives it, and a loss that is scaled afterwards (grad_output != 1)
    hidden, weight, labels = _problem(t=24)
    ref = _grads(lambda h, w, y: _reference(h, w, y) * 0.37, hidden, weight, labels)
    got = _grads(
        lambda h, w, y: chunked_cross_entropy_sum(h[None], w, y[None], chunk_size=7) * 0.37,
        hidden,
        weight,
        labels,
    )
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_all_masked_gives_zero_loss_and_zero_gradients() -> None:
    hidden, weight, labels = _problem(masked=1.1)
    assert (labels == -100).all()
    loss, gh, gw = _grads(chunked_cross_entropy_sum, hidden, weight, labels)
    assert loss.item() == 0.0
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_no_grad_value_matches_and_only_needed_gradients_are_built() -> None:
    hidden, weight, labels = _problem()
    with torch.no_grad():
        value = chunked_cross_entropy_sum(hidden, weight, labels, chunk_size=4)
        torch.testing.assert_close(value, _reference(hidden, weight, labels), rtol=1e-6, atol=1e-5)
    # frozen head (e.g. LoRA): gradient for hidden only
    w = weight.detach()
    hidden.grad = None
    chunked_cross_entropy_sum(hidden, w, labels, chunk_size=4).backward()
    ref_h = hidden.grad.clone()
    hidden.grad = None
    _reference(hidden, w, labels).backward()
    torch.testing.assert_close(ref_h, hidden.grad, rtol=1e-5, atol=1e-6)


def test_tied_weight_used_twice_accumulates_both_paths() -> None:
    # a tied lm_head is also the embedding: autograd must add the loss-head gradient to the embedding one
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(30, 8, generator=g).requires_grad_()
    ids = torch.randint(0, 30, (12,), generator=g)
    labels = torch.randint(0, 30, (12,), generator=g)

    def run(fn):
        emb.grad = None
        hidden = torch.tanh(emb[ids])
        fn(hidden, emb, labels).backward()
        return emb.grad.clone()

    torch.testing.assert_close(
        run(lambda h, w, y: chunked_cross_entropy_sum(h, w, y, chunk_size=5)),
        run(_reference),
        rtol=1e-5,
        atol=1e-6,
    )


def test_bf16_is_close_to_fp32_reference() -> None:
    hidden, weight, labels = _problem(t=64, h=32, v=100)
    hb, wb = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    loss = chunked_cross_entropy_sum(hb, wb, labels, chunk_size=16)
    loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    ref = _reference(hidden, weight, labels)
    torch.testing.assert_close(loss, ref.detach(), rtol=2e-2, atol=1e-1)


def test_backward_twice_is_refused() -> None:
    hidden, weight, labels = _problem()
    loss = chunked_cross_entropy_sum(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_liger_requested_on_cpu_warns_and_uses_the_chunked_path() -> None:
    assert liger_available("cpu") is False
    hidden, weight, labels = _problem()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = linear_cross_entropy_sum(hidden, weight, labels, use_liger=True, chunk_size=8)
    assert any("chunked loss" in str(w.message) for w in caught)
    torch.testing.assert_close(
        loss.detach(), _reference(hidden, weight, labels).detach(), rtol=1e-6, atol=1e-5
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's fused kernel needs a CUDA GPU")
def test_liger_matches_chunked_on_gpu() -> None:
    hidden, weight, labels = _problem(t=257, h=64, v=1000)
    hidden, weight = hidden.detach().cuda().requires_grad_(), weight.detach().cuda().requires_grad_()
    labels = labels.cuda()
    ref = _grads(chunked_cross_entropy_sum, hidden, weight, labels)
    got = _grads(lambda h, w, y: linear_cross_entropy_sum(h, w, y, use_liger=True), hidden, weight, labels)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_scale_for_fsdp_normalises_by_global_tokens_and_world() -> None:
    s = torch.tensor(12.0)
    assert scale_for_fsdp(s, 6, 1).item() == pytest.approx(2.0)
    assert scale_for_fsdp(s, 6, 4).item() == pytest.approx(8.0)
    assert scale_for_fsdp(torch.tensor(0.0), 0, 2).item() == 0.0


class _MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every matmul run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


def test_bf16_matmuls_stay_in_bf16_and_the_weight_gradient_sums_in_fp32() -> None:
    hidden, weight, labels = _problem(t=96, h=32, v=300, masked=0.1)
    hb, wb = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    with _MatmulDtypes() as mode:
        loss = chunked_cross_entropy_sum(hb, wb, labels, chunk_size=16)
    loss.backward()
    # 6 chunks x (logits, grad_hidden, grad_weight): no fp32 x fp32 matmul (no tensor cores on a GPU)
    assert len(mode.seen) == 18 and all(set(d) == {torch.bfloat16} for d in mode.seen)
    # reference: full fp32 logits from the same bf16-rounded inputs, so only the bf16 matmuls differ
    ref = _grads(
        _reference, hb.detach().float().requires_grad_(), wb.detach().float().requires_grad_(), labels
    )
    torch.testing.assert_close(loss.detach(), ref[0], rtol=1e-2, atol=1e-1)
    for got, want in ((hb.grad, ref[1]), (wb.grad, ref[2])):  # each within a few bf16 roundings (2^-8)
        assert (got.float() - want).norm() / want.norm() < 1e-2  # measured: 0.4%


def test_fp32_gradients_take_no_bf16_shortcut() -> None:
    hidden, weight, labels = _problem(t=64, h=16, v=70)
    with _MatmulDtypes() as mode:
        loss = chunked_cross_entropy_sum(hidden, weight, labels, chunk_size=16)
    loss.backward()
    assert mode.seen and all(set(d) == {torch.float32} for d in mode.seen)


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_weighted_head_equals_weighted_cross_entropy_on_full_logits(chunk):
    """weighted_head_loss: value and gradients of sum_t w_t CE_t, with w from the CEs it hands to `weigh`."""
    from minitrain.train.loss import weighted_head_loss

    hidden, weight, labels = _problem(seed=3)
    rows_seen = []

    def weigh(rows, ce):  # weights that depend on the values, as the preference objectives' do
        rows_seen.append(rows.clone())
        return torch.sigmoid(ce) - 0.3 * (rows % 3)

    loss, gh, gw = _grads(lambda h, w, y: weighted_head_loss(h, w, y, weigh, chunk), hidden, weight, labels)
    rows = (labels != -100).nonzero().squeeze(1)
    assert torch.equal(rows_seen[0], rows)
    ce_full = F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100, reduction="none")[rows]
    w_ref = (torch.sigmoid(ce_full) - 0.3 * (rows % 3)).detach()
    ref_loss, ref_gh, ref_gw = _grads(
        lambda h, w, y: (
            w_ref * F.cross_entropy((h @ w.T).float(), y, ignore_index=-100, reduction="none")[rows]
        ).sum(),
        hidden,
        weight,
        labels,
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the log-prob pass alone: value only, `weigh` still sees every CE
        assert weighted_head_loss(hidden, weight, labels, weigh, chunk).item() == pytest.approx(
            ref_loss.item(), rel=1e-6
        )
