"""LoRA and stacked-adapter training through the real CLI and torchrun, with eval loss.

Two real runs on a saved tiny Llama (random weights, fp32, gloo):

    lora     `minitrain train --nproc 2 --lora-rank 8 --merge-lora --eval-data-path ...`
    resumed  the same adapter on 1 process: half the steps, then `--resume` for the rest
    stacked  `minitrain train --nproc 1 --lora-rank 4 --base-adapter <lora's adapter> --eval-data-path ...`

The reference is the obvious one: load what was saved with stock PEFT / transformers, run each eval sample
alone through the model, and average the token cross-entropy over every trained token. The run's final
`eval_loss` was measured by the sharded model right after its last step, with the weights that were then
exported, so the two must agree to float rounding: this checks the eval computation and that the
exported adapter (and the merged model) reproduce the trained model.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import orjson
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.conftest import run_minitrain, tiny_llama_config
from tests.train.test_loop import _run, write_tokenized

pytestmark = pytest.mark.slow

VOCAB = 96
STEPS = 12


def _metrics(out: Path) -> list[dict]:
    return [orjson.loads(line) for line in (out / "training_metrics_0.jsonl").read_bytes().splitlines()]


def _final_checkpoint(out: Path) -> Path:
    return max((out / "hf_format").glob("samples_*"), key=lambda p: int(p.name.split("_")[1]))


def direct_eval_loss(model: torch.nn.Module, data: Path) -> float:
    """Mean next-token CE over every trained token of the file, one sample at a time (no packing)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for line in data.read_bytes().splitlines():
            sample = orjson.loads(line)
            ids = torch.tensor([sample["input_ids"]])
            labels = torch.tensor(sample["labels"][1:])  # the target of position t is label t+1
            logits = model(input_ids=ids).logits[0, :-1]
            keep = labels != -100
            total += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def adapter_run_command(root: Path) -> tuple[list[str], Path]:
    """(the `minitrain train` command every adapter run here shares, the eval file), with its files in root.

    The files: 8 training and 5 eval samples of random ids, and a saved random tiny Llama in root/base.
    """
    train = write_tokenized(root / "train.jsonl", num=8, vocab=VOCAB, seed=1)
    evaluation = write_tokenized(root / "eval.jsonl", num=5, vocab=VOCAB, seed=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=VOCAB)).save_pretrained(root / "base")
    command = [
        sys.executable, "-m", "minitrain", "train", "--data-path", str(train), "--model-name-or-path",
        str(root / "base"), "--batch-size", "8", "--max-tokens-per-gpu", "128", "--max-steps", str(STEPS),
        "--learning-rate", "2e-2", "--num-warmup-steps", "0",
    ]  # fmt: skip
    return command, evaluation


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    command, evaluation = adapter_run_command(root)
    common = [*command, "--eval-data-path", str(evaluation), "--eval-every-samples", "32"]
    _run(
        [*common, "--output-dir", str(root / "lora"), "--nproc", "2", "--lora-rank", "8", "--merge-lora"],
        root,
    )
    adapter = _final_checkpoint(root / "lora")
    _run(
        [*common, "--output-dir", str(root / "stacked"), "--nproc", "1", "--lora-rank", "4",
         "--lora-target-modules", "q_proj,v_proj", "--base-adapter", str(adapter)],
        root,
    )  # fmt: skip
    # the same LoRA run on another nproc, stopped after 6 steps and resumed (a bare --resume) to the end
    half = [*common, "--output-dir", str(root / "resumed"), "--nproc", "1", "--lora-rank", "8"]
    _run([*half, "--max-steps", str(STEPS // 2)], root)
    _run([*half, "--resume", "--max-steps", str(STEPS)], root)
    return {
        "root": root, "lora": root / "lora", "stacked": root / "stacked", "resumed": root / "resumed",
        "eval": evaluation,
    }  # fmt: skip


def _base(runs) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(runs["root"] / "base").eval()


def test_lora_loss_falls_and_eval_is_logged(runs):
    rows = _metrics(runs["lora"])
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(losses) == STEPS
    assert losses[-1] < 0.9 * losses[0], losses  # random tiny base, rank-8 adapter, 12 steps
    assert [r["total_samples_accumulated"] for r in evals] == [32, 64, 96]  # every 32 samples and the end
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_saved_adapter_loads_with_peft_and_reproduces_the_trained_model(runs):
    checkpoint = _final_checkpoint(runs["lora"])
    assert (checkpoint / "adapter_config.json").is_file() and (
        checkpoint / "adapter_model.safetensors"
    ).is_file()
    assert not (checkpoint / "model.safetensors").exists()  # the adapter, not a full copy of the base
    model = PeftModel.from_pretrained(_base(runs), str(checkpoint)).eval()
    logged = [r["eval_loss"] for r in _metrics(runs["lora"]) if "eval_loss" in r][-1]
    assert direct_eval_loss(model, runs["eval"]) == pytest.approx(logged, rel=1e-5)
    ids = torch.arange(10)[None]
    with torch.no_grad():  # the adapter changed the model (eval data is random, so compare outputs instead)
        assert (model(input_ids=ids).logits - _base(runs)(input_ids=ids).logits).abs().max() > 1e-2


def test_merged_model_loads_with_transformers_and_matches_the_adapter(runs):
    checkpoint = _final_checkpoint(runs["lora"])
    merged = AutoModelForCausalLM.from_pretrained(checkpoint / "merged").eval()
    logged = [r["eval_loss"] for r in _metrics(runs["lora"]) if "eval_loss" in r][-1]
    assert direct_eval_loss(merged, runs["eval"]) == pytest.approx(logged, rel=1e-5)


def test_stacked_adapter_records_its_base_and_equals_the_adapters_applied_in_order(runs):
    first = _final_checkpoint(runs["lora"])
    second = _final_checkpoint(runs["stacked"])
    record = json.loads((second / "minitrain_adapter.json").read_text())
    assert record["base_adapters"] == [str(first.resolve())]
    # reference: the first adapter merged into the base, then the second applied on top
    base_with_first = PeftModel.from_pretrained(_base(runs), str(first)).merge_and_unload()
    stacked = PeftModel.from_pretrained(base_with_first, str(second)).eval()
    logged = [r["eval_loss"] for r in _metrics(runs["stacked"]) if "eval_loss" in r][-1]
    assert direct_eval_loss(stacked, runs["eval"]) == pytest.approx(logged, rel=1e-5)
    first_only = [r["eval_loss"] for r in _metrics(runs["lora"]) if "eval_loss" in r][-1]
    assert logged != pytest.approx(first_only, rel=1e-3)  # the second adapter learned something


def test_an_adapter_run_resumes_exactly_on_another_nproc(runs):
    def losses(out: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in _metrics(out) if "loss" in r}

    reference, resumed = losses(runs["lora"]), losses(runs["resumed"])
    loss_steps = [r["step"] for r in _metrics(runs["resumed"]) if "loss" in r]
    assert loss_steps == list(range(1, STEPS + 1))  # every step once, across the interruption
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), step
    # eval at the same points as the uninterrupted run (plus the half run's own final eval at its end)
    evals = {
        r["total_samples_accumulated"]: r["eval_loss"] for r in _metrics(runs["resumed"]) if "eval_loss" in r
    }
    expected = {
        r["total_samples_accumulated"]: r["eval_loss"] for r in _metrics(runs["lora"]) if "eval_loss" in r
    }
    assert sorted(evals) == [32, 48, 64, 96]
    for samples, loss in expected.items():
        assert evals[samples] == pytest.approx(loss, rel=1e-5)


def training_state_model_keys(out: Path) -> list[str]:
    """The model keys of the newest training-state checkpoint (DCP metadata), without reading any tensor."""
    from torch.distributed.checkpoint import FileSystemReader

    state = max((out / "checkpoints").glob("samples_*"), key=lambda p: int(p.name.split("_")[1]))
    keys = FileSystemReader(str(state / "state")).read_metadata().state_dict_metadata
    return [k for k in keys if k.startswith("model.")]


def test_the_training_state_holds_the_adapter_not_the_frozen_base(runs):
    model_keys = training_state_model_keys(runs["lora"])
    assert model_keys and all(".lora_" in k and ".default." in k for k in model_keys), model_keys[:5]


def test_a_base_adapter_that_does_not_fit_stops_both_ranks_with_one_line_each(runs, tmp_path):

    from safetensors.torch import save_file

    bad = tmp_path / "bad_adapter"  # a real adapter config, weights of the wrong shape
    bad.mkdir()
    (bad / "adapter_config.json").write_text(
        (_final_checkpoint(runs["lora"]) / "adapter_config.json").read_text()
    )
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(3, 3)},
              str(bad / "adapter_model.safetensors"))  # fmt: skip
    command, _ = adapter_run_command(tmp_path)
    done = run_minitrain(
        [*command[3:], "--output-dir", str(tmp_path / "out"), "--nproc", "2", "--lora-rank", "4",
         "--base-adapter", str(bad)],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("minitrain: error (rank")]
    assert len(errors) == 2, done.stderr[-3000:]
    assert "(rank 0): --base-adapter" in errors[0] + errors[1] and "size mismatch" in errors[0] + errors[1]
    assert "stopped while building the model: 1 other rank(s) failed" in errors[0] + errors[1]
