"""LoRA, QLoRA and stacked adapters through PEFT, and their export.

The adapters are PEFT's own, so what minitrain saves is what `PeftModel.from_pretrained` loads. Stacking
keeps earlier adapters unmerged: each base adapter is loaded frozen under its own name, the new adapter is
added beside them, and all of them are active at once, so the forward is exactly base + sum of deltas (no
rounding from merging into bf16 weights). Only the new adapter's parameters require gradients, so only
they reach the optimizer.

Under FSDP2 the model's parameters are shards; every export here starts from a full state dict gathered
on rank 0 (`torch.distributed.checkpoint.state_dict.get_model_state_dict(full_state_dict=True)`), keyed
like the PEFT model's own `state_dict()`. Merging (`--merge-lora`) rebuilds the PEFT model on rank 0's
CPU from that state dict, so it needs the full model in host memory once; the adapter export does not.

The DPO reference of an adapter run (`reference_adapters`) is the same model with the new adapter switched
off and the base adapters of a stack still on: no second copy of the weights, one no-grad forward per
minibatch. PEFT's switches also flip `requires_grad`; FSDP2 reads that flag when it gathers a parameter, so
the flags are put back to the training ones before the reference forward runs, not only after it.

QLoRA (`--load-in-4bit`): transformers loads the base through bitsandbytes in NF4 with double-quantized
scales (`nf4_config`); PEFT puts its LoRA layers around bitsandbytes' `Linear4bit`. The 4-bit parameters
(`quantized_parameters`) stay out of FSDP2, replicated on every rank. Merging is refused: it would round the
merged weights back to 4 bits.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from minitrain import __version__
from minitrain.config import LoraSettings
from minitrain.errors import UserError

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel

NEW_ADAPTER = "default"  # PEFT saves the adapter named "default" at the root of the directory
STACK_FILE = "minitrain_adapter.json"  # beside adapter_config.json: what the adapter was trained on top of


def base_adapter_names(count: int) -> list[str]:
    return [f"base_{i}" for i in range(count)]


def _lora_config(settings: LoraSettings):
    from peft import LoraConfig

    targets = settings.target_modules
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type="CAUSAL_LM",
    )


def add_adapters(lm: PreTrainedModel, settings: LoraSettings, *, load_base_weights: bool = True) -> PeftModel:
    """Wrap `lm` with the frozen base adapters (in order) and a new trainable LoRA adapter, all active.

    The structure is built from the adapters' configs; the base adapters' weights are then loaded from
    disk unless `load_base_weights` is False (a rank on the meta device, which receives every weight from
    rank 0 when the model is sharded, or a rebuild that loads a full state dict next).
    """
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    names = base_adapter_names(len(settings.base_adapters))
    configs = [PeftConfig.from_pretrained(str(path)) for path in settings.base_adapters]
    try:
        if names:
            model = get_peft_model(lm, configs[0], adapter_name=names[0])
            for name, config in zip(names[1:], configs[1:], strict=True):
                model.add_adapter(name, config)
            model.add_adapter(NEW_ADAPTER, _lora_config(settings))
        else:
            model = get_peft_model(lm, _lora_config(settings), adapter_name=NEW_ADAPTER)
    except ValueError as err:  # e.g. target modules not found in the model
        raise UserError(f"LoRA: {err}") from None
    if load_base_weights:
        for name, path in zip(names, settings.base_adapters, strict=True):
            weights = Path(path) / "adapter_model.safetensors"
            if not weights.is_file():
                raise UserError(f"--base-adapter {path}: no adapter_model.safetensors there")
            try:
                result = set_peft_model_state_dict(model, load_file(str(weights)), adapter_name=name)
            except (RuntimeError, OSError) as err:  # shape mismatch, unreadable or truncated safetensors
                lines = [line.strip() for line in str(err).splitlines() if line.strip()]
                detail = next(
                    (line for line in lines if line.startswith("size mismatch")), lines[0] if lines else ""
                )
                raise UserError(f"--base-adapter {path}: weights do not fit this model ({detail})") from None
            if result.unexpected_keys:
                raise UserError(
                    f"--base-adapter {path}: weights do not fit this model ({result.unexpected_keys[0]} ...)"
                )
    activate_stack(model, names)
    return model


def activate_stack(model: PeftModel, base_names: Sequence[str]) -> None:
    """Make the base adapters and the new one active together; only the new one trains."""
    model.base_model.set_adapter([*base_names, NEW_ADAPTER])
    _train_only_new(model)


def _train_only_new(model: PeftModel) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = f".{NEW_ADAPTER}." in name


@contextmanager
def reference_adapters(model: PeftModel, base_names: Sequence[str]) -> Iterator[None]:
    """Inside: the model is the DPO reference, the base model plus the frozen base adapters (in order) with
    the new adapter off (PEFT's `disable_adapter()` without base adapters, `set_adapter(base_names)` with
    them). `requires_grad` stays as in training throughout; on exit every adapter of the stack is active
    again."""
    if base_names:
        model.base_model.set_adapter(list(base_names))
        switch = nullcontext()
    else:
        switch = model.disable_adapter()
    try:
        with switch:
            _train_only_new(model)  # PEFT froze every adapter: FSDP2 must see the training flags
            yield
    finally:
        activate_stack(model, base_names)


def logical_numel(param: torch.Tensor) -> int:
    """Elements of the weight a parameter stands for: a packed 4-bit weight holds two per stored byte."""
    quant_state = getattr(param, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else param.numel()


def trainable_parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the weights they encode."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(logical_numel(p) for p in model.parameters())


def save_adapter(
    model: PeftModel, full_state_dict: dict[str, torch.Tensor], out_dir: Path, settings: LoraSettings
) -> None:
    """Write the new adapter in PEFT's format (adapter_config.json, adapter_model.safetensors) + the stack
    record."""
    from peft import get_peft_model_state_dict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter_sd = get_peft_model_state_dict(model, state_dict=full_state_dict, adapter_name=NEW_ADAPTER)
    model.save_pretrained(str(out_dir), selected_adapters=[NEW_ADAPTER], state_dict=adapter_sd)
    record = {
        "minitrain_version": __version__,
        "base_adapters": [str(Path(p).resolve()) for p in settings.base_adapters],
        "load_order": "load each base adapter, then this one, and activate them all together",
    }
    (out_dir / STACK_FILE).write_text(json.dumps(record, indent=2) + "\n")


def merged_state_dict(
    config, settings: LoraSettings, full_state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter of the stack merged in, built on this rank's CPU.

    `config` is the base model's config and `full_state_dict` the PEFT model's gathered state dict. The
    PEFT structure is rebuilt on the CPU, filled from the state dict, and PEFT's `merge_and_unload` folds
    every active adapter into the base weights. (Built on the meta device instead, PEFT's merge silently
    skipped the adapters; a test guards this.) Costs one full copy of the model in host memory.
    """
    from transformers import AutoModelForCausalLM

    skeleton = add_adapters(AutoModelForCausalLM.from_config(config), settings, load_base_weights=False)
    skeleton.load_state_dict(full_state_dict, strict=True)
    merged = skeleton.merge_and_unload()
    return {k: v.contiguous() for k, v in merged.state_dict().items()}


