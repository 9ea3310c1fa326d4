"""DPO step throughput and memory: minitrain (packed pairs, cached reference) vs TRL's `DPOTrainer` (padded).

Useful tokens/s = non-padding tokens of a step's pairs (prompt + response, both sides) / CPU seconds of the
step (fp32, CPU, one thread, one process per side; the machine is shared, so the process's own CPU time is
the steady measure; wall tok/s beside it). Peak memory = peak RSS of that side's process during the timed
steps (VmHWM reset after set-up) minus its RSS then: the model, optimizer state and data are set up and one
warm-up step has run, so the number is what a step adds (activations, logits, gradients).

Both sides train the same Llama built from a config (4 layers, hidden 256, 4 heads (2 KV), the TinyLlama
vocabulary of 32,000), seeded alike, on the same token ids:
`../shared/fixtures/data/dpo_en_demo.preference.jsonl` tokenized once by `minitrain tokenize` with the
TinyLlama fixture tokenizer; pairs longer than --max-pair tokens (both sides) are left out; each step
draws --batch pairs at random (seeded, the same for both).

  minitrain   `minitrain.train.dpo.preference_step` (the training loop's step: pairs packed into one row
              per --max-tokens-per-gpu, per-sample attention, chunked weighted loss, sigmoid DPO, beta 0.1)
              with the reference read from the cache, then AdamW step and zero_grad
  trl         `DPOTrainer(precompute_ref_log_probs=True)`: its collator pads the 2 x batch sequences to the
              longest, `trainer.training_step` (sdpa, TRL's fused tiled LM head), then its AdamW step and
              zero_grad; TRL is given the same ids (prompt_ids / chosen_ids / rejected_ids split at the pair's
              prompt_len), so its completion mask trains every response token (minitrain's labels may mask a
              template token after the end of turn: same tokens forward, at most one fewer trained)
The reference pass (no gradient, over every step's pairs) is timed apart: minitrain's `reference_logps` (the
pass that fills the cache before training) and TRL's `compute_ref_log_probs` (what its precompute runs).

TRL is not a dependency: install it outside the project's environment and pass its folder,
    pip install --no-deps --target /work/trl-pkgs trl==1.16.0
    python benchmarks/bench_dpo.py --trl-path /work/trl-pkgs [--batch 8] [--steps 3] [--repeats 2]
        [--max-pair 2048] [--out benchmarks/results/dpo.json]
Without an importable TRL the trl row is skipped with a note.

Measured here (2 shared cores, torch 2.13 CPU, transformers 5.24, TRL 1.16.0; defaults: 8 pairs/step,
6,053 useful tokens per step, TRL's padded batches ~2.4x that): minitrain 903 useful tok/CPU-s, +219 MB
peak over the steps; TRL 167 tok/CPU-s, +5,109 MB: 5.4x the tokens/s at 0.04x the step memory. Reference
pass: minitrain 3,001 tok/CPU-s, TRL 421 (7.1x).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rss import current_rss, peak_rss, reset_peak_rss  # benchmarks/rss.py, beside this script

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
TOKENIZER = FIXTURES / "tokenizers" / "tinyllama-1.1b-chat-v1.0"
DATA = FIXTURES / "data" / "dpo_en_demo.preference.jsonl"
MB = 1024 * 1024
MODEL = dict(
    vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, use_cache=False,
)  # fmt: skip


def tokenize(workdir: Path) -> Path:
    """The fixture's pairs tokenized by `minitrain tokenize` (the TinyLlama template) into workdir."""
    out = workdir / "dpo.tok.jsonl"
    cmd = [sys.executable, "-m", "minitrain", "tokenize", str(DATA), "-o", str(out)]
    cmd += ["--model-name-or-path", str(TOKENIZER), "--num-workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=workdir)
    if done.returncode:
        raise SystemExit(f"tokenize failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return out


def select(tokenized: Path, workdir: Path, *, batch: int, steps: int, max_pair: int, seed: int) -> Path:
    """A tokenized file of the (steps + 1) x batch pairs of the steps (step 0: the warm-up), in step order."""
    lines = [line for line in tokenized.read_bytes().splitlines() if line.strip()]
    fit = [ln for ln in lines if sum(json.loads(ln)[k]["len"] for k in ("chosen", "rejected")) <= max_pair]
    need = (steps + 1) * batch
    if len(fit) < need:
        raise SystemExit(
            f"only {len(fit)} pairs of <= {max_pair} tokens; need {need} (lower --batch/--steps)"
        )
    picked = random.Random(seed).sample(fit, need)
    out = workdir / "steps.tok.jsonl"
    out.write_bytes(b"\n".join(picked) + b"\n")
    meta = json.loads(tokenized.with_name("dpo.tok.meta.json").read_text())
    out.with_name("steps.tok.meta.json").write_text(json.dumps(meta))
    return out


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }


def build_model(attn: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from minitrain.train.attention import register_packed_attention

    register_packed_attention()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**MODEL), attn_implementation=attn)


