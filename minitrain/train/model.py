"""The model side of training: load a causal LM, wrap it with its loss, shard it with FSDP2.

Owns `load_model` (config checks, attention choice, rank 0 loads / other ranks build on meta),
`CausalLMWithLoss` (the root FSDP2 unit: decoder -> final hidden states -> chunked or Liger loss) and
`shard_model` (FSDP2 `fully_shard` per decoder block, embedding and lm_head, then the root, strategy mapping,
mixed precision, CPU offload, activation checkpointing, and the broadcast of rank 0's weights into every
rank's shards).

Trade-offs:
- The loss head takes the decoder's final hidden states and the lm_head weight directly, so full logits are
  never built; models whose head is not a plain `hidden @ W.T` (an lm_head bias, logit scaling or
  soft-capping) are refused at load time instead of being trained with a silently different loss.
- The wrapper, not the HF model, is the FSDP2 root. Untied embedding and lm_head are FSDP2 units of their own
  (gathered only while used, so the vocabulary-sized weights are not held whole for the whole forward and
  their collectives overlap with the blocks'); the loss reads lm_head's weight through a method registered
  as an FSDP2 forward (`HEAD_LOSS_METHOD`). Tied ones are one tensor and stay in the root unit. Calling
  `lm.lm_head` from outside the forward would see sharded DTensors.
- Weights travel once: only rank 0 reads the checkpoint (into CPU memory); every rank (rank 0 included) moves
  its model to the meta device, shards it, allocates only its shards and receives them by broadcast. Host RAM
  holds one full copy per node-0 process, not one per rank, and no GPU ever holds the full model.
- QLoRA is the exception: every rank loads and quantizes the base itself onto its device and keeps the 4-bit
  weights whole (FSDP2 ignores them); bitsandbytes' packed weights and their quantization state do not
  survive the meta-device round trip, and a replicated 4-bit base is 0.52 bytes per parameter.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from minitrain.config import SHARDING_STRATEGIES
from minitrain.data.batch import PackedMinibatch
from minitrain.data.tokenizer import resolve_model_path
from minitrain.errors import UserError, first_line
from minitrain.train.attention import choose_attention, packed_attention_kwargs
from minitrain.train.dist import DistInfo
from minitrain.train.loss import linear_cross_entropy_sum, weighted_head_loss
from minitrain.train.preflight import causal_lm_config

# the method FSDP2 runs as a forward of the lm_head unit (see shard_model): the loss reads the weight directly
HEAD_LOSS_METHOD = "minitrain_loss_sum"


class CausalLMWithLoss(nn.Module):
    """Root FSDP2 unit: runs the decoder on a packed minibatch and returns the SUM of token CE."""

    def __init__(self, lm: PreTrainedModel, *, use_liger: bool, chunk_size: int = 1024) -> None:
        super().__init__()
        self.lm = lm
        self.use_liger = use_liger
        self.chunk_size = chunk_size
        # where inputs go: the parameters' device now; shard_model sets the compute device (CPU offload keeps
        # the parameters on the CPU while computing on the GPU)
        self.compute_device = next(lm.parameters()).device
        self.hsdp = False  # set by shard_model on a 2-D (replicate, shard) mesh

    def _head(self) -> nn.Module:
        head = self.lm.get_output_embeddings()
        if hasattr(head, "base_layer"):  # a PEFT wrapper: its adapter would be silently left out of the loss
            raise UserError(
                "an adapter on lm_head is not supported by minitrain's loss; leave lm_head out of the targets"
            )
        return head

    def forward(
        self, batch: PackedMinibatch, weigh: Callable[[Tensor, Tensor], Tensor] | None = None
    ) -> Tensor:
        """SUM of token CE; with `weigh` (preference objectives), sum of w_t * CE_t (`weighted_head_loss`)."""
        batch = batch.to(self.compute_device)
        attn = self.lm.config._attn_implementation
        out = self.lm.get_decoder()(
            input_ids=batch.input_ids,  # (1, T)
            position_ids=batch.position_ids,  # (1, T), restarting per sample
            use_cache=False,
            **packed_attention_kwargs(batch.cu_seqlens, batch.max_seqlen, attn),
        )
        hidden = out.last_hidden_state  # (1, T, H), after the final norm
        head = self._head()
        if hasattr(head, HEAD_LOSS_METHOD):  # lm_head is its own FSDP unit: gathered for this call only
            return getattr(head, HEAD_LOSS_METHOD)(hidden, batch.labels, weigh)
        return self.head_loss(
            head, hidden, batch.labels, weigh
        )  # the weight is the embedding itself when tied

    def head_loss(
        self, head: nn.Module, hidden: Tensor, labels: Tensor, weigh: Callable | None = None
    ) -> Tensor:
        """SUM of token CE of hidden (1, T, H) @ head.weight (V, H).T against labels (1, T) (weighted:
        `weigh`).

        The weighted path is always the chunked one (Liger has no per-token weights)."""
        if weigh is not None:
            return weighted_head_loss(hidden, head.weight, labels, weigh, self.chunk_size)
        return linear_cross_entropy_sum(
            hidden, head.weight, labels, use_liger=self.use_liger, chunk_size=self.chunk_size
        )

    def prepare_backward(self, *, last_minibatch: bool) -> None:
        """Before each minibatch's backward: with HSDP (HYBRID_SHARD, NO_SHARD) gradients are reduce-scattered
        within the shard group every time but all-reduced across replicas only after the step's last one."""
        if self.hsdp:
            self.set_requires_all_reduce(last_minibatch)


