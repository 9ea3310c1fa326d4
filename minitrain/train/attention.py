"""Attention for packed minibatches: one row, several samples back to back, position_ids restarting at 0.

    input_ids     [ a0 a1 a2 a3 | b0 b1 | c0 c1 c2 ]      (1, T), no padding
    position_ids  [ 0  1  2  3  | 0  1  | 0  1  2  ]
    cu_seqlens    [ 0,          4,      6,         9 ]    (num_samples + 1,) int32

Owns the choice of attention implementation for training (`choose_attention`), the keyword arguments that
carry the sample boundaries through the Hugging Face model forward (`packed_attention_kwargs`), and
`minitrain_packed`, an attention function registered with transformers' `AttentionInterface` that runs causal
SDPA on each sample on its own.

The three ways to keep packed samples apart, and their trade-off:
- `flash_attention_2` (GPU with a working flash-attn 2, `flash_attn_problem`): flash varlen on
  `cu_seq_lens_q/k`; cost sum(len^2), no mask. Always preferred when available; a flash-attn that is there
  but unusable (flash-attn 4, too old, built for another torch) falls back to `minitrain_packed` with one
  warning line instead of failing every rank in `load_model`.
- `sdpa`: transformers 5 notices the restarting position_ids (only with no attention_mask and no KV cache) and
  builds a block-diagonal causal (T x T) mask: one big kernel call per layer, but work and mask memory grow
  with (sum len)^2.
- `minitrain_packed`: slices q/k/v at cu_seqlens and calls causal SDPA per sample: cost sum(len^2) and no
  mask, at the price of one kernel launch per sample per layer (Python overhead for packs of many tiny
  samples). `choose_attention` picks it whenever flash-attn is not there, by measurement
  (benchmarks/bench_train.py, CPU, fp32, fixture lengths, forward + backward): 2.3-3.5x the block-diagonal
  path's tokens/s on packs of 16-32 samples and 5.8-10x on 64, at a fraction of its peak memory (moderate
  model, 64 samples: 572 MB vs 2,830 MB), and faster than padded batches everywhere.

Under `--compile` (minitrain/train/compile.py) `minitrain_packed` stays eager (`torch.compiler.disable`): its
loop runs once per sample, and their number changes with every pack.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

PACKED_ATTENTION = "minitrain_packed"


def _sample_bounds(query: Tensor, kwargs: dict[str, Any]) -> list[int] | None:
    """Sample boundaries [0, e1, ..., T] from cu_seq_lens_q, else from restarting position_ids, else None."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return [int(x) for x in cu.tolist()]
    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[0] != 1:
        return None
    pos = position_ids.reshape(-1)  # (T,)
    starts = (pos == 0).nonzero().reshape(-1).tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return [*starts, pos.numel()]


@torch.compiler.disable  # eager inside a compiled block (--compile): a graph per sample count otherwise
def packed_sdpa_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Causal SDPA run on each packed sample alone. q (B, Hq, T, D), k/v (B, Hkv, T, D) -> (B, T, Hq, D).

    Sample boundaries come from `cu_seq_lens_q` (passed through the model forward by CausalLMWithLoss), else
    from position_ids restarting at 0; with neither (or B > 1), every row is one causal sequence.
    """
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(
            f"{PACKED_ATTENTION} attention supports neither softcap nor attention sinks; use eager"
        )
    if attention_mask is not None:
        raise ValueError(f"{PACKED_ATTENTION} attention takes packed rows without an attention mask")
    if not getattr(module, "is_causal", True):
        raise ValueError(f"{PACKED_ATTENTION} attention is for causal decoders only")
    gqa = query.shape[1] != key.shape[1]
    total = query.shape[2]
    bounds = _sample_bounds(query, kwargs) or [0, total]
    if bounds[-1] != total:
        raise ValueError(f"sample boundaries end at {bounds[-1]} but the packed row has {total} tokens")
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        n = end - start
        mask = None
        if sliding_window is not None and n > sliding_window:
            # transformers' sliding window: query i sees keys j with 0 <= i - j < window
            i = torch.arange(n, device=query.device)
            d = i[:, None] - i[None, :]
            mask = (d >= 0) & (d < sliding_window)
        outs.append(
            F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                scale=scaling,
                is_causal=mask is None,
                enable_gqa=gqa,
            )
        )
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (B, Hq, T, D)
    return out.transpose(1, 2).contiguous(), None


def _packed_mask(*args: Any, attention_mask: Tensor | None = None, **kwargs: Any) -> None:
    """Mask interface for `minitrain_packed`: no (T x T) mask is ever built; padding masks are refused."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            f"{PACKED_ATTENTION} attention does not take padded batches; "
            "pack the samples into one row instead"
        )
    return None


