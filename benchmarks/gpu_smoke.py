"""The GPU smoke test driven by benchmarks/gpu_smoke.sh: what a first run on NVIDIA GPUs must show, as JSON.

    python benchmarks/gpu_smoke.py OUT_DIR        (gpu_smoke.sh runs it under a time limit)

Builds everything in OUT_DIR (no downloads): a small Llama config with random weights (about 0.1B
parameters, the demo tokenizer's vocabulary), prompt/generation pairs tokenized with that tokenizer. Then,
each check writing its result into OUT_DIR/results.json as soon as it ends (a time limit leaves the finished
ones):

  flash_vs_sdpa     flash-attn varlen vs minitrain's packed SDPA: loss and gradients, one packed bf16 batch
  liger_vs_chunked  Liger's fused linear cross-entropy vs the chunked loss head: loss and gradients, bf16
  split_invariance  `minitrain train` bf16 FSDP2 on all visible GPUs vs 1 GPU: the loss curves agree within
                    bf16 tolerance (the same global batches, split differently)
  cpu_offload       the same run with --cpu-offload: the same loss curve
  resume            stop at step 2 (a checkpoint), --resume to step 4: the same steps 3-4 as the straight run
  throughput        tokens/s, MFU and peak memory per GPU of the all-GPU run, next to `--dry-run`'s memory
                    model prediction for its largest minibatch

Without a CUDA GPU it writes {"skipped": ...} and exits 0. Never run here (no GPU in the sessions that wrote
it): the checks are as written, not as verified.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STEPS = 4
BF16_RTOL = 2e-2  # relative tolerance between bf16 runs that sum in a different order


def _record(out: Path, name: str, result: dict) -> None:
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[name] = result
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{name}: {json.dumps(result)}", flush=True)


def _build_inputs(out: Path) -> tuple[Path, Path]:
    """(model folder with random weights + the demo tokenizer, tokenized data)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from minitrain.demo import assets_dir

    model_dir = out / "model"
    config = LlamaConfig(
        vocab_size=json.loads((assets_dir() / "config.json").read_text())["vocab_size"], hidden_size=1024,
        intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
        max_position_embeddings=8192, tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(assets_dir() / name, model_dir / name)
    rng = random.Random(0)
    raw = out / "text.jsonl"
    with raw.open("w") as f:
        for _ in range(512):
            words = [
                f"{rng.randint(0, 999)} plus {rng.randint(0, 999)} is {rng.randint(0, 1998)}."
                for _ in range(40)
            ]
            n = rng.randint(5, 40)
            f.write(json.dumps({"prompt": " ".join(words[:2]), "generation": " ".join(words[2:n])}) + "\n")
    data = out / "data.jsonl"
    _minitrain(["tokenize", str(raw), "-o", str(data), "--model-name-or-path", str(model_dir)])
    return model_dir, data


def _minitrain(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "minitrain", *args], check=True, cwd=REPO)


def _packed_batch(vocab: int, lengths: list[int]):
    import torch

    from minitrain.data.batch import PackedMinibatch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return PackedMinibatch(
        input_ids=ids, labels=ids.clone(), position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
        cu_seqlens=cu, max_seqlen=max(lengths), num_samples=len(lengths), num_tokens=sum(lengths),
        num_loss_tokens=sum(lengths),
    )  # fmt: skip


def _compare(a: dict, b: dict) -> float:
    """The worst relative difference (by norm) between two {name: tensor} dicts."""
    return max(float((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-12)) for k in b)


def check_flash(out: Path, model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from minitrain.train.attention import PACKED_ATTENTION, flash_attn_problem, register_packed_attention
    from minitrain.train.model import CausalLMWithLoss

    problem = flash_attn_problem()
    if problem is not None:
        _record(out, "flash_vs_sdpa", {"skipped": problem})
        return
    register_packed_attention()
    batch = _packed_batch(300, [700, 31, 1500, 2, 1813]).to("cuda")
    results = {}
    for attn in ("flash_attention_2", PACKED_ATTENTION):
        lm = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.bfloat16)
        model = CausalLMWithLoss(lm.cuda(), use_liger=False)
        loss = model(batch)
        loss.backward()
        results[attn] = (loss.detach(), {n: p.grad for n, p in lm.named_parameters()})
    (fl, fg), (sl, sg) = results["flash_attention_2"], results[PACKED_ATTENTION]
    worst = _compare(fg, sg)
    rel = abs(fl.item() - sl.item()) / abs(sl.item())
    _record(
        out, "flash_vs_sdpa", {"loss_rel": rel, "worst_grad_rel": worst, "ok": rel < 1e-2 and worst < 5e-2}
    )


