"""minitrain/train/compile.py: compiled decoder blocks give eager's numbers, compiled once for every pack.

References are the same model run eagerly (the code every other parity test here checks). Inductor really
compiles (C++ on the CPU), which costs tens of seconds per new graph on a cold cache; inductor's on-disk
cache makes reruns faster. Hence one tiny model per test and few steps.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import orjson
import pytest
import torch

from minitrain.config import LoraSettings
from minitrain.train.attention import PACKED_ATTENTION
from minitrain.train.compile import compile_blocks
from minitrain.train.model import CausalLMWithLoss, decoder_blocks, shard_model
from tests.conftest import tiny_llama_config
from tests.train.test_loop import _run, write_tokenized
from tests.train.test_model import CPU1, build_lm, grads, make_samples, one_rank_group, pack  # noqa: F401

pytestmark = pytest.mark.slow

PACKS = ([9, 4, 11], [5, 7, 3, 8, 2], [20])  # other token counts and other sample counts


def _fresh_dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    return counters


def _step(model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict]:
    """(loss, gradients of the trained parameters, by their unwrapped names) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    loss = model(batch)
    loss.backward()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:  # `grads` reads every parameter's gradient: give the frozen ones (LoRA's base) a zero
        p.grad = torch.zeros_like(p)
    trained = [p.requires_grad for p in model.parameters()]
    return loss.detach(), {n: g for (n, g), t in zip(grads(model).items(), trained, strict=True) if t}


def _assert_close(loss, ref, got: dict, want: dict) -> None:
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_blocks_match_eager_and_compile_once_for_every_pack() -> None:
    counters = _fresh_dynamo()
    lm = build_lm(PACKED_ATTENTION)
    eager = CausalLMWithLoss(copy.deepcopy(lm), use_liger=False, chunk_size=8)
    compiled = CausalLMWithLoss(lm, use_liger=False, chunk_size=8)
    compile_blocks(decoder_blocks(lm))
    frames = []
    for seed, lengths in enumerate(PACKS):
        batch = pack(make_samples(lengths, seed=seed))
        ref, want = _step(eager, batch)
        loss, got = _step(compiled, batch)
        _assert_close(loss, ref, got, want)
        frames.append(counters["frames"]["ok"])
    assert frames[0] > 0, "nothing was compiled"
    assert frames[1:] == frames[:1] * (len(PACKS) - 1), f"recompiled for another pack length: {frames}"
    # the one graph break is the packed attention, kept eager on purpose (its loop over the samples)
    breaks = list(counters["graph_break"])
    assert breaks and all("packed_sdpa_attention_forward" in reason for reason in breaks), breaks
    # names are untouched: checkpoints and exports of a compiled model are those of an eager one
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]


def test_compile_composes_with_lora_fsdp2_and_activation_checkpointing(one_rank_group) -> None:  # noqa: F811
    """Dynamo's tracing and AOT autograd through LoRA layers, FSDP2's hooks and checkpointing: the aot_eager
    backend traces the very graphs inductor would get (inductor's own kernels are checked above and through
    the CLI below) without generating and building C++ kernels for them."""
    from minitrain.train.adapters import add_adapters

    _fresh_dynamo()
    lm = add_adapters(build_lm(PACKED_ATTENTION, num_hidden_layers=1), LoraSettings(rank=4))
    plain = copy.deepcopy(lm)
    compile_blocks(decoder_blocks(lm), backend="aot_eager")
    model = shard_model(
        CausalLMWithLoss(lm, use_liger=False, chunk_size=8), dist=CPU1, strategy="FULL_SHARD",
        mixed_precision=False, master_dtype=torch.float32, cpu_offload=False, activation_checkpointing=True,
    )  # fmt: skip
    eager = CausalLMWithLoss(plain, use_liger=False, chunk_size=8)
    for seed, lengths in enumerate(PACKS[:2]):
        batch = pack(make_samples(lengths, seed=seed))
        ref, want = _step(eager, batch)
        loss, got = _step(model, batch)
        assert got.keys() == want.keys() and any("lora_A" in name for name in got)
        _assert_close(loss, ref, got, want)


