"""`--compile`: `torch.compile` of each decoder block for training (inductor: C++ on the CPU, Triton on GPUs).

Owns `compile_blocks`, called by the worker after the adapters are added and before `shard_model`, and
`require_compiler`, the preflight check that inductor has the compiler it needs (the parent runs it before
spawning: otherwise the first step of every rank fails with a long traceback).

Why per block and how:
- Per block, not the whole model: a block is also the FSDP2 unit and the activation-checkpointing unit, so
  FSDP2's gather/reshard hooks and `checkpoint_wrapper` stay outside the compiled code, and the loss head
  (chunked cross-entropy, Liger) stays the eager code that its parity tests cover.
- The block's `forward` is replaced in place by its compiled version (an instance attribute), not wrapped in
  an `OptimizedModule`: module names and state-dict keys (checkpoints, exports, resume) do not change.
- Packed attention runs eagerly: `minitrain_packed` loops over the samples of the pack, whose number
  changes every minibatch, so it is `torch.compiler.disable`d (minitrain/train/attention.py) and each block
  becomes two graphs (before and after attention) around one graph break. The dense work (norms,
  projections, rotary, MLP, LoRA) is what gets fused.
- `dynamic=True`: the token dimension T of a packed minibatch (1, T) changes every step; symbolic shapes
  compile each graph once for every T instead of once per length. The compiled code is shared by every block
  of the model (dynamo guards on the module's class and parameter shapes, not on the instance), so a model
  compiles the same number of graphs whatever its depth; measured with `torch._dynamo.utils.counters`
  (tests/train/test_compile.py asserts no recompile across packs of other lengths and sample counts).
- Gradient mode is part of the guard: evaluation (no_grad) compiles its own graphs once, at the first eval.

Cost: the first step of a run includes the compile (about a minute of CPU time for a 2-layer model on the
CPU, benchmarks/bench_train.py reports it apart from the steady tokens/s); inductor's on-disk cache makes
later runs of the same model start faster.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from minitrain.errors import UserError


def require_compiler(device_type: str) -> None:
    """Refuse `--compile` up front when inductor cannot build kernels: Triton on a GPU, a C++ compiler
    (g++, or inductor's `cpp.cxx` setting / $CXX) on the CPU."""
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise UserError(
                "--compile on a GPU needs Triton (inductor writes its GPU kernels in it): "
                "pip install triton, or drop --compile"
            )
        return
    from torch._inductor import config, exc
    from torch._inductor.cpp_builder import cpp_compiler_search

    search = tuple(config.cpp.cxx) if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
    try:
        cpp_compiler_search(search)  # inductor's own search: the first that answers `--version`
    except exc.InvalidCxxCompiler:
        names = ", ".join(name for name in search if name)
        raise UserError(
            f"--compile on the CPU needs a C++ compiler and none of {names} runs: install g++ (e.g. apt "
            "install g++) or set CXX to one, or drop --compile"
        ) from None


def compile_blocks(blocks: nn.ModuleList, *, backend: str = "inductor") -> None:
    """Compile each block's forward in place, with the token dimension dynamic (see the module docstring).

    `backend` is torch.compile's: training uses inductor; tests of how compiled blocks compose with FSDP2,
    activation checkpointing and adapters (dynamo's tracing and AOT autograd, where composition breaks) may
    pass "aot_eager", which traces the same graphs without generating kernels.
    """
    for block in blocks:
        # the bound method of this instance: hooks (FSDP2's) and the module tree stay untouched
        block.forward = torch.compile(block.forward, dynamic=True, backend=backend)
