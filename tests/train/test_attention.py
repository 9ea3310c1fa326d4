"""Packed attention: a packed forward (and backward) equals each sample run alone, for every CPU attention
path."""

from __future__ import annotations

from re import search as re_search

import pytest
import torch

from minitrain.train.attention import (
    PACKED_ATTENTION,
    choose_attention,
    packed_attention_kwargs,
    register_packed_attention,
)
from tests.conftest import tiny_llama_config

LENGTHS = [5, 1, 13, 8, 2]


def _build(attn: str, config):
    from transformers import AutoModelForCausalLM

    if attn == PACKED_ATTENTION:
        register_packed_attention()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def _packed(lengths: list[int], vocab: int = 512):
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, torch.cat(ids)[None], pos, cu


def _param_grads(lm) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in lm.named_parameters()}


def _check_packed_equals_alone(attn: str, config, lengths=LENGTHS, use_kwargs: bool = True) -> None:
    lm = _build(attn, config)
    ids, packed, pos, cu = _packed(lengths, config.vocab_size)
    kwargs = packed_attention_kwargs(cu, max(lengths), attn) if use_kwargs else {}
    g = torch.Generator().manual_seed(2)
    probe = torch.randn(packed.shape[1], config.vocab_size, generator=g)  # a scalar that touches every logit

    logits = lm(input_ids=packed, position_ids=pos, use_cache=False, **kwargs).logits[0]  # (T, V)
    (logits * probe).sum().backward()
    got = _param_grads(lm)
    lm.zero_grad()

    alone = torch.cat([lm(input_ids=x[None], use_cache=False).logits[0] for x in ids])  # each sample alone
    (alone * probe).sum().backward()
    want = _param_grads(lm)

    torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)
    for name in want:
        # fp32 sums in another order: compare against the tensor's own scale (1e-5 of its largest entry)
        err = (got[name] - want[name]).abs().max().item()
        assert err <= 1e-5 * want[name].abs().max().item() + 1e-7, (name, err)


@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_ATTENTION])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_packed_forward_and_backward_equal_each_sample_alone(attn: str, kv_heads: int) -> None:
    _check_packed_equals_alone(attn, tiny_llama_config(num_key_value_heads=kv_heads))


def test_packed_attention_finds_samples_from_position_ids_without_kwargs() -> None:
    # a plain `lm(input_ids, position_ids)` call (e.g. evaluation code) stays exact too
    _check_packed_equals_alone(PACKED_ATTENTION, tiny_llama_config(), use_kwargs=False)


def test_packed_attention_honours_sliding_window() -> None:
    from transformers import MistralConfig

    config = MistralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        use_cache=False,
    )
    lengths = [9, 3, 12]
    _check_packed_equals_alone(PACKED_ATTENTION, config, lengths)
    # and the window really matters here: full causal attention would give other logits
    ids, packed, pos, cu = _packed(lengths, 128)
    windowed = _build(PACKED_ATTENTION, config)
    full = _build(PACKED_ATTENTION, MistralConfig(**{**config.to_dict(), "sliding_window": None}))
    kw = packed_attention_kwargs(cu, 12, PACKED_ATTENTION)
    a = windowed(input_ids=packed, position_ids=pos, **kw).logits
    b = full(input_ids=packed, position_ids=pos, **kw).logits
    assert (a - b).abs().max() > 1e-3


def test_packed_attention_refuses_padding_masks() -> None:
    lm = _build(PACKED_ATTENTION, tiny_llama_config())
    ids = torch.randint(0, 512, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    lm(input_ids=ids, attention_mask=mask)  # no padding: fine
    mask[1, 4:] = 0
    with pytest.raises(ValueError, match="padded batches"):
        lm(input_ids=ids, attention_mask=mask)


def test_kwargs_and_choice_on_this_machine() -> None:
    cu = torch.tensor([0, 3, 7], dtype=torch.int64)
    kw = packed_attention_kwargs(cu, 4, PACKED_ATTENTION)
    assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["max_length_k"] == 4
    assert packed_attention_kwargs(cu, 4, "flash_attention_2").keys() == kw.keys()
    assert packed_attention_kwargs(cu, 4, "sdpa") == {}
    assert choose_attention("cpu") == PACKED_ATTENTION


# --- flash-attn: detection as transformers does it, and the varlen path end to end with a stand-in kernel


def flash_attn_varlen_func(  # flash-attn 2.8's signature: transformers inspects it
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False, block_table=None,
):  # fmt: skip
    """A CPU stand-in for flash-attn's varlen kernel: q (total, Hq, D), k/v (total, Hkv, D) -> (total, Hq,
    D)."""
    assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
    assert causal and window_size == (-1, -1) and dropout_p == 0.0 and not softcap
    bounds = cu_seqlens_q.tolist()
    assert bounds[-1] == q.shape[0] and max_seqlen_q == max(
        b - a for a, b in zip(bounds, bounds[1:], strict=False)
    )
    CALLS.append(bounds)
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))  # (H, n, D)
        o = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=softmax_scale, enable_gqa=True
        )
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


