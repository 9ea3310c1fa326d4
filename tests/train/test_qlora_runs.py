"""QLoRA (`--load-in-4bit`) through the real CLI and torchrun, on bitsandbytes' CPU backend.

QLoRA is a GPU feature; MINITRAIN_QLORA_ON_CPU=1 opens the same code path on the CPU (bitsandbytes 0.48+
quantizes and runs NF4 there, in fp32 compute) so that loading, sharding around the 4-bit base, training,
evaluation, export and resume are all exercised here. Three real runs on a saved tiny Llama:

    two      `--nproc 2 --lora-rank 8 --load-in-4bit --eval-data-path ... --eval-every-samples 32`
    resumed  the same on 1 process without evaluation: half the steps, then `--resume` (equal to `two`:
             neither the ranks, nor the interruption, nor evaluating change training)
    stacked  a second adapter (`--lora-rank 4 --base-adapter <two's adapter>`) on the same 4-bit base, 1 rank

References: stock transformers + PEFT loading the base in NF4 and the saved adapter, each eval sample run
alone; and the runs against each other (2 ranks vs 1, interrupted vs not, eval vs none).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from minitrain.train.adapters import CPU_QLORA_ENV, nf4_config, quantized_parameters
from tests.train.test_adapter_runs import (
    STEPS,
    _final_checkpoint,
    _metrics,
    adapter_run_command,
    direct_eval_loss,
    training_state_model_keys,
)
from tests.train.test_loop import _run

pytest.importorskip("bitsandbytes", reason="QLoRA tests need the qlora extra (CI installs it)")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qlora")
    command, evaluation = adapter_run_command(root)
    common = [*command, "--lora-rank", "8", "--load-in-4bit"]
    evaluated = ["--eval-data-path", str(evaluation), "--eval-every-samples", "32"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv(CPU_QLORA_ENV, "1")  # inherited by the CLI and its ranks
        _run([*common, *evaluated, "--output-dir", str(root / "two"), "--nproc", "2"], root)
        half = [*common, "--output-dir", str(root / "resumed"), "--nproc", "1"]  # no eval: see below
        _run([*half, "--max-steps", str(STEPS // 2)], root)
        _run([*half, "--resume"], root)
        first = _final_checkpoint(root / "two")
        _run(
            [*common, *evaluated, "--output-dir", str(root / "stacked"), "--nproc", "1", "--lora-rank", "4",
             "--lora-target-modules", "q_proj,v_proj", "--base-adapter", str(first)],
            root,
        )  # fmt: skip
    names = ("two", "resumed", "stacked")
    return {"root": root, "eval": evaluation} | {name: root / name for name in names}


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(out) if "loss" in r}


def _grad_norms(out: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in _metrics(out) if "grad_norm" in r}


def nf4_base(root: Path) -> torch.nn.Module:
    """The base as stock transformers loads it for QLoRA: NF4, double quantization, fp32 compute on the
    CPU."""
    lm = AutoModelForCausalLM.from_pretrained(
        root / "base", quantization_config=nf4_config(torch.float32), device_map={"": "cpu"}
    )
    quantized_parameters(lm)  # the same kernels as training (no CPU repacking; see its docstring)
    return lm.eval()


def test_qlora_loss_falls_on_two_ranks(runs):
    losses = list(_losses(runs["two"]).values())
    assert len(losses) == STEPS
    assert losses[-1] < 0.9 * losses[0], losses


def test_one_rank_resumed_without_eval_equals_two_ranks_with_eval(runs):
    """One comparison for three claims: the rank count, an interruption and evaluating change nothing.
    bitsandbytes' CPU repacking during eval used to drop the gradient through the base afterwards: grad
    norms diverged from the step after the first eval (step 4 here), far beyond these tolerances."""
    reference, resumed = _losses(runs["two"]), _losses(runs["resumed"])
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert any("eval_loss" in r for r in _metrics(runs["two"]))
    assert not any("eval_loss" in r for r in _metrics(runs["resumed"]))
    norms, resumed_norms = _grad_norms(runs["two"]), _grad_norms(runs["resumed"])
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), step
        assert resumed_norms[step] == pytest.approx(norms[step], rel=1e-4), step


def test_saved_adapter_on_a_stock_nf4_base_reproduces_the_eval_loss(runs):
    checkpoint = _final_checkpoint(runs["two"])
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "merged").exists()
    model = PeftModel.from_pretrained(nf4_base(runs["root"]), str(checkpoint)).eval()
    logged = [r["eval_loss"] for r in _metrics(runs["two"]) if "eval_loss" in r][-1]
    assert direct_eval_loss(model, runs["eval"]) == pytest.approx(logged, rel=1e-5)
    ids = torch.arange(10)[None]
    with torch.no_grad():  # the adapter moved the model away from the 4-bit base
        assert (model(input_ids=ids).logits - nf4_base(runs["root"])(input_ids=ids).logits).abs().max() > 1e-2


def test_training_state_holds_the_adapter_not_the_4bit_base(runs):
    model_keys = training_state_model_keys(runs["two"])
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys[:5]
    assert len(model_keys) == 2 * 7 * 2  # lora_A and lora_B of 7 linear layers in each of 2 blocks


def test_stacked_adapter_on_a_4bit_base_equals_peft_with_both_adapters_active(runs):
    first, second = _final_checkpoint(runs["two"]), _final_checkpoint(runs["stacked"])
    # the README's recipe for a 4-bit base: both adapters loaded unmerged and active together
    model = PeftModel.from_pretrained(nf4_base(runs["root"]), str(first), adapter_name="sft")
    model.load_adapter(str(second), adapter_name="second")
    model.base_model.set_adapter(["sft", "second"])
    logged = [r["eval_loss"] for r in _metrics(runs["stacked"]) if "eval_loss" in r][-1]
    assert direct_eval_loss(model.eval(), runs["eval"]) == pytest.approx(logged, rel=1e-5)
    ids = torch.arange(10)[None]
    with torch.no_grad():  # the second adapter learned something: switching it off changes the outputs
        both = model(input_ids=ids).logits
        model.base_model.set_adapter(["sft"])
        assert (both - model(input_ids=ids).logits).abs().max() > 1e-2