def check_liger(out: Path) -> None:
    import torch

    from minitrain.train.loss import chunked_cross_entropy_sum, liger_available, linear_cross_entropy_sum

    if not liger_available("cuda"):
        _record(out, "liger_vs_chunked", {"skipped": "liger-kernel not importable"})
        return
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(4096, 1024, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = torch.randn(32000, 1024, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    labels = torch.randint(0, 32000, (4096,), device="cuda", generator=g)
    labels[::3] = -100
    got = {}
    for name, fn in (
        ("liger", lambda h, w: linear_cross_entropy_sum(h, w, labels, use_liger=True)),
        ("chunked", lambda h, w: chunked_cross_entropy_sum(h, w, labels)),
    ):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        got[name] = {"loss": loss.detach(), "hidden": h.grad, "weight": w.grad}
    worst = _compare(got["liger"], got["chunked"])
    _record(out, "liger_vs_chunked", {"worst_rel": worst, "ok": worst < 2e-2})


def _train(out: Path, model_dir: Path, data: Path, name: str, nproc: int, *extra: str) -> list[dict]:
    run = out / name
    _minitrain([
        "train", "--data-path", str(data), "--model-name-or-path", str(model_dir), "--output-dir", str(run),
        "--nproc", str(nproc), "--batch-size", "64", "--max-tokens-per-gpu", "8192",
        "--learning-rate", "1e-4", "--seed", "7", *(() if "--resume" in extra else ("--overwrite",)), *extra,
    ])  # fmt: skip
    from minitrain.rundir import METRICS_FILE, read_metrics

    return [r for r in read_metrics(run / METRICS_FILE) if "loss" in r]


def _same_curve(a: list[dict], b: list[dict]) -> float:
    return max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(a, b, strict=True))


def main(out: Path) -> int:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        _record(out, "skipped", {"reason": "needs an NVIDIA GPU with CUDA; none is visible"})
        print("gpu_smoke: needs an NVIDIA GPU with CUDA; none is visible, nothing to check", flush=True)
        return 0
    gpus = torch.cuda.device_count()
    _record(out, "machine", {"gpus": gpus, "name": torch.cuda.get_device_name(0), "torch": torch.__version__})
    model_dir, data = _build_inputs(out)
    for name, check in (
        ("flash_vs_sdpa", lambda: check_flash(out, model_dir)),
        ("liger_vs_chunked", lambda: check_liger(out)),
    ):
        try:
            check()
        except Exception as err:  # noqa: BLE001 - one failed check must not hide the others
            _record(out, name, {"error": f"{type(err).__name__}: {err}"})
    steps = ("--max-steps", str(STEPS))
    started = time.perf_counter()
    many = _train(out, model_dir, data, "all_gpus", gpus, *steps)
    one = _train(out, model_dir, data, "one_gpu", 1, *steps)
    diff = _same_curve(many, one)
    _record(out, "split_invariance", {"gpus": gpus, "worst_loss_rel": diff, "ok": diff < BF16_RTOL})
    offload = _train(out, model_dir, data, "cpu_offload", gpus, *steps, "--cpu-offload")
    diff = _same_curve(offload, many)
    _record(out, "cpu_offload", {"worst_loss_rel": diff, "ok": diff < BF16_RTOL})
    _train(out, model_dir, data, "resume", gpus, "--max-steps", "2", "--min-samples-per-checkpoint", "64")
    resumed = _train(out, model_dir, data, "resume", gpus, *steps, "--resume", "latest")
    diff = _same_curve(resumed[2:], many[2:])
    _record(out, "resume", {"worst_loss_rel": diff, "ok": len(resumed) == STEPS and diff < BF16_RTOL})

    from minitrain.train.dryrun import dry_run

    report = dry_run(
        data_path=data, batch_size=64, max_tokens_per_gpu=8192, world_size=gpus, seed=7, max_steps=STEPS,
        max_samples=None, max_epochs=None, model_name_or_path=str(model_dir), report_path=None,
    )  # fmt: skip
    predicted = next(
        r for r in report.memory["peak"] if r["master_dtype"] == "fp32" and not r["activation_checkpointing"]
    )
    last = many[-1]
    _record(out, "throughput", {
        "tokens_per_second": last["tokens_per_second"], "mfu": last.get("mfu"),
        "peak_memory_gb_rank0": last["peak_memory_usage_GB"],
        "predicted_peak_gb": predicted["peak_gib"] * 2**30 / 1e9,
        "ratio_predicted_over_measured": predicted["peak_gib"] * 2**30 / 1e9 / last["peak_memory_usage_GB"],
        "training_seconds": time.perf_counter() - started,
    })  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    failed = [k for k, v in results.items() if isinstance(v, dict) and (v.get("ok") is False or "error" in v)]
    print(
        f"gpu_smoke: {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}; "
        f"see {out}/results.json"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_smoke_results")))
