"""Training-step throughput on real sample lengths: minitrain vs HF-style padded batches vs the bare limit.

Useful tokens/s = non-padding tokens of the step / CPU seconds of the step (fp32, CPU, one thread, one
process; the machine is shared, so the process's own CPU time is the steady measure; wall tok/s beside it).

Table 1 (the issue's comparison), one global batch of fixture samples per step:
  minitrain   CausalLMWithLoss on one packed row (minitrain_packed attention, chunked loss), loss scaled
              by the trained-token count, backward, AdamW step, zero_grad - what the training loop does
  hf padded   the same samples in micro-batches of --micro-batch, right-padded to each micro-batch's
              longest, `model(input_ids, attention_mask, labels=...)` (sdpa, full logits), loss /
              micro-batches, backward; AdamW step once per step (gradient accumulation, as HF Trainer does)
  minitrain --compile   the same with each decoder block torch.compiled (minitrain/train/compile.py;
              inductor, dynamic shapes); its compile is the warm-up step, timed apart ("warm-up s")
  limit       bare decoder forward + chunked loss + backward on the same packed tensors, already in place:
              no optimizer, no wrapper, no batch moves
Table 2 (attention choice), forward+backward of decoder + chunked loss on packs of 16/32/64 samples, for a
tiny (2 layers, hidden 64) and a moderate (4 layers, hidden 256) model:
  block-diag sdpa   attn "sdpa" on the packed row: transformers builds a (T x T) block-diagonal mask
  per-sample sdpa   attn "minitrain_packed": causal SDPA on each sample alone (cu_seqlens)
  padded sdpa       the same samples as a right-padded (B x Lmax) batch with an attention mask
Each measurement runs in its own subprocess; peak memory is that process's peak RSS during a step after the
warm-up step minus its RSS before that step (model, optimizer state and data included in the baseline; the
peak is reset after the warm-up through /proc/self/clear_refs, so a compile's own memory is left out).

Samples: ../shared/fixtures/data/*.messages.jsonl rendered with the TinyLlama chat template (32,000-token
vocabulary, real ids), the user turn masked; samples longer than --max-len are left out. Model: Llama,
4 layers, hidden 256, 4 heads (2 KV), vocabulary 32,000.

    python benchmarks/bench_train.py [--batch 32] [--steps 2] [--repeats 2] [--quick] [--no-attention]
        [--out benchmarks/results/train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from rss import current_rss, peak_rss, reset_peak_rss  # benchmarks/rss.py, beside this script

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
MB = 1024 * 1024

MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "moderate": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
}


def load_samples(max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, aligned labels) of every fixture conversation up to max_len tokens; user turn masked."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FIXTURES / "tokenizers" / "tinyllama-1.1b-chat-v1.0")
    out = []
    for path in sorted((FIXTURES / "data").glob("*.messages.jsonl")):
        for line in path.read_text().splitlines():
            messages = json.loads(line)["messages"]
            ids = list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
            prompt = tok.apply_chat_template(
                messages[:1], tokenize=True, add_generation_prompt=True, return_dict=True
            )
            n_prompt = len(prompt["input_ids"])
            if 2 < len(ids) <= max_len:
                out.append((ids, [-100] * n_prompt + ids[n_prompt:]))
    return out


def pick_batch(samples, n: int, seed: int):
    return random.Random(seed).sample(samples, n)


def pack(batch):
    import torch

    from minitrain.data.batch import PackedMinibatch

    ids = torch.tensor([t for s in batch for t in s[0]])[None]
    shifted = torch.tensor([t for s in batch for t in [*s[1][1:], -100]])[None]
    pos = torch.tensor([p for s in batch for p in range(len(s[0]))])[None]
    lens = [len(s[0]) for s in batch]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return PackedMinibatch(
        ids, shifted, pos, cu, max(lens), len(batch), sum(lens), int((shifted != -100).sum())
    )


def pad(batch):
    """Right-padded (B, Lmax) input_ids, attention_mask, aligned labels (-100 on padding)."""
    import torch

    lmax = max(len(s[0]) for s in batch)
    ids = torch.zeros(len(batch), lmax, dtype=torch.long)
    mask = torch.zeros(len(batch), lmax, dtype=torch.long)
    labels = torch.full((len(batch), lmax), -100, dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        labels[i, : len(y)] = torch.tensor(y)
    return ids, mask, labels


def build(model: str, attn: str, vocab: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from minitrain.train.attention import register_packed_attention

    register_packed_attention()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=4096, use_cache=False)
    for k, v in MODELS[model].items():
        setattr(cfg, k, v)
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)


ATTN = {"hf padded": "sdpa", "block-diag sdpa": "sdpa", "padded sdpa": "sdpa"}  # others: minitrain_packed


def make_step(variant: str, model: str, vocab: int, batches, micro_batch: int):
    """A closure running one step of `variant` on batches[i] (inputs prepared up front)."""
    import torch

    from minitrain.train.attention import packed_attention_kwargs
    from minitrain.train.loss import chunked_cross_entropy_sum
    from minitrain.train.model import CausalLMWithLoss
    from minitrain.train.optim import build_optimizer

    attn = ATTN.get(variant, "minitrain_packed")
    lm = build(model, attn, vocab)
    opt = build_optimizer(lm, learning_rate=1e-4, weight_decay=0.0, device=torch.device("cpu"))  # the loop's

    def decoder_loss(ids, pos, labels, kwargs, mask=None):
        hidden = lm.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False, **kwargs)
        return chunked_cross_entropy_sum(hidden.last_hidden_state, lm.lm_head.weight, labels)

    if variant in ("minitrain", "minitrain --compile"):
        if variant == "minitrain --compile":
            from minitrain.train.compile import compile_blocks
            from minitrain.train.model import decoder_blocks

            compile_blocks(decoder_blocks(lm))
        wrapped = CausalLMWithLoss(lm, use_liger=False)
        packed = [pack(b) for b in batches]

        def step(i):
            b = packed[i]
            (wrapped(b) / b.num_loss_tokens).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    elif variant == "hf padded":
        micro = [[pad(b[j : j + micro_batch]) for j in range(0, len(b), micro_batch)] for b in batches]

        def step(i):
            for ids, mask, labels in micro[i]:
                (lm(input_ids=ids, attention_mask=mask, labels=labels).loss / len(micro[i])).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    elif variant in ("limit", "block-diag sdpa", "per-sample sdpa"):
        packed = [pack(b) for b in batches]
        kws = [packed_attention_kwargs(p.cu_seqlens, p.max_seqlen, attn) for p in packed]

        def step(i):  # gradients accumulate in place: nothing but forward + backward
            p = packed[i]
            decoder_loss(p.input_ids, p.position_ids, p.labels, kws[i]).backward()

    elif variant == "padded sdpa":
        padded = []
        for b in batches:
            ids, mask, labels = pad(b)
            shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
            padded.append((ids, mask, shifted))

        def step(i):
            ids, mask, labels = padded[i]
            decoder_loss(ids, None, labels, {}, mask=mask).backward()

    else:
        raise SystemExit(f"unknown variant {variant}")
    return step


def child(args) -> dict:
    """Timing (all variants interleaved, min over repeats) or memory (one variant, peak RSS) in this
    process."""
    import torch

    torch.set_num_threads(args.threads)
    samples = load_samples(args.max_len)
    if args.vocab < 32000:  # the attention table's smaller vocabulary: fold the real ids into it
        samples = [
            ([t % args.vocab for t in x], [t if t < 0 else t % args.vocab for t in y]) for x, y in samples
        ]
    batches = [pick_batch(samples, args.batch, seed) for seed in range(args.steps + 1)]  # [0] is the warm-up
    useful = sum(len(s[0]) for b in batches[1:] for s in b)
    variants = args.variants.split(",")
    if args.child == "memory":
        (variant,) = variants
        step = make_step(variant, args.model, args.vocab, batches, args.micro_batch)
        step(0)  # warm-up (and compile): its peak is not the step's
        reset_peak_rss()
        base = current_rss()
        step(1)
        peak = peak_rss()
        return {variant: max(peak - base, 0) / MB}
    steps = {v: make_step(v, args.model, args.vocab, batches, args.micro_batch) for v in variants}
    warmup = {}
    for v, step in steps.items():  # the first step: allocations, and the whole compile for --compile
        t0 = time.perf_counter()
        step(0)
        warmup[v] = time.perf_counter() - t0
    # contended, shared CPU: interleave the variants and keep each batch's fastest repeat, in CPU seconds of
    # this (single-threaded) process - the work done, whatever the other processes on the machine do - and
    # in wall seconds beside it
    cpu = {v: [float("inf")] * args.steps for v in variants}
    wall = {v: [float("inf")] * args.steps for v in variants}
    for _ in range(args.repeats):
        for v, step in steps.items():
            for i in range(1, args.steps + 1):
                c0, t0 = time.process_time(), time.perf_counter()
                step(i)
                cpu[v][i - 1] = min(cpu[v][i - 1], time.process_time() - c0)
                wall[v][i - 1] = min(wall[v][i - 1], time.perf_counter() - t0)
    return {
        v: {
            "tokens_per_s": useful / sum(cpu[v]),
            "cpu_seconds_per_step": sum(cpu[v]) / args.steps,
            "wall_tokens_per_s": useful / sum(wall[v]),
            "useful_tokens_per_step": useful / args.steps,
            "warmup_wall_s": warmup[v],
        }
        for v in variants
    }


def _child_cmd(args, kind: str, variants: list[str], model: str, batch: int, vocab: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--variants", ",".join(variants), "--model", model]
    cmd += [
        "--batch",
        str(batch),
        "--vocab",
        str(vocab),
        "--steps",
        str(args.steps),
        "--max-len",
        str(args.max_len),
    ]
    cmd += [
        "--micro-batch",
        str(args.micro_batch),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{kind} {variants} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def run(args, variants: list[str], model: str, batch: int, vocab: int) -> list[dict]:
    """Time the variants side by side, then measure each one's memory in a fresh process."""
    timing = _child_cmd(args, "time", variants, model, batch, vocab)
    rows = []
    for v in variants:
        mem = _child_cmd(args, "memory", [v], model, batch, vocab)[v]
        rows.append(
            {"variant": v, "model": model, "batch": batch, "vocab": vocab, **timing[v], "peak_added_mb": mem}
        )
        print(
            f"  {v:20} {model:8} {batch:3} samples: {timing[v]['tokens_per_s']:8.0f} tok/CPU-s, "
            f"+{mem:.0f} MB, warm-up {timing[v]['warmup_wall_s']:.1f} s",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="samples per step (table 1)")
    ap.add_argument("--micro-batch", type=int, default=8, help="HF padded micro-batch size")
    ap.add_argument("--steps", type=int, default=2, help="timed batches per variant")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the batches; the fastest counts")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000, help=argparse.SUPPRESS)
    ap.add_argument("--attention-vocab", type=int, default=4096, help="vocabulary of the table-2 models")
    ap.add_argument("--variants", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    ap.add_argument("--quick", action="store_true", help="fewer configurations (smoke run)")
    ap.add_argument("--no-attention", action="store_true", help="table 1 only (skip the attention table)")
    ap.add_argument("--model", default="moderate", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train.json")
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        print(json.dumps(child(args)))
        return

    lengths = [len(s[0]) for s in load_samples(args.max_len)]
    print(f"{len(lengths)} fixture samples <= {args.max_len} tokens, mean {sum(lengths) / len(lengths):.0f}")
    if args.quick:
        args.batch, args.steps, args.repeats = 8, 1, 1
    print("table 1: training step")
    t1 = run(args, ["minitrain", "minitrain --compile", "hf padded", "limit"], "moderate", args.batch, 32000)
    by = {r["variant"]: r["tokens_per_s"] for r in t1}
    ratios = {
        "minitrain / hf padded": by["minitrain"] / by["hf padded"],
        "minitrain / limit": by["minitrain"] / by["limit"],
        "minitrain --compile / minitrain": by["minitrain --compile"] / by["minitrain"],
        "minitrain --compile / limit": by["minitrain --compile"] / by["limit"],
    }
    print("table 2: attention")
    packs = () if args.no_attention else (16,) if args.quick else (16, 32, 64)
    t2 = [
        row
        for m in MODELS
        for n in packs
        for row in run(
            args, ["block-diag sdpa", "per-sample sdpa", "padded sdpa"], m, n, args.attention_vocab
        )
    ]

    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    table = Table(title=f"training step, moderate Llama, {args.batch} fixture samples/step (fp32, CPU)")
    columns = (
        "variant",
        "useful tok/CPU-s",
        "CPU s/step",
        "useful tok/step",
        "wall tok/s",
        "peak +MB",
        "warm-up s",
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in t1:
        table.add_row(
            r["variant"],
            f"{r['tokens_per_s']:.0f}",
            f"{r['cpu_seconds_per_step']:.2f}",
            f"{r['useful_tokens_per_step']:.0f}",
            f"{r['wall_tokens_per_s']:.0f}",
            f"{r['peak_added_mb']:.0f}",
            f"{r['warmup_wall_s']:.1f}",
        )
    console.print(table)
    for k, v in ratios.items():
        console.print(f"{k}: {v:.2f}x")
    table = Table(
        title=f"attention on packs: forward + backward (decoder + chunked loss, vocab {args.attention_vocab})"
    )
    for col in (
        "model",
        "samples",
        "variant",
        "tok/CPU-s",
        "CPU s/step",
        "tok/step",
        "peak +MB",
        "vs block-diag",
    ):
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for r in t2:
        ref = next(
            x
            for x in t2
            if x["model"] == r["model"] and x["batch"] == r["batch"] and x["variant"] == "block-diag sdpa"
        )
        table.add_row(
            r["model"],
            str(r["batch"]),
            r["variant"],
            f"{r['tokens_per_s']:.0f}",
            f"{r['cpu_seconds_per_step']:.2f}",
            f"{r['useful_tokens_per_step']:.0f}",
            f"{r['peak_added_mb']:.0f}",
            f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x",
        )
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"config": vars(args) | {"out": str(args.out)}, "step": t1, "ratios": ratios, "attention": t2},
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
