"""Hugging Face export of the sharded model: OUT/hf_format/samples_<N>/, loadable by `from_pretrained`.

Layout of one export (what `AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer` read):

    OUT/hf_format/samples_<N>/      N = samples trained when it was written
        config.json  generation_config.json
        model.safetensors | model-0000k-of-0000n.safetensors + model.safetensors.index.json
        tokenizer.json  tokenizer_config.json  special_tokens_map.json  ...
                                        (copied from the tokenizer source)
    OUT/hf_format/best/             --save-best-val-loss: the same, for the lowest eval_loss so far, and
        best_val_loss.json              {eval_loss, step, samples}

Every rank takes part in gathering the full state dict (`get_model_state_dict(full_state_dict=True,
cpu_offload=True)`: shards are all-gathered one tensor at a time and moved to CPU, so no GPU ever holds the
whole model; rank 0 ends up with the full dict in host RAM, the others with an empty one). Rank 0 writes it
into `.samples_<N>.tmp` and renames the folder into place only when complete, so a folder named
`samples_<N>` is always a whole checkpoint. Trade-off: rank 0 needs host RAM for one full copy in the
export dtype (bf16 for GPU training, 2 bytes per parameter: 140 GB for 70B; fp32 on CPU), cast tensor by
tensor as it is gathered (`gather_full_state_dict_as`), not a master-dtype copy and a cast copy at once.
Writing shard files as the tensors arrive would need only one shard's RAM, but `save_pretrained` owns the
file names, tied-weight removal and transformers 5's key conversions, so the whole dict goes through it.
`--merge-lora` costs more: the whole model in the master dtype (4 bytes a parameter with fp32 master
weights) plus the merged copy in the export dtype, on rank 0's host, at every checkpoint.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import torch
import torch.distributed as torch_dist
from torch import nn

from minitrain.rundir import BEST_INFO_FILE, best_export_dir, export_dir, read_best
from minitrain.train.dist import DistInfo, print0

if TYPE_CHECKING:
    from minitrain.config import LoraSettings, TrainConfig

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


def checkpoint_dir(output_dir: Path, samples: int) -> Path:
    """OUT/hf_format/samples_<N>."""
    return export_dir(output_dir, samples)


def gather_full_state_dict(
    model: nn.Module, *, prefix: str = "lm.", trainable_only: bool = False
) -> dict[str, torch.Tensor]:
    """Full, CPU-resident state dict of the HF model inside `model` on rank 0 (empty elsewhere); collective.

    `trainable_only` skips the frozen parameters (an adapter export needs only the new adapter's).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(model, options=options)
    return {k.removeprefix(prefix): v for k, v in state.items()}


def gather_full_state_dict_as(model: nn.Module, dtype: torch.dtype, *, prefix: str = "lm.") -> dict:
    """Full state dict of the HF model inside `model` on rank 0 (empty elsewhere), floating tensors in
    `dtype`; collective. Streams: each tensor is all-gathered on its device, cast there, moved to the CPU, and
    its gathered copy freed before the next, so rank 0's host holds the model once in `dtype` (2 bytes a
    parameter for bf16), never a master-dtype copy beside it. A tied weight is gathered once, under both its
    names."""
    from torch.distributed.tensor import DTensor

    rank0 = not torch_dist.is_initialized() or torch_dist.get_rank() == 0
    state: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) not in done:
            tensor = value.detach()
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # every rank takes part
            if rank0:
                done[id(value)] = full.to(dtype=dtype if full.is_floating_point() else full.dtype).cpu()
            del full
        if rank0:
            state[key.removeprefix(prefix)] = done[id(value)]
    return state


def merge_host_bytes(num_params: int, master_dtype: torch.dtype, export_dtype: torch.dtype) -> int:
    """Rank 0's host memory for one `--merge-lora` export: the gathered model in the master dtype, the CPU
    model PEFT merges in (built in fp32, torch's default dtype), and the merged weights cast for export."""
    return num_params * (master_dtype.itemsize + torch.float32.itemsize + export_dtype.itemsize)


