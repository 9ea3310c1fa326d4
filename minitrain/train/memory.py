"""Peak memory per rank of a training plan, predicted from the model's shape alone (no torch, no model).

Owns `ModelShape` (the sizes that set memory), `RankPlan` (what one rank runs) and `estimate_peak` (bytes per
part at the peak of a step). `--dry-run` prints it; on a GPU the parent checks it against the device's
memory before spawning (`minitrain.train.launch`); benchmarks/bench_memory.py measures it.

What one rank holds at the peak, the end of the forward / start of the backward of its largest minibatch
(T tokens), with c the compute dtype's bytes (2 for bf16 on GPU; the master dtype on CPU) and m the master
dtype's bytes, P parameters of which the rank holds 1/shards:

    weights      m * P / shards                   (frozen base: the same; NF4 base: 0.516 B a weight, whole)
    grads        m * trained / shards             FSDP2 keeps sharded gradients in the parameter dtype
    optimizer    2 * m * trained / shards         AdamW's two moments
    gathered     unsharded units in compute dtype: two blocks (the one running and the one prefetched) and,
                 in backward, one block's unsharded gradients (c) and their fp32 reduce-scatter copy
    activations  per token and layer, what autograd saves for a Llama-family block with packed SDPA:
                   2 RMSNorms      2 x (4H fp32 input + cH normalised + cH scaled output); Qwen3's
                                   q/k norms the same on q and k
                   attention       c x (q H + k kv + v kv + output H + o_proj input H) + 4 x heads
                                   (log-sum-exp)
                   gated MLP       c x 4 I (gate, up, silu(gate), product)
                 x layers x T; with activation checkpointing only each block's input (cH) is kept, plus one
                 block recomputed in backward. Either way one more block's worth for the backward's gradients.
    loss head    the final norm (4H + 2cH per token), grad_hidden (cH per token), grad_weight in fp32 (4VH)
                 and, when c < 4, its cast (cVH), the bf16 product temporary (cVH) and one chunk's buffers
                 (chunk x V in fp32 and c); with untied embeddings also lm_head gathered (cVH).

Trade-offs: a formula, not a trace. It ignores allocator fragmentation and small buffers (a few %), counts
MoE experts as if every token visited each (an over-estimate), and is validated on the CPU
(benchmarks/bench_memory.py: predicted vs measured peak RSS, tiny and small Llama/Qwen shapes) and on paper
for 8B/70B; GPU measurements are for benchmarks/gpu_smoke.sh.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from minitrain.config import parse_target_modules
from minitrain.errors import UserError

if TYPE_CHECKING:
    from minitrain.config import TrainConfig

# NF4 with double quantization: 4 bits a weight + an 8-bit absmax per 64 weights + an fp32 scale per 256
# absmax blocks = 4 + 8/64 + 32/16384 bits = 0.516 bytes
NF4_BYTES_PER_WEIGHT = (4 + 8 / 64 + 32 / (64 * 256)) / 8
GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder that set its memory."""

    num_params: int
    vocab: int
    hidden: int
    layers: int
    intermediate: int  # per expert for MoE
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    experts: int = 1
    qk_norm: bool = False  # Qwen3 & co: RMSNorm on each head's q and k

    @property
    def block_params(self) -> int:
        """Parameters of one decoder block (its linears and two norms)."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return (self.num_params - embeddings - self.hidden) // self.layers

    def activation_bytes_per_token_layer(self, c: int) -> int:
        """Bytes autograd saves per token in one decoder block, compute dtype of `c` bytes."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        norms = 2 * (4 * h + 2 * c * h)
        attention = c * (2 * q + 2 * kv + h) + 4 * self.heads
        mlp = 4 * c * self.intermediate * self.experts
        if self.qk_norm:
            norms += (4 + 2 * c) * (q + kv)
        return norms + attention + mlp