STEPS = 4


def _metrics(run: Path) -> list[dict]:
    return [orjson.loads(line) for line in (run / "training_metrics_0.jsonl").read_bytes().splitlines()]


def test_train_compile_through_the_cli_matches_eager_losses_and_weights(tmp_path) -> None:
    """`minitrain train --compile` (1 rank) against the same run without: the flag reaches the worker and
    the run's numbers are eager's. Checkpointing and adapters are the test above; each extra mode here (eval's
    no-grad graphs, checkpointing) is another compile of a minute on a cold cache."""
    from safetensors.torch import load_file

    data = write_tokenized(tmp_path / "data.jsonl", num=8, vocab=128, seed=3)
    tiny_llama_config(vocab_size=128, num_hidden_layers=1).save_pretrained(tmp_path / "model")
    command = [
        sys.executable, "-m", "minitrain", "train", "--data-path", str(data), "--model-name-or-path",
        str(tmp_path / "model"), "--from-scratch", "--batch-size", "8", "--max-tokens-per-gpu", "128",
        "--max-steps", str(STEPS), "--learning-rate", "1e-2", "--num-warmup-steps", "0", "--nproc", "1",
    ]  # fmt: skip
    runs = {name: tmp_path / name for name in ("eager", "compiled")}
    _run([*command, "--output-dir", str(runs["eager"])], tmp_path)
    _run([*command, "--output-dir", str(runs["compiled"]), "--compile"], tmp_path, timeout=900)
    params = orjson.loads((runs["compiled"] / "training_params.json").read_bytes())
    assert params["compile"] is True
    eager, compiled = _metrics(runs["eager"]), _metrics(runs["compiled"])
    want, got = ([r["loss"] for r in m if "loss" in r] for m in (eager, compiled))
    assert len(want) == len(got) == STEPS
    for step, (a, b) in enumerate(zip(want, got, strict=True)):
        assert b == pytest.approx(a, rel=1e-5), step
    final = f"samples_{8 * STEPS}"
    want = load_file(runs["eager"] / "hf_format" / final / "model.safetensors")
    got = load_file(runs["compiled"] / "hf_format" / final / "model.safetensors")
    assert got.keys() == want.keys()
    # fused kernels sum in another order (gradients differ by ~1e-7 relative); AdamW divides each gradient by
    # its own running RMS, so an element whose gradient is ~0 can move by a visible fraction of one step
    # (lr 1e-2): measured 2.1e-5 on 1 of 8,192 elements, 8e-6 relative over the tensor. A real difference
    # (a wrong mask, a dropped adapter) changes the losses above at once.
    for name in want:
        diff = got[name] - want[name]
        assert diff.abs().max() < 1e-4 and diff.norm() < 2e-5 * want[name].norm(), (name, diff.abs().max())


def test_compile_without_a_cpu_compiler_is_one_line_before_spawning(tmp_path, monkeypatch) -> None:
    """On the CPU inductor builds its kernels with a C++ compiler: none is a one-line error up front."""
    import torch._inductor.config
    from typer.testing import CliRunner

    from minitrain.cli import app
    from minitrain.errors import UserError

    data = write_tokenized(tmp_path / "data.jsonl", num=4, vocab=64, seed=0)
    tiny_llama_config(vocab_size=64).save_pretrained(tmp_path / "model")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "no-such-c++"))
    monkeypatch.setattr("minitrain.train.launch.run_command", lambda *a, **k: pytest.fail("launched"))
    args = ["train", "--data-path", str(data), "--model-name-or-path", str(tmp_path / "model"),
            "--output-dir", str(tmp_path / "out"), "--nproc", "1", "--from-scratch", "--compile"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UserError), result.output
    message = str(result.exception)
    assert "\n" not in message and "needs a C++ compiler" in message and "no-such-c++" in message
    assert "drop --compile" in message