def _timed(fn) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - t0


def minitrain_side(args, data: Path) -> tuple:
    """(reference pass, step(i) for step i's pairs) of minitrain."""
    import torch

    from minitrain.data.store import TokenStore
    from minitrain.train.attention import PACKED_ATTENTION
    from minitrain.train.dist import DistInfo
    from minitrain.train.dpo import PreferenceObjective, cached_reference, preference_step, reference_logps
    from minitrain.train.model import CausalLMWithLoss
    from minitrain.train.optim import build_optimizer

    cpu1 = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"),
                    backend="gloo")  # fmt: skip
    store = TokenStore.open(data, "dpo")
    model = CausalLMWithLoss(build_model(PACKED_ATTENTION), use_liger=False)
    opt = build_optimizer(model, learning_rate=1e-6, weight_decay=0.0, device=torch.device("cpu"))
    budget = args.max_tokens_per_gpu
    values = []

    def reference_pass() -> None:  # the pass that fills the cache before training, over every step's pairs
        values.append(
            reference_logps(model, store, dist=cpu1, max_tokens_per_gpu=budget, pairs_per_plan=args.batch)
        )

    objective = PreferenceObjective(loss="sigmoid", beta=0.1)

    def step(i: int) -> None:
        pairs = list(range(i * args.batch, (i + 1) * args.batch))
        preference_step(
            model,
            store,
            pairs,
            objective=objective,
            reference=cached_reference(values[0]),
            dist=cpu1,
            max_tokens_per_gpu=budget,
        )
        opt.step()
        opt.zero_grad(set_to_none=True)

    return reference_pass, step


def trl_side(args, data: Path) -> tuple:
    """(reference pass, step(i)) of TRL's DPOTrainer on the same ids, padded by its own collator."""
    sys.path.insert(0, args.trl_path)
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = []
    for line in data.read_bytes().splitlines():
        pair = json.loads(line)
        n = pair["prompt_len"]
        rows.append({
            "prompt_ids": pair["chosen"]["input_ids"][:n],
            "chosen_ids": pair["chosen"]["input_ids"][n:],
            "rejected_ids": pair["rejected"]["input_ids"][n:],
        })  # fmt: skip
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    raw = json.loads(DATA.read_text().splitlines()[0])  # the constructor wants a dataset: one raw row
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, precompute_ref_log_probs=True,
        use_cpu=True, report_to=[], beta=0.1, loss_type=["sigmoid"], learning_rate=1e-6, weight_decay=0.0,
        bf16=False, fp16=False, dataset_num_proc=None, logging_steps=1000, disable_tqdm=True,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=build_model("sdpa"), args=config, train_dataset=Dataset.from_list([raw]), processing_class=tok
    )
    model = trainer.model
    model.train()
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # what `train()` sets: one micro-batch per step
    opt = trainer.optimizer
    batches = [
        trainer.data_collator(rows[i * args.batch : (i + 1) * args.batch]) for i in range(args.steps + 1)
    ]

    def reference_pass() -> None:  # what its precompute runs, batch by batch, over every step's pairs
        model.eval()
        for batch in batches:
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = trainer.compute_ref_log_probs(
                model, batch
            )
        model.train()

    def step(i: int) -> None:
        trainer.training_step(model, batches[i], num_items_in_batch=None)
        opt.step()
        opt.zero_grad(set_to_none=True)

    assert not trainer.ref_model, "precompute_ref_log_probs keeps no reference copy"
    del torch
    return reference_pass, step


