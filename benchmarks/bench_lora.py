"""Training step time and peak host memory: full fine-tuning vs LoRA (rank 8, rank 64) vs QLoRA (rank 8).

One step = what the training loop does on one packed minibatch: `CausalLMWithLoss` forward (minitrain_packed
attention, chunked loss), loss / trained tokens, backward, AdamW step (`build_optimizer`, so only parameters
with requires_grad are in it), zero_grad. Every variant starts from the same seeded Llama built from a config
(4 layers by default, hidden 512, 8 heads (4 KV), MLP 1408, vocabulary 32,000, untied head, fp32) and runs the
same packed batches; LoRA wraps it with `add_adapters` (PEFT, all-linear: every projection of every block, not
lm_head, not the embedding). QLoRA first reloads the same weights through bitsandbytes in NF4 (`nf4_config`,
fp32 compute: bitsandbytes' CPU backend, so its step time says nothing of the GPU kernels; its memory does
show what 4-bit weights save). Skipped when bitsandbytes is not installed. Unsharded, one process, one torch
thread (steadier on a shared CPU).

Time: CPU seconds of this single-threaded process (the work done, whatever else loads the machine), the
fastest of --repeats passes per batch, variants interleaved in one process; split into forward+backward and
the optimizer step (step + zero_grad). Wall tokens/s beside it.

Memory: each variant in its own subprocess, with glibc's mmap threshold fixed at 128 KiB (large tensors are
mmapped and unmapped when freed, so RSS follows live memory instead of the allocator's cache). `base` is the
RSS once the model (and adapters) exist; a warm-up step allocates the optimizer state; `steady` is the RSS
between steps (parameters + optimizer state); the kernel's RSS high-water mark (VmHWM) is then reset
(/proc/self/clear_refs) and read after the timed batches: `peak`. `+MB` = peak - base (all that training
adds to the weights). Gradient and optimizer-state bytes are counted exactly from the tensors (p.grad after
backward, the AdamW state); `act+other` = peak - steady - gradients: activations saved for backward,
the loss head's buffers, temporaries.

Samples: ../shared/fixtures/data/*.messages.jsonl rendered with the TinyLlama chat template (real ids), the
user turn masked; samples longer than --max-len are left out; --batch random samples per packed minibatch.

    python benchmarks/bench_lora.py [--batch 16] [--steps 2] [--repeats 2] [--layers 4]
        [--out benchmarks/results/lora.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
MB = 1024 * 1024

VARIANTS = {"full": None, "lora r8": 8, "lora r64": 64, "qlora r8": 8}  # name -> LoRA rank (None: full)
FOUR_BIT = {"qlora r8"}
SAMPLE = list[tuple[list[int], list[int]]]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import load_samples, pack  # noqa: E402  (the same fixture batches as bench_train)
from rss import current_rss, peak_rss, reset_peak_rss  # noqa: E402


def build(rank: int | None, layers: int, four_bit: bool = False):
    """(CausalLMWithLoss, AdamW) of one variant; the base weights are the same for every variant."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from minitrain.config import LoraSettings
    from minitrain.train.adapters import add_adapters, nf4_config, quantized_parameters
    from minitrain.train.attention import choose_attention
    from minitrain.train.model import CausalLMWithLoss
    from minitrain.train.optim import build_optimizer

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        use_cache=False,
    )
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg, attn_implementation=choose_attention("cpu"))
    if four_bit:  # the same weights, reloaded in NF4 as `--load-in-4bit` loads them
        with tempfile.TemporaryDirectory() as tmp:
            lm.save_pretrained(tmp)
            del lm
            lm = AutoModelForCausalLM.from_pretrained(
                tmp, quantization_config=nf4_config(torch.float32), device_map={"": "cpu"},
                attn_implementation=choose_attention("cpu"),
            )  # fmt: skip
        quantized_parameters(lm)
    if rank is not None:
        torch.manual_seed(1)  # LoRA A init
        lm = add_adapters(lm, LoraSettings(rank=rank, target_modules="all-linear"))
    model = CausalLMWithLoss(lm, use_liger=False)
    opt = build_optimizer(model, learning_rate=1e-4, weight_decay=0.0, device=torch.device("cpu"))
    return model, opt


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def child(args) -> dict:
    """Timing (all variants interleaved) or memory (one variant) in this process; returns JSON-able
    results."""
    import torch

    from minitrain.train.adapters import logical_numel

    torch.set_num_threads(args.threads)
    batches = [pack(b) for b in json.loads(Path(args.batches).read_text())]  # [0] is the warm-up
    variants = args.variants.split(",")
    if args.child == "memory":
        (v,) = variants
        before = current_rss()
        model, opt = build(VARIANTS[v], args.layers, v in FOUR_BIT)
        base = current_rss()  # parameters (+ adapters), no gradients, no optimizer state yet
        grad_bytes = 0

        def step(b) -> None:
            nonlocal grad_bytes
            (model(b) / b.num_loss_tokens).backward()
            grad_bytes = _bytes(p.grad for p in model.parameters() if p.grad is not None)
            opt.step()
            opt.zero_grad(set_to_none=True)

        step(batches[0])  # warm-up: allocates the optimizer state
        steady = current_rss()  # between steps: parameters + optimizer state
        reset_ok = reset_peak_rss()
        for b in batches[1:]:  # the timed batches
            step(b)
        peak = peak_rss()
        optim_bytes = _bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(logical_numel(p) for p in model.parameters())
        return {
            v: {
                "trainable_params": trainable,
                "total_params": total,
                "param_mb": _bytes(model.parameters()) / MB,
                "grad_mb": grad_bytes / MB,
                "optim_state_mb": optim_bytes / MB,
                "model_rss_mb": (base - before) / MB,
                "base_rss_mb": base / MB,
                "steady_rss_mb": steady / MB,
                "peak_rss_mb": peak / MB,
                "peak_added_mb": (peak - base) / MB,
                "step_transient_mb": (peak - steady) / MB,
                "act_other_mb": (peak - steady - grad_bytes) / MB,
                "peak_since": "warm-up step (VmHWM reset)" if reset_ok else "process start (ru_maxrss)",
            }
        }
    models = {v: build(VARIANTS[v], args.layers, v in FOUR_BIT) for v in variants}
    zero = [float("inf")] * (len(batches) - 1)
    fb = {v: list(zero) for v in variants}
    optim = {v: list(zero) for v in variants}
    wall = {v: list(zero) for v in variants}
    for rep in range(args.repeats + 1):  # pass 0 is the warm-up (and allocates the optimizer state)
        for v, (model, opt) in models.items():
            for i, b in enumerate(batches[1:] if rep else batches[:1]):
                c0, t0 = time.process_time(), time.perf_counter()
                (model(b) / b.num_loss_tokens).backward()
                c1 = time.process_time()
                opt.step()
                opt.zero_grad(set_to_none=True)
                c2, t2 = time.process_time(), time.perf_counter()
                if rep:  # keep each batch's fastest pass: the least disturbed by the other processes
                    fb[v][i] = min(fb[v][i], c1 - c0)
                    optim[v][i] = min(optim[v][i], c2 - c1)
                    wall[v][i] = min(wall[v][i], t2 - t0)
    tokens = sum(b.num_tokens for b in batches[1:])
    n = len(batches) - 1
    return {
        v: {
            "tokens_per_cpu_s": tokens / (sum(fb[v]) + sum(optim[v])),
            "cpu_s_per_step": (sum(fb[v]) + sum(optim[v])) / n,
            "fwd_bwd_cpu_s_per_step": sum(fb[v]) / n,
            "optim_cpu_s_per_step": sum(optim[v]) / n,
            "wall_tokens_per_s": tokens / sum(wall[v]),
            "tokens_per_step": tokens / n,
        }
        for v in variants
    }