@dataclass(frozen=True)
class RankPlan:
    """What one rank runs: its token budget, dtypes, sharding and what it trains."""

    tokens: int  # the largest minibatch on this rank (--max-tokens-per-gpu at most)
    shards: int  # ranks each parameter is sharded over (1 for NO_SHARD)
    master_bytes: int = 4  # 4 fp32, 2 bf16
    compute_bytes: int = 2  # 2 bf16 on GPU; the master dtype's on CPU
    checkpointing: bool = False
    trainable_params: int | None = None  # None: full fine-tuning; else the adapter's
    nf4_params: int = 0  # QLoRA: base weights in NF4, whole on every rank
    chunk_size: int = 1024  # the loss head's rows per chunk
    cpu_offload: bool = False  # sharded weights, grads and AdamW state in host memory instead


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per part at the predicted peak of a step, their sum on the accelerator, and when it happens."""

    parts: dict[str, int]  # weights, optimizer, grads, gathered, activations, loss_head (host_*: offloaded)
    total: int  # the accelerator's (or, on the CPU, the process's) bytes: host_* parts excluded
    peak_at: str  # "forward end" | "backward start" | "optimizer step"

    @property
    def total_gib(self) -> float:
        return self.total / GIB


def state_bytes(
    num_params: int,
    shards: int,
    master_bytes: int,
    *,
    trainable_params: int | None = None,
    nf4_params: int = 0,
) -> dict[str, int]:
    """Bytes per rank of what training holds between steps, by part.

    `trainable_params` None is full fine-tuning; else the base is frozen in the master dtype (no gradient, no
    AdamW state) and only the adapter trains. `nf4_params` of the base are NF4 weights held whole on every
    rank (QLoRA). Parts: trainable, frozen and nf4 weights, their sum `weights`, `grads` (sharded, trained
    weights only) and `optimizer` (AdamW's two moments).
    """
    trained = num_params if trainable_params is None else trainable_params
    frozen = 0 if trainable_params is None else num_params - nf4_params
    parts = {
        "trainable": trained * master_bytes // shards,
        "frozen": frozen * master_bytes // shards,
        "nf4": int(nf4_params * NF4_BYTES_PER_WEIGHT),  # replicated: never divided by the ranks
    }
    return {
        **parts,
        "weights": sum(parts.values()),
        "grads": parts["trainable"],
        "optimizer": 2 * parts["trainable"],
    }


def estimate_peak(shape: ModelShape, plan: RankPlan) -> MemoryEstimate:
    """Bytes per part at the peak of a step on one rank (see the module docstring), and their total.

    Three moments can be the peak; the largest is reported, its parts named:
      forward end     activations kept + the loss head's transient buffers (no gradient exists yet)
      backward start  activations kept + one block's backward working set + the head's gradient, gathered
                      blocks with their unsharded gradients (later in the backward, activations are freed
                      faster than sharded gradients are allocated)
      optimizer step  all sharded gradients, no activations
    With `cpu_offload` the sharded weights, gradients and optimizer state are host memory: reported under
    `host_*` and left out of `total` (the accelerator's memory).
    """
    m, c, t, s = plan.master_bytes, plan.compute_bytes, plan.tokens, plan.shards
    h, v = shape.hidden, shape.vocab
    full = plan.trainable_params is None
    state = state_bytes(
        shape.num_params, s, m, trainable_params=plan.trainable_params, nf4_params=plan.nf4_params
    )
    static = {"weights": state["weights"], "optimizer": state["optimizer"]}
    sharded_grads = state["grads"]
    copies = s > 1 or c != m  # FSDP2 gathers into separate buffers (a world of one in fp32 computes in place)
    block = shape.block_params
    per_layer = shape.activation_bytes_per_token_layer(c)
    if plan.checkpointing:
        kept = shape.layers * c * h * t  # each block's input
        recompute = per_layer * t  # one block's activations, rebuilt for its backward
    else:
        kept, recompute = shape.layers * per_layer * t, 0
    # backward working set: the gradients of the widest activations (the MLP's) and of the hidden stream
    working = 2 * c * (shape.intermediate * shape.experts + h) * t
    final = (4 * h + 2 * c * h) * t + c * h * t  # final norm + grad_hidden (the loss's saved gradient)
    grad_weight = 4 * v * h + (c * v * h if c < 4 else 0)  # fp32 sum, then its cast to the compute dtype
    chunk = min(plan.chunk_size, t) * v * (4 + (c if c < 4 else 0)) + (c * v * h if c < 4 else 0)
    head_gathered = c * v * h if (copies and not shape.tied) else 0
    head_grad = (m * v * h // s) if full else 0
    forward = {
        "gathered": 2 * c * block if copies else 0,
        "activations": kept,
        "loss_head": final + grad_weight + chunk + head_gathered,
    }
    backward = {
        "gathered": (2 * c * block if copies else 0) + ((c + 4) * block if full and copies else 0),
        "activations": kept + recompute + working,
        "loss_head": final + grad_weight + head_grad,
    }
    step = {"grads": sharded_grads}
    phases = {"forward end": forward, "backward start": backward, "optimizer step": step}
    if plan.cpu_offload:  # the sharded state lives in host memory: the accelerator's peak is elsewhere
        static = {f"host_{k}": v for k, v in static.items()}
        phases = {
            k: ({"host_grads": sharded_grads} if k == "optimizer step" else v) for k, v in phases.items()
        }

    def on_device(parts: dict[str, int]) -> int:
        return sum(v for k, v in parts.items() if not k.startswith("host_"))

    moment, peak = max(phases.items(), key=lambda kv: on_device({**static, **kv[1]}))
    parts = {**static, **peak}
    return MemoryEstimate(parts=parts, total=on_device(parts), peak_at=moment)


def fits(shape: ModelShape, plan: RankPlan, device_bytes: int, *, headroom: float = 0.9) -> bool:
    """True when the predicted peak stays within `headroom` of the device (CUDA context, fragmentation)."""
    return estimate_peak(shape, plan).total <= headroom * device_bytes


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def fit(
    shape: ModelShape, plan: RankPlan, device_bytes: int, *, min_tokens: int
) -> tuple[RankPlan, str | None]:
    """The plan to run on a GPU of `device_bytes`: `plan` itself when it fits; else with activation
    checkpointing on; else with the token budget halved (never below `min_tokens`, the longest sample, so no
    sample is dropped), with one line saying what changed. Raises `UserError` with the numbers and the flags
    that would fit when nothing does."""
    need = estimate_peak(shape, plan).total
    if fits(shape, plan, device_bytes):
        return plan, None
    said = f"the plan needs ~{_size(need)} per GPU of {_size(device_bytes)}"
    candidate = plan if plan.checkpointing else replace(plan, checkpointing=True)
    if fits(shape, candidate, device_bytes):
        got = _size(estimate_peak(shape, candidate).total)
        return candidate, f"minitrain: {said}; turning on --activation-checkpointing (~{got})"
    tokens = candidate.tokens
    while tokens // 2 >= max(min_tokens, 1):
        tokens //= 2
        lower = replace(candidate, tokens=tokens)
        if fits(shape, lower, device_bytes):
            got = _size(estimate_peak(shape, lower).total)
            turned = "" if plan.checkpointing else "turning on --activation-checkpointing and "
            return lower, (
                f"minitrain: {said}; {turned}lowering --max-tokens-per-gpu from {plan.tokens:,} "
                f"to {tokens:,} (~{got})"
            )
    options = []
    for tokens in dict.fromkeys((candidate.tokens, max(min_tokens, 1))):  # the budget asked, then the least
        for flags, change in (
            ("--cpu-offload", {"cpu_offload": True}),
            ("--master-dtype bf16", {"master_bytes": 2}),
            ("--cpu-offload --master-dtype bf16", {"cpu_offload": True, "master_bytes": 2}),
        ):
            alt = replace(candidate, tokens=tokens, **change)
            if fits(shape, alt, device_bytes) and not options:
                budget = "" if tokens == plan.tokens else f" --max-tokens-per-gpu {tokens}"
                got = _size(estimate_peak(shape, alt).total)
                options.append(f"--activation-checkpointing {flags}{budget} (~{got})")
    fix = f"it would fit with {options[0]}" if options else "add GPUs (--nproc, --nnodes) or use LoRA/QLoRA"
    floor = _size(estimate_peak(shape, replace(candidate, tokens=max(min_tokens, 1))).total)
    raise UserError(
        f"{said}, and still ~{floor} with --activation-checkpointing at the longest sample's "
        f"{min_tokens:,} tokens; {fix}"
    )


def fit_config_to_gpu(config: TrainConfig, device_bytes: int) -> tuple[TrainConfig, str | None]:
    """`fit` for a training config on GPUs of `device_bytes`: the config to run (activation checkpointing
    or the token budget changed) and the line saying so; unchanged with no line when the model's config is
    not readable locally (nothing to predict from)."""
    import dataclasses
    import json
    from pathlib import Path

    from minitrain.data.store import TokenStore

    config_file = Path(config.model_name_or_path).expanduser() / "config.json"
    if not config_file.is_file():
        return config, None
    model_config = json.loads(config_file.read_text())
    shape = model_shape(model_config)
    trainable = None
    if config.lora_rank is not None:
        trainable = lora_parameters(model_config, config.lora_rank, config.lora_target_modules)[0]
    lengths = TokenStore.open(config.data_path).lengths
    fitting = lengths[lengths <= config.max_tokens_per_gpu]
    shards = {"NO_SHARD": 1, "HYBRID_SHARD": config.nproc}.get(
        config.fsdp_sharding_strategy, config.world_size()
    )
    plan = RankPlan(
        tokens=config.max_tokens_per_gpu, shards=shards,
        master_bytes=4 if config.master_dtype == "fp32" else 2,
        compute_bytes=2, checkpointing=config.activation_checkpointing, trainable_params=trainable,
        nf4_params=block_linear_weights(model_config) if config.load_in_4bit else 0,
        cpu_offload=config.cpu_offload,
    )  # fmt: skip
    chosen, line = fit(shape, plan, device_bytes, min_tokens=int(fitting.max()) if fitting.size else 1)
    if chosen == plan:
        return config, None
    changed = dataclasses.replace(
        config, activation_checkpointing=chosen.checkpointing, max_tokens_per_gpu=chosen.tokens
    )
    return changed, line


# ------------------------------------------------------------------ model shapes from a config dict


def _text(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config (a multimodal config nests it under text_config)."""
    return config.get("text_config") or config


def num_experts(config: dict[str, Any]) -> int:
    text = _text(config)
    return int(text.get("num_local_experts") or text.get("num_experts") or 1)


def block_linears(config: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    """name -> (in_features, out_features, copies) of the linear layers of one Llama-family decoder block.

    Copies is the number of experts for the MLP projections of a mixture-of-experts config, else 1; an MoE
    block also has its router `gate` (hidden -> experts).
    """
    text = _text(config)
    h = int(text["hidden_size"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or h // heads)
    inter = int(text.get("intermediate_size") or 4 * h)
    experts = num_experts(config)
    if experts > 1:
        inter = int(text.get("moe_intermediate_size") or inter)
    layers = {
        "q_proj": (h, heads * head_dim, 1),
        "k_proj": (h, kv_heads * head_dim, 1),
        "v_proj": (h, kv_heads * head_dim, 1),
        "o_proj": (heads * head_dim, h, 1),
        "gate_proj": (h, inter, experts),
        "up_proj": (h, inter, experts),
        "down_proj": (inter, h, experts),
    }
    if experts > 1:
        layers["gate"] = (h, experts, 1)  # the router
    return layers


def block_linear_weights(config: dict[str, Any]) -> int:
    """Weights of every decoder block's linear layers: what QLoRA stores in NF4."""
    per_block = sum(i * o * copies for i, o, copies in block_linears(config).values())
    return int(_text(config)["num_hidden_layers"]) * per_block


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of a Llama-family decoder from its config.json (biases ignored)."""
    text = _text(config)
    h = int(text["hidden_size"])
    vocab = int(text["vocab_size"])
    norms = int(text["num_hidden_layers"]) * 2 * h + h  # two RMSNorms a block, one at the end
    embeddings = vocab * h * (1 if text.get("tie_word_embeddings", config.get("tie_word_embeddings")) else 2)
    return embeddings + block_linear_weights(config) + norms


def model_shape(config: dict[str, Any]) -> ModelShape:
    """The sizes of a Llama-family config.json that set memory (`minitrain.train.memory`)."""
    text = _text(config)
    h = int(text["hidden_size"])
    heads = int(text["num_attention_heads"])
    experts = num_experts(config)
    inter = int(text.get("intermediate_size") or 4 * h)
    if experts > 1:
        inter = int(text.get("moe_intermediate_size") or inter)
    return ModelShape(
        num_params=count_parameters(config),
        vocab=int(text["vocab_size"]),
        hidden=h,
        layers=int(text["num_hidden_layers"]),
        intermediate=inter,
        heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or h // heads),
        tied=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings"))),
        experts=experts,
        qk_norm=str(text.get("model_type", config.get("model_type", ""))).startswith("qwen3"),
    )


def lora_parameters(
    config: dict[str, Any], rank: int, target_modules: str
) -> tuple[int, list[str], list[str]]:
    """(adapter parameters, layer names targeted, names given that match no layer) of a rank-`rank` LoRA.

    LoRA adds A (rank x in) and B (out x rank) beside each targeted linear layer. `all-linear` targets every
    linear layer of the decoder blocks (not lm_head, not the embeddings); a list targets the layers named.
    """
    layers = block_linears(config)
    targets = parse_target_modules(target_modules)
    if targets == "all-linear":
        chosen, unknown = list(layers), []
    else:
        wanted = [name.rsplit(".", 1)[-1] for name in targets]
        chosen = [name for name in layers if name in wanted]
        unknown = [name for name in targets if name.rsplit(".", 1)[-1] not in layers]
    per_block = sum(rank * (layers[n][0] + layers[n][1]) * layers[n][2] for n in chosen)
    return int(_text(config)["num_hidden_layers"]) * per_block, chosen, unknown
