"""mini_trainer's eval and export flags through the real CLI (`python -m minitrain train`, CPU):
`--validation-split`, `--save-best-val-loss`, `--checkpoint-at-epoch`, `--save-final-checkpoint`.

One 1-rank run serves every test, and a 2-rank run of the same command the last one: 20 samples,
`--validation-split 0.2` holds out 4 (16 trained: an epoch is 4 steps of 4), 6 steps, an eval every 8
samples (steps 2, 4, 6), the best export kept, a checkpoint at the end of epoch 1 (step 4) besides the
final one. The reference for every eval number is the obvious one: the exported weights loaded with
transformers, each held-out sample run alone, the mean token cross-entropy over them."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.conftest import outside_any_launch, run_minitrain
from tests.train.test_loop import write_run_files

pytestmark = pytest.mark.slow

VOCAB, NUM, SPLIT, SEED, BATCH, STEPS = 64, 20, 0.2, 7, 4, 6


def _train(root: Path, out: Path, nproc: int) -> dict:
    data = root / "data.jsonl"
    done = run_minitrain(
        ["train", "--data-path", str(data), "--model-name-or-path",
         str(root / "model"), "--output-dir", str(out), "--nproc", str(nproc), "--from-scratch", "--seed",
         str(SEED), "--batch-size", str(BATCH), "--max-tokens-per-gpu", "4096", "--learning-rate", "1e-2",
         "--num-warmup-steps", "0", "--max-steps", str(STEPS), "--validation-split", str(SPLIT),
         "--eval-every-samples", "8", "--save-best-val-loss", "--checkpoint-at-epoch",
         "--save-final-checkpoint"],
        cwd=root, env=outside_any_launch(),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [orjson.loads(line) for line in (out / "training_metrics_0.jsonl").read_bytes().splitlines()]
    return {"out": out, "data": data, "done": done, "rows": rows}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_run_files(tmp_path_factory.mktemp("evalruns"), num=NUM, vocab=VOCAB, seed=4)


@pytest.fixture(scope="module")
def run(root) -> dict:
    return _train(root, root / "one", nproc=1)


def _reference_eval_loss(folder: Path, data: Path, ids: list[int]) -> float:
    """Mean token CE of samples `ids` of `data` under the weights in `folder`, each sample run alone."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lines = data.read_bytes().splitlines()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in ids:
            record = orjson.loads(lines[i])
            logits = model(torch.tensor([record["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(record["labels"][1:])
            total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return total / count


def _held_out() -> list[int]:
    from minitrain.data.sampler import split_validation

    return split_validation(NUM, SPLIT, SEED)[1].tolist()


def test_the_held_out_samples_are_the_eval_set_and_never_trained(run):
    steps = [r for r in run["rows"] if "loss" in r]
    evals = [r for r in run["rows"] if "eval_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    # the sampler's pass is over the 16 trained samples: step 4 ends epoch 1 exactly
    assert [r["epoch"] for r in steps] == pytest.approx([k * BATCH / (NUM - 4) for k in range(1, STEPS + 1)])
    assert [(r["step"], r["eval_samples_held_out"]) for r in evals] == [(2, 4), (4, 4), (6, 4)]
    final = run["out"] / "hf_format" / f"samples_{STEPS * BATCH}"
    reference = _reference_eval_loss(final, run["data"], _held_out())
    assert evals[-1]["eval_loss"] == pytest.approx(reference, rel=1e-5)
    params = orjson.loads((run["out"] / "training_params.json").read_bytes())
    assert params["validation_split"] == SPLIT and params["num_samples_held_out"] == 4
    assert "on 16 samples (4 of 20 held out as the eval set)" in run["done"].stdout


def test_the_best_export_holds_the_lowest_eval_loss_and_says_when(run):
    evals = [r for r in run["rows"] if "eval_loss" in r]
    best = min(evals, key=lambda r: r["eval_loss"])
    folder = run["out"] / "hf_format" / "best"
    info = orjson.loads((folder / "best_val_loss.json").read_bytes())
    assert info == {"eval_loss": best["eval_loss"], "step": best["step"],
                    "samples": best["total_samples_accumulated"]}  # fmt: skip
    # the weights in best/ are the ones that eval loss was measured on
    assert _reference_eval_loss(folder, run["data"], _held_out()) == pytest.approx(
        info["eval_loss"], rel=1e-5
    )


def test_checkpoint_at_epoch_saves_the_end_of_each_epoch_and_the_final_one(run):
    exports = sorted(p.name for p in (run["out"] / "hf_format").iterdir())
    states = sorted(p.name for p in (run["out"] / "checkpoints").iterdir())
    # no --min-samples-per-checkpoint: epoch 1 ends at step 4 (16 samples), the run at step 6 (24)
    assert exports == ["best", "samples_16", "samples_24"]
    assert states == ["latest", "samples_16", "samples_24"]
    assert "(end of epoch 1)" in run["done"].stdout


def test_overwrite_removes_the_best_export_too(run):
    from minitrain.rundir import run_files

    assert run["out"] / "hf_format" / "best" in run_files(run["out"])


def test_two_ranks_hold_out_the_same_samples_and_measure_the_same_eval_loss(run, root):
    two = _train(root, root / "two", nproc=2)
    for rows in (run["rows"], two["rows"]):
        assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 6]
    for a, b in zip(run["rows"], two["rows"], strict=True):  # step and eval lines, in order
        key = "eval_loss" if "eval_loss" in a else "loss"
        assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    best = [
        orjson.loads((r["out"] / "hf_format" / "best" / "best_val_loss.json").read_bytes())
        for r in (run, two)
    ]
    assert best[1]["step"] == best[0]["step"]