CALLS: list[list[int]] = []


def _refuse(*args, **kwargs):
    raise AssertionError("the packed batch must go through flash_attn_varlen_func")


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """flash-attn 2.8.3 'installed': a module with the varlen kernel above, owned by the flash-attn
    distribution, and transformers told it is available (it would check for CUDA)."""
    import importlib.machinery
    import sys
    import types
    from importlib import metadata

    import transformers.modeling_flash_attention_utils as fa_utils

    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.flash_attn_varlen_func = flash_attn_varlen_func
    module.flash_attn_func = module.flash_attn_with_kvcache = _refuse
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input = padding.unpad_input = _refuse
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", padding)
    monkeypatch.setattr(metadata, "packages_distributions", lambda: {"flash_attn": ["flash_attn"]})
    monkeypatch.setattr(metadata, "version", lambda name: "2.8.3")
    monkeypatch.setattr(fa_utils, "is_flash_attn_2_available", lambda *a, **k: True)
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)
    CALLS.clear()
    return module


def test_flash_varlen_path_equals_packed_sdpa_end_to_end(fake_flash_attn) -> None:
    from minitrain.data.batch import PackedMinibatch
    from minitrain.train.attention import flash_attn_problem
    from minitrain.train.model import CausalLMWithLoss

    assert flash_attn_problem() is None
    config = tiny_llama_config()
    _, packed, pos, cu = _packed(LENGTHS, config.vocab_size)
    labels = packed.clone()
    labels[0, ::3] = -100
    batch = PackedMinibatch(
        input_ids=packed, labels=labels, position_ids=pos, cu_seqlens=cu, max_seqlen=max(LENGTHS),
        num_samples=len(LENGTHS), num_tokens=sum(LENGTHS), num_loss_tokens=int((labels != -100).sum()),
    )  # fmt: skip
    results = []
    for attn in ("flash_attention_2", PACKED_ATTENTION):
        lm = _build(PACKED_ATTENTION, config)  # same seed, same weights
        lm.config._attn_implementation = attn  # building with flash_attention_2 would ask for a GPU
        model = CausalLMWithLoss(lm, use_liger=False)
        loss = model(batch)
        loss.backward()
        results.append((loss.detach(), _param_grads(lm)))
    # one varlen call per layer, with the packed samples' boundaries
    bounds = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    assert [bounds] * config.num_hidden_layers == CALLS
    (flash_loss, flash_grads), (sdpa_loss, sdpa_grads) = results
    torch.testing.assert_close(flash_loss, sdpa_loss, rtol=1e-6, atol=1e-5)
    for name, want in sdpa_grads.items():
        torch.testing.assert_close(flash_grads[name], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "owners, version, importable, problem",
    [
        (["flash_attn"], "2.8.3", True, None),
        (["flash_attn_4"], "4.0.0b1", True, "comes from flash-attn-4, not flash-attn 2"),
        (["flash_attn"], "2.3.2", True, "flash-attn 2.3.2 is older than 2.3.3"),
        (["flash_attn"], "2.8.3", False, r"flash-attn 2.8.3 does not import \(.*undefined symbol"),
    ],
)
def test_flash_attn_is_used_only_when_it_really_works(
    fake_flash_attn, monkeypatch, capsys, owners, version, importable, problem
) -> None:
    import sys
    from importlib import metadata

    from minitrain.train.attention import flash_attn_problem

    monkeypatch.setattr(metadata, "packages_distributions", lambda: {"flash_attn": owners})
    monkeypatch.setattr(metadata, "version", lambda name: version)
    if not importable:  # a wheel built for another torch: the module is there, its extension does not load
        broken = type(sys)("flash_attn")
        broken.__spec__ = fake_flash_attn.__spec__
        broken.__getattr__ = lambda name: (_ for _ in ()).throw(
            ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")
        )
        monkeypatch.setitem(sys.modules, "flash_attn", broken)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if problem is None:
        assert flash_attn_problem() is None
        assert choose_attention("cuda") == "flash_attention_2"
        return
    assert re_search(problem, flash_attn_problem())
    warnings: list[str] = []
    assert choose_attention("cuda", warn=warnings.append) == PACKED_ATTENTION
    assert len(warnings) == 1 and "using packed SDPA attention instead of flash-attn" in warnings[0]


def test_no_flash_attn_is_a_silent_fallback(monkeypatch) -> None:
    from minitrain.train.attention import flash_attn_problem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert flash_attn_problem() == "not installed"
    warnings: list[str] = []
    assert choose_attention("cuda", warn=warnings.append) == PACKED_ATTENTION and warnings == []