def _run_child(args, kind: str, variants: list[str], batches_file: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--variants", ",".join(variants)]
    cmd += ["--batches", str(batches_file), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    cmd += ["--layers", str(args.layers), "--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    if kind == "memory":  # a fixed mmap threshold: freed tensors leave the RSS, so RSS tracks live memory
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{kind} {variants} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16, help="fixture samples per packed minibatch (step)")
    ap.add_argument("--steps", type=int, default=2, help="timed batches per variant (+1 warm-up)")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the batches; the fastest counts")
    ap.add_argument("--layers", type=int, default=4, help="decoder blocks of the Llama")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--variants", help=argparse.SUPPRESS)
    ap.add_argument("--batches", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lora.json")
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        print(json.dumps(child(args)))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    samples = load_samples(args.max_len)
    rng = random.Random(args.seed)
    batches = [rng.sample(samples, args.batch) for _ in range(args.steps + 1)]  # [0]: warm-up
    tokens = [sum(len(s[0]) for s in b) for b in batches]
    print(f"{len(samples)} fixture samples <= {args.max_len} tokens; packed minibatches of {tokens} tokens")
    names = list(VARIANTS)
    if importlib.util.find_spec("bitsandbytes") is None:
        names = [v for v in names if v not in FOUR_BIT]
        print("bitsandbytes is not installed: QLoRA left out (pip install '.[qlora]')")
    with tempfile.TemporaryDirectory() as tmp:  # every child packs exactly these samples
        batches_file = Path(tmp) / "batches.json"
        batches_file.write_text(json.dumps(batches))
        timing = _run_child(args, "time", names, batches_file)
        rows = []
        for v in names:
            mem = _run_child(args, "memory", [v], batches_file)[v]
            rows.append({"variant": v, "lora_rank": VARIANTS[v], **timing[v], **mem})
            print(
                f"  {v:9} {timing[v]['cpu_s_per_step']:.2f} CPU-s/step, peak +{mem['peak_added_mb']:.0f} MB",
                flush=True,
            )
    full = rows[0]
    ratios = {
        r["variant"]: {
            "cpu_s_per_step": r["cpu_s_per_step"] / full["cpu_s_per_step"],
            "fwd_bwd_cpu_s": r["fwd_bwd_cpu_s_per_step"] / full["fwd_bwd_cpu_s_per_step"],
            "peak_rss": r["peak_rss_mb"] / full["peak_rss_mb"],
            "peak_added": r["peak_added_mb"] / full["peak_added_mb"],
            "weights": r["param_mb"] / full["param_mb"],
        }
        for r in rows[1:]
    }

    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    title = (
        f"train step, Llama {args.layers}x512 vocab 32k, {sum(tokens[1:]) // args.steps} tokens/step "
        f"(fp32, CPU, 1 process, {args.threads} thread)"
    )
    table = Table(title=title)
    cols = (
        "variant", "trainable", "% params", "tok/CPU-s", "CPU s/step", "fwd+bwd s", "optim s", "wall tok/s",
        "weights MB", "grads MB", "optim MB", "base RSS MB", "steady MB", "peak RSS MB", "peak +MB",
        "act+other MB",
    )  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        table.add_row(
            r["variant"],
            f"{r['trainable_params']:,}",
            f"{100 * r['trainable_params'] / r['total_params']:.2f}",
            f"{r['tokens_per_cpu_s']:.0f}",
            f"{r['cpu_s_per_step']:.2f}",
            f"{r['fwd_bwd_cpu_s_per_step']:.2f}",
            f"{r['optim_cpu_s_per_step']:.3f}",
            f"{r['wall_tokens_per_s']:.0f}",
            f"{r['param_mb']:.1f}",
            f"{r['grad_mb']:.1f}",
            f"{r['optim_state_mb']:.1f}",
            f"{r['base_rss_mb']:.0f}",
            f"{r['steady_rss_mb']:.0f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['peak_added_mb']:.0f}",
            f"{r['act_other_mb']:.0f}",
        )
    console.print(table)
    for v, ratio in ratios.items():
        console.print(
            f"{v} / full: step CPU time {ratio['cpu_s_per_step']:.2f}x "
            f"(fwd+bwd {ratio['fwd_bwd_cpu_s']:.2f}x), "
            f"weights {ratio['weights']:.2f}x, peak RSS {ratio['peak_rss']:.2f}x, "
            f"memory added by training {ratio['peak_added']:.2f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("child", "variants", "batches")}
    result = {"config": config | {"out": str(args.out)}, "tokens_per_batch": tokens, "rows": rows}
    args.out.write_text(json.dumps(result | {"ratios_vs_full": ratios}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