def register_packed_attention() -> str:
    """Register `minitrain_packed` with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_mask)
    return PACKED_ATTENTION


FLASH_ATTN_MIN_VERSION = "2.3.3"  # what transformers' is_flash_attn_2_available asks for


def flash_attn_problem() -> str | None:
    """Why the installed flash-attn cannot serve `flash_attention_2`, None when it can; checked as
    transformers does (the `flash_attn` module belongs to the flash-attn distribution, at least 2.3.3) plus an
    import of `flash_attn_varlen_func` that really runs (a build against another torch fails only there).

    flash-attn 4 (`flash-attn-4`) installs the same module name with another API, hence the distribution
    check. Not installed at all is a problem too ("not installed"); the caller decides whether that is worth
    a word.
    """
    from importlib import metadata

    from packaging.version import InvalidVersion, Version

    if importlib.util.find_spec("flash_attn") is None:
        return "not installed"
    owners = [
        name.lower().replace("_", "-") for name in metadata.packages_distributions().get("flash_attn", [])
    ]
    if "flash-attn" not in owners:
        return (
            f"the flash_attn module comes from {', '.join(owners) or 'no known distribution'}, "
            "not flash-attn 2"
        )
    version = metadata.version("flash-attn")
    try:
        too_old = Version(version) < Version(FLASH_ATTN_MIN_VERSION)
    except InvalidVersion:
        too_old = True
    if too_old:
        return f"flash-attn {version} is older than {FLASH_ATTN_MIN_VERSION}"
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception as err:  # ImportError (undefined symbol: built for another torch/CUDA), OSError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"flash-attn {version} does not import ({first[:200]})"
    return None


def choose_attention(device: torch.device | str, *, warn: Callable[[str], None] | None = None) -> str:
    """The attention implementation for packed training on `device` (registers `minitrain_packed` if chosen).

    flash varlen on a CUDA device with a working flash-attn 2; otherwise our packed SDPA, and when flash-attn
    is installed but unusable, `warn` gets one line saying why.
    """
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return register_packed_attention()
    problem = flash_attn_problem()
    if problem is None:
        return "flash_attention_2"
    if problem != "not installed" and warn is not None:
        warn(f"minitrain: warning: {problem}; using packed SDPA attention instead of flash-attn")
    return register_packed_attention()


def packed_attention_kwargs(cu_seqlens: Tensor, max_seqlen: int, attn_implementation: str) -> dict[str, Any]:
    """Keyword arguments for the HF model forward that carry the sample boundaries to the attention function.

    flash varlen and `minitrain_packed` read `cu_seq_lens_q/k` + `max_length_q/k` (the names transformers'
    flash path uses); `sdpa`/`eager` get nothing and rely on the restarting position_ids instead.
    """
    if attn_implementation.startswith("flash_attention") or attn_implementation == PACKED_ATTENTION:
        # flash varlen reads them on the GPU; minitrain_packed slices with Python ints, so it gets a CPU copy
        # (one device sync per forward instead of one per layer)
        device = "cpu" if attn_implementation == PACKED_ATTENTION else cu_seqlens.device
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
        return {
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": max_seqlen,
            "max_length_k": max_seqlen,
        }
    return {}