# tests and development only: QLoRA on bitsandbytes' CPU backend, in fp32 compute
CPU_QLORA_ENV = "MINITRAIN_QLORA_ON_CPU"


def require_qlora(device_type: str) -> None:
    """QLoRA needs a CUDA GPU and bitsandbytes; refuse up front with the fix named.

    With MINITRAIN_QLORA_ON_CPU=1 the same path runs on bitsandbytes' CPU backend (slow, fp32 compute): the
    test suite's way of exercising 4-bit loading, sharding, training and export on a machine without a GPU.
    """
    if device_type != "cuda" and os.environ.get(CPU_QLORA_ENV) != "1":
        raise UserError(
            "--load-in-4bit (QLoRA) needs a CUDA GPU; none is visible. "
            "Drop the flag to train LoRA in full precision"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--load-in-4bit needs bitsandbytes: pip install 'minitrain[qlora]'")


def nf4_config(compute_dtype: torch.dtype):
    """QLoRA's quantisation: NF4 weights, double-quantised scales, matmuls in `compute_dtype` (bf16 on
    GPU)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def quantized_parameters(model: torch.nn.Module) -> set[torch.nn.Parameter]:
    """The parameters of every bitsandbytes 4-bit linear layer (packed NF4 weights and their biases).

    They are frozen; FSDP2 leaves them alone (`ignored_params`), so each rank keeps its own whole copy.
    Also switches off bitsandbytes' CPU repacking: the first forward in eval mode without gradients (an
    evaluation) rewrites a weight into a layout whose kernel has no backward, after which training silently
    loses the gradient through the base (seen with bitsandbytes 0.50 on CPUs with AVX512-BF16). GPUs never
    repack.
    """
    from bitsandbytes.nn import Linear4bit

    layers = [module for module in model.modules() if isinstance(module, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return {p for layer in layers for p in layer.parameters()}
