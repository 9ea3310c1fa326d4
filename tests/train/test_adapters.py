"""LoRA and stacked adapters: PEFT loads what we save, stacking equals applying the adapters in order."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from minitrain.config import LoraSettings, parse_target_modules
from minitrain.errors import UserError
from minitrain.train.adapters import (
    CPU_QLORA_ENV,
    NEW_ADAPTER,
    STACK_FILE,
    add_adapters,
    logical_numel,
    merged_state_dict,
    nf4_config,
    quantized_parameters,
    require_qlora,
    save_adapter,
    trainable_parameter_count,
)
from tests.conftest import tiny_llama_config

IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 7, 30, 4, 11]])


def fresh_base() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        tiny_llama_config(vocab_size=64), attn_implementation="sdpa"
    ).eval()


def randomize_new_adapter(model: torch.nn.Module, seed: int) -> None:
    """LoRA B starts at zero (a no-op adapter); give the trainable adapter real values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trained_adapter(tmp_path, name: str, seed: int, base_adapters=()) -> tuple[torch.Tensor, LoraSettings]:
    settings = LoraSettings(
        rank=4, target_modules=("q_proj", "v_proj", "down_proj"), base_adapters=tuple(base_adapters)
    )
    model = add_adapters(fresh_base(), settings)
    randomize_new_adapter(model, seed)
    save_adapter(model, model.state_dict(), tmp_path / name, settings)
    return logits(model), settings


def test_only_the_new_adapter_trains():
    model = add_adapters(fresh_base(), LoraSettings(rank=4))
    trainable, total = trainable_parameter_count(model)
    assert 0 < trainable < total / 10
    assert all(f".{NEW_ADAPTER}." in n for n, p in model.named_parameters() if p.requires_grad)


def test_saved_adapter_loads_with_peft_and_reproduces_logits(tmp_path):
    expected, _ = trained_adapter(tmp_path, "a", seed=1)
    assert (tmp_path / "a" / "adapter_config.json").is_file()
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(fresh_base(), str(tmp_path / "a")).eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(logits(fresh_base()), expected, atol=1e-3)  # the adapter does something


def test_stacked_adapters_equal_applying_them_in_order(tmp_path):
    logits_a, _ = trained_adapter(tmp_path, "a", seed=1)
    stacked_logits, settings = trained_adapter(tmp_path, "b", seed=2, base_adapters=[tmp_path / "a"])
    record = json.loads((tmp_path / "b" / STACK_FILE).read_text())
    assert record["base_adapters"] == [str((tmp_path / "a").resolve())]
    # Reference: merge adapter a into the base weights, then apply adapter b on top.
    base_with_a = PeftModel.from_pretrained(fresh_base(), str(tmp_path / "a")).merge_and_unload()
    torch.testing.assert_close(logits(base_with_a), logits_a, rtol=0, atol=1e-5)
    reference = PeftModel.from_pretrained(base_with_a, str(tmp_path / "b")).eval()
    torch.testing.assert_close(stacked_logits, logits(reference), rtol=0, atol=1e-5)
    assert not torch.allclose(stacked_logits, logits_a, atol=1e-3)


def test_merged_state_dict_loads_as_a_plain_model(tmp_path):
    _, _ = trained_adapter(tmp_path, "a", seed=1)
    settings = LoraSettings(rank=2, target_modules="all-linear", base_adapters=(tmp_path / "a",))
    model = add_adapters(fresh_base(), settings)
    randomize_new_adapter(model, seed=3)
    merged = merged_state_dict(model.get_base_model().config, settings, model.state_dict())
    plain = AutoModelForCausalLM.from_config(
        tiny_llama_config(vocab_size=64), attn_implementation="sdpa"
    ).eval()
    plain.load_state_dict(merged, strict=True)
    torch.testing.assert_close(logits(plain), logits(model), rtol=0, atol=1e-5)


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--lora-rank"):
        LoraSettings(rank=0)
    with pytest.raises(UserError, match="--lora-dropout"):
        LoraSettings(rank=4, dropout=1.5)
    with pytest.raises(UserError, match="not a PEFT adapter"):
        LoraSettings(rank=4, base_adapters=(tmp_path,))
    with pytest.raises(UserError, match="LoRA"):
        add_adapters(fresh_base(), LoraSettings(rank=4, target_modules=("no_such_proj",)))


def test_parse_target_modules():
    assert parse_target_modules("all-linear") == "all-linear"
    assert parse_target_modules("q_proj, v_proj,") == ("q_proj", "v_proj")


def test_qlora_without_gpu_is_a_one_line_error():
    with pytest.raises(UserError, match="CUDA GPU"):
        require_qlora("cpu")


def test_the_cpu_seam_opens_qlora_only_when_asked(monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.delenv(CPU_QLORA_ENV, raising=False)
    with pytest.raises(UserError, match="CUDA GPU"):
        require_qlora("cpu")
    monkeypatch.setenv(CPU_QLORA_ENV, "1")
    require_qlora("cpu")  # no error: the tests' way onto bitsandbytes' CPU backend
    require_qlora("cuda")


def test_nf4_config_is_qloras_recipe():
    config = nf4_config(torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16


def test_4bit_base_counts_its_logical_parameters_and_skips_cpu_repacking(tmp_path):
    pytest.importorskip("bitsandbytes")
    fresh_base().save_pretrained(tmp_path / "base")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    lm = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=nf4_config(torch.float32), device_map={"": "cpu"}
    )
    params = quantized_parameters(lm)
    assert len(params) == 2 * 7  # the 7 linear layers of each block; embeddings, norms, lm_head stay fp32
    assert all(p.dtype == torch.uint8 and logical_numel(p) == 2 * p.numel() for p in params)
    assert sum(logical_numel(p) for p in lm.parameters()) == sum(p.numel() for p in full.parameters())
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in lm.modules())
    model = add_adapters(lm, LoraSettings(rank=4))
    trainable, total = trainable_parameter_count(model)
    assert total == sum(p.numel() for p in full.parameters()) + trainable
