"""Packed attention: a packed forward (and backward) equals each sample run alone, for every CPU attention path."""

from __future__ import annotations

import pytest
import torch

from minitrain.train.attention import (
    PACKED_ATTENTION,
    choose_attention,
    flash_attn_available,
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
    assert flash_attn_available("cpu") is False
    assert choose_attention("cpu") == PACKED_ATTENTION
