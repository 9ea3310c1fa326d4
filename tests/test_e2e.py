"""End to end through the real CLI: tokenize fixture rows, train from scratch with torchrun (2 ranks), plot.

Checks only what a user sees: exit codes, the files on disk, their documented keys, and that the exported
checkpoint loads with stock Hugging Face classes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import DATA, SMOLLM2, in_process_if_one_rank, needs_fixtures, tiny_llama_config

pytestmark = [pytest.mark.slow, needs_fixtures]


def _minitrain(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m minitrain ARGS`; a `--nproc 1` train runs in the CLI's own process (the srun path), without
    torchrun: the 2-rank run below is the one through torchrun."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env = in_process_if_one_rank([str(a) for a in args], env)
    done = subprocess.run(
        [sys.executable, "-m", "minitrain", *map(str, args)], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _fixture_run_files(tmp_path: Path, fixture: str, name: str) -> Path:
    """The first 24 lines of a fixture data file as tmp_path/name, and a tiny Llama with SmolLM2's vocabulary
    and tokenizer files in tmp_path/model (returned)."""
    from transformers import AutoTokenizer

    rows = (DATA / fixture).read_bytes().splitlines(keepends=True)[:24]
    (tmp_path / name).write_bytes(b"".join(rows))
    model = tmp_path / "model"
    tiny_llama_config(vocab_size=len(AutoTokenizer.from_pretrained(SMOLLM2))).save_pretrained(model)
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(SMOLLM2 / file, model / file)
    return model


def test_tokenize_train_plot(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.train.test_metrics import MINI_TRAINER_KEYS

    model = _fixture_run_files(tmp_path, "alpaca_en_demo.messages.jsonl", "chat.jsonl")

    _minitrain(
        "tokenize",
        "chat.jsonl",
        "-o",
        "tok.jsonl",
        "--model-name-or-path",
        model,
        "--num-workers",
        "1",
        cwd=tmp_path,
    )
    _minitrain(
        "train", "--data-path", "tok.jsonl", "--model-name-or-path", model, "--output-dir", "run",
        "--nproc", "2", "--from-scratch", "--max-steps", "3", "--batch-size", "8",
        "--max-tokens-per-gpu", "1024", "--min-samples-per-checkpoint", "8", "--learning-rate", "1e-3",
        "--num-warmup-steps", "1",
        cwd=tmp_path,
    )  # fmt: skip

    run = tmp_path / "run"
    params = orjson.loads((run / "training_params.json").read_bytes())
    assert params["world_size"] == 2 and params["data_path"] == str(tmp_path / "tok.jsonl")
    assert params["model_name_or_path"] == str(model) and params["max_steps"] == 3
    records = [orjson.loads(line) for line in (run / "training_metrics_0.jsonl").read_bytes().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert set(MINI_TRAINER_KEYS) <= record.keys()
        assert record["num_samples"] > 0 and record["num_loss_counted_tokens"] > 0
    checkpoints = sorted(p.name for p in (run / "hf_format").iterdir())
    total = records[-1]["total_samples_accumulated"]
    assert f"samples_{total}" in checkpoints and len(checkpoints) == 3  # one per step (>= 8 samples each)
    final = run / "hf_format" / f"samples_{total}"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in final.iterdir()
    }
    AutoModelForCausalLM.from_pretrained(final)
    assert (
        AutoTokenizer.from_pretrained(final).get_vocab() == AutoTokenizer.from_pretrained(SMOLLM2).get_vocab()
    )

    _minitrain("plot", "run", "-o", "loss.png", cwd=tmp_path)
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_tokenize_fixture_pairs_and_train_dpo_with_truncate(tmp_path):
    """The fixture's preference pairs: tokenized, then `train --objective dpo --truncate` with a budget that
    cuts about half of them: the run trains, starts at ln 2, and says and records what was cut."""
    import math

    from minitrain.data.store import TokenStore, truncate

    model = _fixture_run_files(tmp_path, "dpo_en_demo.preference.jsonl", "prefs.jsonl")
    _minitrain("tokenize", "prefs.jsonl", "-o", "pairs.jsonl", "--model-name-or-path", model,
               "--num-workers", "1", cwd=tmp_path)  # fmt: skip
    meta = orjson.loads((tmp_path / "pairs.meta.json").read_bytes())
    assert meta["kind"] == "preference" and meta["counts"]["pairs"] == 24

    store = TokenStore.open(tmp_path / "pairs.jsonl", "dpo")
    budget = int(sorted(store.pair_lengths)[len(store.pair_lengths) // 2])  # the median pair: ~half cut
    _, cut = truncate(store, budget, "dpo")
    assert cut.cut > 0
    done = _minitrain(
        "train", "--data-path", "pairs.jsonl", "--model-name-or-path", model, "--output-dir", "run",
        "--objective", "dpo", "--truncate", "--max-tokens-per-gpu", str(budget), "--nproc", "1",
        "--from-scratch", "--max-steps", "3", "--batch-size", "4", "--learning-rate", "1e-3",
        "--num-warmup-steps", "0", "--min-samples-per-checkpoint", "1000",
        cwd=tmp_path,
    )  # fmt: skip
    assert (
        f"{cut.too_long} of 24 pairs are longer than --max-tokens-per-gpu {budget}: --truncate keeps each "
        f"side's first tokens, the prompt whole and the longer response cut first ({cut.cut} pairs cut, "
        f"{cut.tokens_cut:,} tokens)"
    ) in done.stdout + done.stderr
    run = tmp_path / "run"
    params = orjson.loads((run / "training_params.json").read_bytes())
    assert (params["num_samples_truncated"], params["num_tokens_truncated"]) == (cut.cut, cut.tokens_cut)
    records = [orjson.loads(line) for line in (run / "training_metrics_0.jsonl").read_bytes().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the reference is the initial model
    for record in records:
        assert 0 < record["num_samples"] <= 4 and math.isfinite(record["loss"])
        assert {"rewards/margins", "rewards/accuracies", "logps/chosen"} <= record.keys()