def child(args) -> dict:
    """One side in this process: reference pass and step per batch, timed in CPU seconds; peak RSS."""
    import torch

    torch.set_num_threads(1)
    data = Path(args.data)
    reference_pass, step = (minitrain_side if args.child == "minitrain" else trl_side)(args, data)
    lines = [json.loads(ln) for ln in data.read_bytes().splitlines()]
    useful = [
        sum(p[k]["len"] for p in lines[i * args.batch : (i + 1) * args.batch] for k in ("chosen", "rejected"))
        for i in range(args.steps + 1)
    ]
    ref_cpu, _ = _timed(reference_pass)  # over the steps' pairs and the warm-up's
    step(0)  # warm-up: allocator and optimizer state
    base = current_rss()
    since_base = reset_peak_rss()  # else the peak may be set-up's (TRL's dataset preparation), not the steps'
    cpu = [float("inf")] * args.steps
    wall = [float("inf")] * args.steps
    for _ in range(args.repeats):  # the fastest of the repeats counts (a shared, loaded machine)
        for i in range(1, args.steps + 1):
            c, w = _timed(lambda i=i: step(i))
            cpu[i - 1], wall[i - 1] = min(cpu[i - 1], c), min(wall[i - 1], w)
    peak = peak_rss()
    tokens = sum(useful[1:])
    return {
        "tokens_per_s": tokens / sum(cpu),
        "cpu_seconds_per_step": sum(cpu) / args.steps,
        "wall_tokens_per_s": tokens / sum(wall),
        "useful_tokens_per_step": tokens / args.steps,
        "peak_added_mb": max(peak - base, 0) / MB,
        "peak_rss_mb": peak / MB,
        "peak_since_baseline": since_base,
        "baseline_rss_mb": base / MB,
        "reference_tokens_per_s": sum(useful) / ref_cpu,
        "reference_cpu_seconds_per_step": ref_cpu / (args.steps + 1),
    }


def run_side(args, side: str, data: Path) -> dict | None:
    cmd = [sys.executable, __file__, "--child", side, "--data", str(data), "--batch", str(args.batch)]
    cmd += [
        "--steps",
        str(args.steps),
        "--repeats",
        str(args.repeats),
        "--trl-path",
        str(args.trl_path or ""),
    ]
    cmd += ["--max-tokens-per-gpu", str(args.max_tokens_per_gpu)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if proc.returncode:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def trl_importable(path: str | None) -> bool:
    probe = f"import sys; sys.path.insert(0, {path or ''!r}); import trl"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, env=_env()).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trl-path", help="folder holding the trl package (pip install --target DIR trl)")
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (distinct batches) per side")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the steps; the fastest counts")
    ap.add_argument(
        "--max-pair", type=int, default=2048, help="leave out pairs longer than this (both sides)"
    )
    ap.add_argument("--max-tokens-per-gpu", type=int, default=16384, help="minitrain's token budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dpo.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        print(json.dumps(child(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = select(
            tokenize(Path(tmp)),
            Path(tmp),
            batch=args.batch,
            steps=args.steps,
            max_pair=args.max_pair,
            seed=args.seed,
        )
        rows = {"minitrain": run_side(args, "minitrain", data)}
        if trl_importable(args.trl_path):
            rows["trl"] = run_side(args, "trl", data)
        else:
            print("note: trl is not importable (pass --trl-path DIR after `pip install --target DIR trl`); "
                  "its row is skipped")  # fmt: skip

    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    table = Table(
        title=f"DPO step, Llama 4x256 vocab 32k, {args.batch} fixture pairs/step (fp32, CPU, 1 thread)"
    )
    cols = (
        "side",
        "useful tok/CPU-s",
        "CPU s/step",
        "useful tok/step",
        "wall tok/s",
        "peak +MB",
        "base RSS MB",
        "ref pass tok/CPU-s",
        "ref pass CPU s/step",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "side" else "right")
    for side, r in rows.items():
        keys = (
            "tokens_per_s",
            "cpu_seconds_per_step",
            "useful_tokens_per_step",
            "wall_tokens_per_s",
            "peak_added_mb",
            "baseline_rss_mb",
            "reference_tokens_per_s",
            "reference_cpu_seconds_per_step",
        )
        table.add_row(side, *(f"{r[k]:.2f}" if "seconds" in k else f"{r[k]:.0f}" for k in keys))
    console.print(table)
    ratios = {}
    if "trl" in rows:
        m, t = rows["minitrain"], rows["trl"]
        ratios = {
            "step tok/s minitrain / trl": m["tokens_per_s"] / t["tokens_per_s"],
            "peak +MB minitrain / trl": m["peak_added_mb"] / max(t["peak_added_mb"], 1e-9),
            "reference pass tok/s minitrain / trl": m["reference_tokens_per_s"] / t["reference_tokens_per_s"],
        }
        for k, v in ratios.items():
            console.print(f"{k}: {v:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.write_text(
        json.dumps({"config": config, "model": MODEL, "sides": rows, "ratios": ratios}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