def save_hf_checkpoint(
    model: nn.Module,
    lm: nn.Module,
    *,
    output_dir: Path,
    samples: int,
    dist: DistInfo,
    dtype: torch.dtype,
    tokenizer_source: str | None,
    adapter: LoraSettings | None = None,
    merge_adapter: bool = False,
    folder: Path | None = None,
    extra_files: dict[str, bytes] | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Write `model`'s weights (sharded or not) as a Hugging Face checkpoint; every rank must call this.

    `model` is what was sharded (the `CausalLMWithLoss` root), `lm` the HF model inside it (whose config and
    `save_pretrained` are used). With `adapter`, `lm` is a PEFT model and the folder holds the new adapter
    in PEFT's format instead (`PeftModel.from_pretrained(base, folder)`), plus, with `merge_adapter`, the
    base model with every adapter merged in under `merged/` (`AutoModelForCausalLM.from_pretrained`).
    `folder` replaces the default OUT/hf_format/samples_<N> (`--save-best-val-loss`: OUT/hf_format/best) and
    `extra_files` (name -> bytes) are written into it with the weights, so they are replaced together.
    Returns the checkpoint folder.
    """
    final = checkpoint_dir(output_dir, samples) if folder is None else Path(folder)
    if adapter is None:  # cast tensor by tensor while gathering: one copy, in the export dtype
        state = gather_full_state_dict_as(model, dtype)
    else:  # the adapter alone (small), or the whole model in the master dtype to merge into (--merge-lora)
        state = gather_full_state_dict(model, trainable_only=not merge_adapter)
    if dist.is_main:
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if adapter is None:
            _save_pretrained(lm, tmp, state, dtype)
        else:
            from minitrain.train.adapters import merged_state_dict, save_adapter

            save_adapter(lm, {k: v.to(dtype) for k, v in state.items()}, tmp, adapter)
            if merge_adapter:  # merged in the master dtype, then cast: one rounding, not two
                merged = merged_state_dict(lm.get_base_model().config, adapter, state)
                _save_pretrained(
                    lm.get_base_model(), tmp / "merged", {k: v.to(dtype) for k, v in merged.items()}, dtype
                )
                _copy_tokenizer(tokenizer_source, tmp / "merged", trust_remote_code)
        _copy_tokenizer(tokenizer_source, tmp, trust_remote_code)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        replace_folder(tmp, final)
    del state
    if torch_dist.is_initialized():
        torch_dist.barrier()
    return final


def keep_best(evaluate_now, config: TrainConfig, model, state, dist: DistInfo, **export):
    """`--save-best-val-loss`: `evaluate_now`, then, when eval_loss is the lowest so far, the weights exported
    to OUT/hf_format/best with best_val_loss.json (replaced whole). eval_loss is all-reduced, so every rank
    takes the same decision and joins the same collective export. A resumed run starts from the recorded
    best, so it never replaces a better one."""
    recorded = read_best(config.output_dir) if config.resume is not None and dist.is_main else None
    best = [recorded["eval_loss"] if recorded else math.inf]
    if dist.world_size > 1:  # rank 0's record: every rank must take the same save decisions
        torch_dist.broadcast_object_list(best, src=0)

    def evaluate_and_keep() -> dict[str, float]:
        values = evaluate_now()
        loss = values["eval_loss"]
        if loss < best[0]:  # NaN never is
            best[0] = loss
            info = {"eval_loss": loss, "step": state.step, "samples": state.samples_seen}
            path = save_hf_checkpoint(
                model, model.lm, output_dir=config.output_dir, samples=state.samples_seen, dist=dist,
                adapter=config.lora_settings(), merge_adapter=config.merge_lora,
                trust_remote_code=config.trust_remote_code,
                folder=best_export_dir(config.output_dir),
                extra_files={BEST_INFO_FILE: orjson.dumps(info, option=orjson.OPT_INDENT_2) + b"\n"},
                **export,
            )  # fmt: skip
            print0(dist, f"saved {path} (eval_loss {loss:.4f}, the lowest so far)")
        return values

    return evaluate_and_keep


def replace_folder(new: Path, final: Path) -> None:
    """Move the complete folder `new` to `final`; an existing `final` (the same sample count saved twice, or
    hf_format/best improved) is first renamed aside and removed only after `new` is in place, so `final`, when
    it exists, is always one whole export, the old or the new."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _save_pretrained(lm: nn.Module, path: Path, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """`lm.save_pretrained` with `state`, recording `dtype` and turning the KV cache back on for inference."""
    from transformers.utils import logging as hf_logging

    config = lm.config
    saved = (config.use_cache, getattr(config, "dtype", None))
    config.use_cache, config.dtype = True, dtype  # training runs without a cache; generation wants one
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar between the metric lines
    try:
        lm.save_pretrained(path, state_dict=state, safe_serialization=True, max_shard_size="5GB")
    finally:
        config.use_cache, config.dtype = saved
        if bars:
            hf_logging.enable_progress_bar()


def _copy_tokenizer(source: str | None, dest: Path, trust_remote_code: bool = False) -> None:
    """Tokenizer files beside the weights: copied from a folder, or saved from a Hub id's cached tokenizer."""
    if source is None:
        return
    src = Path(source)
    if src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dest / name)
        return
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code).save_pretrained(dest)