def load_model(
    model_name_or_path: str | Path,
    *,
    from_scratch: bool,
    dtype: torch.dtype,
    dist: DistInfo,
    quantization=None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Build the HF causal LM for packed training, on the CPU (rank 0) or the meta device (other ranks).

    use_cache is off; the attention implementation is `choose_attention(dist.device)`. Rank 0 reads the
    weights (or initialises them from the config with `from_scratch`); `shard_model` then broadcasts them.
    With `quantization` (QLoRA: a transformers `BitsAndBytesConfig`), every rank reads the weights itself,
    straight onto its own device, where bitsandbytes quantises the linear layers; modules it leaves alone
    (embeddings, norms, lm_head) are in `dtype`.
    """
    from transformers import AutoModelForCausalLM

    config = causal_lm_config(model_name_or_path, trust_remote_code=trust_remote_code)
    config.use_cache = False
    remote = {"trust_remote_code": trust_remote_code}  # --trust-remote-code: the repository's own classes
    attn = choose_attention(
        dist.device, warn=lambda line: print(line, file=sys.stderr, flush=True) if dist.is_main else None
    )
    if quantization is None and not dist.is_main:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype, **remote)
    elif from_scratch:
        lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype, **remote)
    else:
        extra = (
            {}
            if quantization is None
            else {"quantization_config": quantization, "device_map": {"": str(dist.device)}}
        )
        source = resolve_model_path(model_name_or_path)  # a folder, or a cached Hub id's snapshot
        try:
            lm = AutoModelForCausalLM.from_pretrained(
                source, config=config, attn_implementation=attn, dtype=dtype, **extra, **remote
            )
        except OSError as e:
            first = first_line(e)
            raise UserError(
                f"cannot load weights from {model_name_or_path} ({first}); "
                "use --from-scratch to start from the config"
            ) from e
    head = lm.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise UserError(f"{model_name_or_path} has no plain bias-free lm_head, which minitrain's loss needs")
    lm.config.use_cache = False
    return lm


def stored_dtype(model_dir: Path) -> torch.dtype | None:
    """The one floating dtype of every tensor in `model_dir`'s safetensors files (read from their headers),
    None when they differ, there are none, or `model_dir` is not a local folder."""
    import json
    import struct

    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    found: set[str] = set()
    files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    for file in files:
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        found |= {
            v["dtype"]
            for k, v in header.items()
            if k != "__metadata__" and v["dtype"].startswith(("F", "BF"))
        }
    return names.get(found.pop()) if len(found) == 1 else None


def load_dtype(
    model_name_or_path: str | Path, master_dtype: torch.dtype, *, from_scratch: bool, adapters: bool
) -> torch.dtype:
    """The dtype rank 0 loads the weights in: the checkpoint's own 16-bit dtype when the master weights are
    fp32 (widened per shard after sharding, exactly), so rank 0's host never holds an fp32 copy of a bf16
    checkpoint (280 GB for 70B); else `master_dtype`. Not for from-scratch weights (drawn in fp32) nor adapter
    runs (PEFT initialises the new adapter in the base's dtype: bf16 would round its random init)."""
    if from_scratch or adapters or master_dtype != torch.float32:
        return master_dtype
    stored = stored_dtype(Path(model_name_or_path))
    return stored if stored in (torch.bfloat16, torch.float16) else master_dtype


def decoder_blocks(lm: PreTrainedModel) -> nn.ModuleList:
    """The repeated decoder blocks (one FSDP2 unit and one activation-checkpointing unit each)."""
    layers = getattr(lm.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(
            f"cannot find the decoder layers of {type(lm).__name__}; minitrain supports HF decoder models"
        )
    return layers


def _mesh(dist: DistInfo, strategy: str):
    from torch.distributed.device_mesh import init_device_mesh

    kind = dist.device.type
    if strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):
        return init_device_mesh(kind, (dist.world_size,), mesh_dim_names=("shard",))
    if strategy == "NO_SHARD":  # HSDP with shards of one rank: every rank holds everything, grads all-reduced
        return init_device_mesh(kind, (dist.world_size, 1), mesh_dim_names=("replicate", "shard"))
    if strategy == "HYBRID_SHARD":  # shard within a node, replicate across nodes
        if dist.local_world_size is None:
            raise UserError(
                "HYBRID_SHARD needs the processes per node, which SLURM did not say (no "
                "SLURM_STEP_TASKS_PER_NODE/SLURM_TASKS_PER_NODE, or uneven nodes); run srun with "
                "--ntasks-per-node, or use FULL_SHARD"
            )
        if dist.world_size % dist.local_world_size:
            raise UserError(
                f"HYBRID_SHARD needs the same number of processes per node ({dist.world_size} over "
                f"{dist.local_world_size} per node); use FULL_SHARD"
            )
        shape = (dist.world_size // dist.local_world_size, dist.local_world_size)
        return init_device_mesh(kind, shape, mesh_dim_names=("replicate", "shard"))
    raise UserError(
        f"unknown FSDP sharding strategy {strategy!r}; pick one of {', '.join(SHARDING_STRATEGIES)}"
    )


def _shard_head(model: CausalLMWithLoss, head: nn.Module, kwargs: dict) -> None:
    """lm_head as its own FSDP2 unit whose "forward" is the loss: the loss reads `head.weight` directly, so
    `register_fsdp_forward_method` makes that call gather the weight (and hook the backward's reduce-scatter)
    as `head(x)` would. It stays gathered from its forward to its backward, which follows at once."""
    import types

    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    def loss_sum(self: nn.Module, hidden: Tensor, labels: Tensor, weigh=None) -> Tensor:
        return model.head_loss(self, hidden, labels, weigh)

    setattr(head, HEAD_LOSS_METHOD, types.MethodType(loss_sum, head))
    fully_shard(head, reshard_after_forward=False, **kwargs)
    register_fsdp_forward_method(head, HEAD_LOSS_METHOD)


def shard_model(
    model: CausalLMWithLoss,
    *,
    dist: DistInfo,
    strategy: str,
    mixed_precision: bool,
    master_dtype: torch.dtype,
    cpu_offload: bool,
    activation_checkpointing: bool,
    replicated: set[nn.Parameter] | None = None,
) -> CausalLMWithLoss:
    """FSDP2: `fully_shard` per decoder block (and untied embedding / lm_head), then the root; rank 0's
    weights end up in every rank's shards.

    Needs an initialised process group (also for a world of one). strategy: FULL_SHARD (reshard after
    forward), SHARD_GRAD_OP (keep gathered until backward), NO_SHARD (2-D mesh world x 1: replicated, grads
    all-reduced), HYBRID_SHARD (2-D mesh nodes x local ranks). Mixed precision (bf16 compute, fp32 reduce)
    and CPU offload apply on CUDA only; on the CPU everything stays in `master_dtype`, in host memory.

    `replicated` (QLoRA: the 4-bit base's parameters) are frozen parameters that every rank already holds
    whole on its device (`load_model(quantization=...)`); FSDP2 ignores them (`ignored_params`) and shards the
    rest in place. The new adapter's random initialisation is then broadcast from rank 0, so every rank
    starts from the same weights whatever its random state.
    """
    import torch.distributed as torch_dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = _mesh(dist, strategy)
    lm = model.lm

    def to_master_dtype() -> None:  # parameters only: buffers such as rotary inv_freq keep their fp32
        for p in lm.parameters():
            if not replicated or p not in replicated:  # packed 4-bit weights keep their storage dtype
                p.data = p.data.to(master_dtype)

    if replicated:  # every rank holds the whole model already; only the adapter's random init must agree
        to_master_dtype()
        if dist.world_size > 1:
            for p in lm.parameters():
                if p.requires_grad:
                    torch_dist.broadcast(p.data, src=0)
    else:  # 1. keep rank 0's weights and buffers on the CPU, then free every rank's full model (meta is free)
        # in the dtype they were loaded in (`load_dtype`: bf16 from a bf16 checkpoint even for fp32 master
        # weights); each rank widens only its own shards when they arrive (step 4), exactly
        full_state = {k: v.cpu() for k, v in model.state_dict().items()} if dist.is_main else {}
        buffers = {name: b.detach().cpu() for name, b in model.named_buffers()} if dist.is_main else {}
        model.to("meta")
        lm.tie_weights()  # moving devices replaces Parameters one module at a time, which unties tied weights
        to_master_dtype()  # on meta: free

    # 2. activation checkpointing wraps each block before sharding (state-dict names are unchanged)
    blocks = decoder_blocks(lm)
    if activation_checkpointing:
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)

    # 3. shard: each block is one unit (gathered for its forward/backward only), the root holds the rest
    kwargs: dict = {"mesh": mesh, "ignored_params": replicated or None}
    if mixed_precision and dist.device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = cpu_offload and dist.device.type == "cuda"  # on the CPU the parameters already live in host RAM
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    reshard = strategy != "SHARD_GRAD_OP"
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    embedding, head = lm.get_input_embeddings(), model._head()
    if head.weight is not embedding.weight:  # untied: each its own unit, gathered only while it is used
        fully_shard(embedding, reshard_after_forward=reshard, **kwargs)
        _shard_head(model, head, kwargs)
    fully_shard(model, reshard_after_forward=reshard, **kwargs)
    model.hsdp = mesh.ndim == 2
    model.compute_device = dist.device
    if replicated:
        return model

    # 4. allocate the shards and receive rank 0's weights; buffers (rotary inv_freq, not in the state dict
    #    when non-persistent) are plain replicated tensors: rank 0's copy is broadcast to all
    model.to_empty(device="cpu" if offload else dist.device)
    set_model_state_dict(
        model,
        full_state,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True),
    )
    for name, buf in model.named_buffers():
        module_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(module_name)
        saved = buffers.get(name.replace("_checkpoint_wrapped_module.", ""))
        value = saved.to(dist.device) if dist.is_main else torch.empty_like(buf, device=dist.device)
        if dist.world_size > 1:
            torch_dist.broadcast(value, src=0)
        owner._buffers[attr] = value
    return model
