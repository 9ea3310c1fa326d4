"""Peak host memory of the loss head (linear + cross-entropy): chunked vs full logits, against the floor.

Each variant runs in its own subprocess (so one variant's allocator state cannot flatter another). The
subprocess builds hidden (T x H) and the lm_head weight (V x H) in fp32, notes its resident set size, runs the
variant, and reports peak RSS (getrusage ru_maxrss) minus that baseline: the memory the loss head added on top
of its inputs. Reported: inputs + added, compared with two floors:
  value floor     hidden + weight + one (chunk x V) fp32 chunk          (what evaluating the loss must hold)
  train floor     value floor + grad_hidden + grad_weight                (backward must also produce these)

Defaults follow the issue: vocab 128,256 (Llama 3), 8,192 tokens, chunk 1,024; hidden 256 (not 4,096) so the
three (T x V x H) matmuls per variant finish in seconds on a 2-core CPU. The logits-side memory (the thing the
chunked path removes) does not depend on H. The full-logits variant needs about 12 GB of RAM at these sizes.

    python benchmarks/bench_loss_memory.py [--vocab 128256] [--tokens 8192] [--hidden 256] [--chunk 1024]
        [--out benchmarks/results/loss_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024

VARIANTS = {
    "full logits, value": ("full", False),
    "full logits, value + grads": ("full", True),
    "chunked, value": ("chunked", False),
    "chunked, value + grads": ("chunked", True),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(kind: str, grads: bool, vocab: int, tokens: int, hidden: int, chunk: int) -> dict:
    """Inside the subprocess: build inputs, run one variant, return bytes added above the inputs."""
    import resource

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from minitrain.train.loss import chunked_cross_entropy_sum

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).requires_grad_(grads)
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_(grads)
    y = torch.randint(0, vocab, (tokens,), generator=g)
    y[: tokens // 4] = -100  # a masked prompt quarter, as in chat data
    base = _rss_bytes()
    t0 = time.perf_counter()
    with torch.set_grad_enabled(grads):
        if kind == "full":
            loss = F.cross_entropy(h @ w.T, y, ignore_index=-100, reduction="sum")
        else:
            loss = chunked_cross_entropy_sum(h, w, y, chunk_size=chunk)
        if grads:
            loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"added_bytes": max(peak - base, 0), "loss": float(loss), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "loss_memory.json")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, grads = args.child[0], args.child[1] == "1"
        print(json.dumps(run_variant(kind, grads, args.vocab, args.tokens, args.hidden, args.chunk)))
        return

    f32 = 4
    hidden_b = args.tokens * args.hidden * f32
    weight_b = args.vocab * args.hidden * f32
    trained = args.tokens - args.tokens // 4  # the child masks the first quarter (a prompt)
    chunk_b = min(args.chunk, trained) * args.vocab * f32
    value_floor = hidden_b + weight_b + chunk_b
    train_floor = value_floor + hidden_b + weight_b
    inputs = hidden_b + weight_b

    rows = []
    for name, (kind, grads) in VARIANTS.items():
        cmd = [sys.executable, __file__, "--child", kind, "1" if grads else "0"]
        cmd += ["--vocab", str(args.vocab), "--tokens", str(args.tokens), "--hidden", str(args.hidden)]
        cmd += ["--chunk", str(args.chunk)]
        res = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        )
        total = inputs + res["added_bytes"]
        floor = train_floor if grads else value_floor
        rows.append(
            {
                "variant": name,
                "peak_mb": total / MB,
                "floor_mb": floor / MB,
                "x_floor": total / floor,
                "seconds": res["seconds"],
                "loss": res["loss"],
            }
        )
        print(
            f"  {name}: {total / MB:.0f} MB ({total / floor:.2f}x floor) in {res['seconds']:.1f} s",
            flush=True,
        )

    table = Table(
        title=f"loss head peak memory: vocab {args.vocab}, {args.tokens} tokens, hidden {args.hidden}, "
        f"chunk {args.chunk} (fp32, CPU)"
    )
    for col in ("variant", "peak MB", "floor MB", "x floor", "s", "loss"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        table.add_row(
            r["variant"],
            f"{r['peak_mb']:.0f}",
            f"{r['floor_mb']:.0f}",
            f"{r['x_floor']:.2f}",
            f"{r['seconds']:.1f}",
            f"{r['loss']:.1f}",
        )
    Console().print(table)
    full = next(r for r in rows if r["variant"] == "full logits, value + grads")
    chunked = next(r for r in rows if r["variant"] == "chunked, value + grads")
    print(f"full / chunked peak (value + grads): {full['peak_mb'] / chunked['peak_mb']:.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: getattr(args, k) for k in ("vocab", "tokens", "hidden", "chunk")}
    args.out.write_text(json.dumps({"config": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
