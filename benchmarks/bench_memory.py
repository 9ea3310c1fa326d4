"""The memory model (`minitrain.train.memory.estimate_peak`) against measured peaks on the CPU.

Each case runs in its own subprocess. The subprocess notes its resident set size (RSS) with torch imported
and nothing built, builds a Llama/Qwen-shaped model from a config (fp32), shards it with minitrain's
`shard_model` on a world of one (gloo), builds AdamW, and takes one optimizer step (AdamW's state now exists).
Then it counts the bytes of the tensors alive (weights and AdamW state, by their sizes), notes RSS, resets
the kernel's peak-RSS counter (`/proc/self/clear_refs` 5), takes a second step on a packed minibatch of T
tokens, and reports (peak RSS - RSS before the step) + the live tensors: what the step held at its peak,
without the interpreter, the imported model code and the allocator's state, which are no tensor of ours.
(`naive_bytes` in the JSON: peak RSS minus the RSS before anything was built, for comparison.) glibc's mmap
threshold is pinned (MALLOC_MMAP_THRESHOLD_) so that large freed tensors go back to the kernel instead of
staying in the heap and inflating the peak.

CPU figures use fp32 compute (c = 4, no mixed precision, no all-gather copies on one rank). GPU figures (bf16,
8 ranks) are benchmarks/gpu_smoke.sh's job.

    python benchmarks/bench_memory.py [--quick] [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> config (LlamaConfig / Qwen2-like through LlamaConfig with tied embeddings and head_dim)
SHAPES = {
    "tiny-llama": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "small-llama": dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    "small-qwen": dict(vocab_size=16384, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                       model_type="qwen3"),
}  # fmt: skip
CASES = [  # (shape, tokens, activation checkpointing)
    ("tiny-llama", 2048, False),
    ("small-llama", 2048, False),
    ("small-llama", 2048, True),
    ("small-llama", 8192, False),
    ("small-qwen", 4096, False),
    ("small-qwen", 4096, True),
]
QUICK = [CASES[1], CASES[2]]


def _config(name: str):
    from transformers import LlamaConfig, Qwen3Config

    kwargs = dict(SHAPES[name])
    kind = kwargs.pop("model_type", "llama")
    cls = Qwen3Config if kind == "qwen3" else LlamaConfig
    return cls(max_position_embeddings=16384, use_cache=False, **kwargs)


def shape_of(config) -> dict:
    """The `ModelShape` fields of a transformers config (counted from the built model's parameters)."""
    heads = config.num_attention_heads
    return dict(
        vocab=config.vocab_size, hidden=config.hidden_size, layers=config.num_hidden_layers,
        intermediate=config.intermediate_size, heads=heads, kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        tied=bool(config.tie_word_embeddings), qk_norm=config.model_type == "qwen3",
    )  # fmt: skip


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(name: str, tokens: int, checkpointing: bool) -> dict:
    """One case, in this process: baseline, build, two steps, peak of the second (see the docstring)."""
    import socket

    import torch
    import torch.distributed as torch_dist
    from transformers import AutoModelForCausalLM

    from minitrain.data.batch import PackedMinibatch
    from minitrain.train.attention import register_packed_attention
    from minitrain.train.dist import DistInfo
    from minitrain.train.model import CausalLMWithLoss, shard_model
    from minitrain.train.optim import build_optimizer

    torch.set_num_threads(2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    dist = DistInfo(0, 0, 1, 1, torch.device("cpu"), "gloo")
    baseline = _rss("VmRSS:")
    config = _config(name)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, attn_implementation=register_packed_attention())
    num_params = sum(p.numel() for p in lm.parameters())
    model = shard_model(
        CausalLMWithLoss(lm, use_liger=False), dist=dist, strategy="FULL_SHARD", mixed_precision=False,
        master_dtype=torch.float32, cpu_offload=False, activation_checkpointing=checkpointing,
    )  # fmt: skip
    optimizer = build_optimizer(model, learning_rate=1e-4, weight_decay=0.0, device=dist.device)
    lengths = [512] * (tokens // 512)  # packed samples of 512 tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    batch = PackedMinibatch(
        input_ids=ids, labels=ids.clone(), position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
        cu_seqlens=cu, max_seqlen=512, num_samples=len(lengths), num_tokens=tokens, num_loss_tokens=tokens,
    )  # fmt: skip
    for step in range(2):
        if step == 1:  # the steady state: weights and AdamW state alive, no gradient (set_to_none)
            live = sum(_local(p).nbytes for p in model.parameters()) + sum(
                _local(v).nbytes for st in optimizer.state.values() for v in st.values() if v.dim() > 0
            )
            before = _rss("VmRSS:")
            Path("/proc/self/clear_refs").write_text("5")  # the peak RSS counter starts again from now
        model(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = _rss("VmHWM:") - before + live  # what the step added at its peak, plus the live tensors counted
    torch_dist.destroy_process_group()
    return {
        "num_params": num_params, "measured_bytes": peak, "naive_bytes": _rss("VmHWM:") - baseline,
        **shape_of(config),
    }  # fmt: skip


def _local(t):
    """The tensor a rank holds (a DTensor's local shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


def predict(shape: dict, num_params: int, tokens: int, checkpointing: bool):
    from minitrain.train.memory import ModelShape, RankPlan, estimate_peak

    plan = RankPlan(tokens=tokens, shards=1, master_bytes=4, compute_bytes=4, checkpointing=checkpointing)
    return estimate_peak(ModelShape(num_params=num_params, **shape), plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two cases only")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a case, run in this (child) process
    args = parser.parse_args()
    if args.one:
        name, tokens, ac = json.loads(args.one)
        print(json.dumps(measure(name, tokens, ac)))
        return
    from rich.console import Console
    from rich.table import Table

    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    rows = []
    for name, tokens, ac in QUICK if args.quick else CASES:
        out = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps([name, tokens, ac])],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        got = json.loads(out.stdout.strip().splitlines()[-1])
        shape = {
            k: got[k]
            for k in (
                "vocab",
                "hidden",
                "layers",
                "intermediate",
                "heads",
                "kv_heads",
                "head_dim",
                "tied",
                "qk_norm",
            )
        }
        parts = predict(shape, got["num_params"], tokens, ac)
        rows.append({
            "shape": name, "tokens": tokens, "checkpointing": ac, "num_params": got["num_params"],
            "measured_mib": got["measured_bytes"] / 2**20, "predicted_mib": parts.total / 2**20,
            "ratio": parts.total / got["measured_bytes"], "peak_at": parts.peak_at,
            "predicted_parts_mib": {k: v / 2**20 for k, v in parts.parts.items()},
        })  # fmt: skip
    table = Table(title="peak memory of one training step, CPU, fp32, world of one")
    for col in ("shape", "params", "tokens", "AC", "measured", "predicted", "predicted / measured"):
        table.add_column(col, justify="left" if col == "shape" else "right")
    for r in rows:
        table.add_row(
            r["shape"], f"{r['num_params'] / 1e6:.1f}M", f"{r['tokens']:,}",
            "on" if r["checkpointing"] else "off",
            f"{r['measured_mib']:,.0f} MiB", f"{r['predicted_mib']:,.0f} MiB", f"{r['ratio']:.2f}",
        )  # fmt: skip
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
