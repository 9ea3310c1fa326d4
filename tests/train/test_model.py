"""CausalLMWithLoss, load_model and shard_model (one process) against per-sample runs of the plain HF
model."""

from __future__ import annotations

import copy
import json
import socket

import pytest
import torch
import torch.nn.functional as F

from minitrain.data.batch import PackedMinibatch
from minitrain.errors import UserError
from minitrain.train.attention import PACKED_ATTENTION, register_packed_attention
from minitrain.train.dist import DistInfo
from minitrain.train.model import CausalLMWithLoss, load_model, shard_model
from tests.conftest import tiny_llama_config, tiny_softcapped_config

CPU1 = DistInfo(
    rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), backend="gloo"
)


def make_samples(
    lengths: list[int], vocab: int = 512, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, aligned labels) per sample; the first ~third of each sample is a masked prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 3] = -100
        out.append((ids, labels))
    return out


def pack(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> PackedMinibatch:
    """The data contract built by hand: concatenated, labels shifted within each sample, positions
    restarting."""
    ids = torch.cat([s[0] for s in samples])[None]
    shifted = torch.cat([torch.cat([s[1][1:], torch.tensor([-100])]) for s in samples])[None]
    pos = torch.cat([torch.arange(len(s[0])) for s in samples])[None]
    lens = torch.tensor([len(s[0]) for s in samples])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    return PackedMinibatch(
        input_ids=ids,
        labels=shifted,
        position_ids=pos,
        cu_seqlens=cu,
        max_seqlen=int(lens.max()),
        num_samples=len(samples),
        num_tokens=int(lens.sum()),
        num_loss_tokens=int((shifted != -100).sum()),
    )


def reference_loss(lm, samples) -> torch.Tensor:
    """Each sample alone through the HF model, full logits, shifted CE, summed: the obviously-right loss."""
    total = torch.zeros(())
    for ids, labels in samples:
        logits = lm(input_ids=ids[None]).logits[0]  # (n, V)
        total = total + F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
    return total


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in module.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name.replace("_checkpoint_wrapped_module.", "").removeprefix("lm.")] = g.detach().clone()
    return out


def assert_same_loss_and_grads(loss, ref, got: dict, want: dict) -> None:
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def build_lm(attn: str = "sdpa", **overrides):
    from transformers import AutoModelForCausalLM

    if attn == PACKED_ATTENTION:
        register_packed_attention()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(**overrides), attn_implementation=attn)


@pytest.mark.parametrize("attn", ["sdpa", PACKED_ATTENTION])
@pytest.mark.parametrize("tied", [False, True])
def test_packed_loss_and_gradients_equal_per_sample_reference(attn: str, tied: bool) -> None:
    lm = build_lm(attn, tie_word_embeddings=tied)
    samples = make_samples([7, 3, 12, 5])
    batch = pack(samples)

    loss = CausalLMWithLoss(lm, use_liger=False, chunk_size=8)(batch)
    loss.backward()
    got = grads(lm)
    lm.zero_grad()
    ref = reference_loss(lm, samples)
    ref.backward()
    want = grads(lm)

    assert_same_loss_and_grads(loss, ref, got, want)


def test_dummy_batch_gives_zero_loss_and_zero_gradients() -> None:
    lm = build_lm(PACKED_ATTENTION)
    dummy = PackedMinibatch(
        input_ids=torch.zeros((1, 1), dtype=torch.int64),
        labels=torch.full((1, 1), -100),
        position_ids=torch.zeros((1, 1), dtype=torch.int64),
        cu_seqlens=torch.tensor([0, 1], dtype=torch.int32),
        max_seqlen=1,
        num_samples=0,
        num_tokens=0,
        num_loss_tokens=0,
    )
    loss = CausalLMWithLoss(lm, use_liger=False)(dummy)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(p.grad) == 0 for p in lm.parameters() if p.grad is not None)


def test_load_model_reads_a_saved_model_with_packed_attention(tmp_path) -> None:
    lm = build_lm()
    lm.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m", from_scratch=False, dtype=torch.float32, dist=CPU1)
    assert loaded.config.use_cache is False
    assert loaded.config._attn_implementation == PACKED_ATTENTION  # no flash-attn on this machine
    for (name, a), (_, b) in zip(lm.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    scratch = load_model(tmp_path / "m", from_scratch=True, dtype=torch.bfloat16, dist=CPU1)
    assert next(scratch.parameters()).dtype == torch.bfloat16


def test_load_model_builds_on_meta_on_other_ranks(tmp_path) -> None:
    build_lm().save_pretrained(tmp_path / "m")
    other = DistInfo(
        rank=1, local_rank=1, world_size=2, local_world_size=2, device=torch.device("cpu"), backend="gloo"
    )
    lm = load_model(tmp_path / "m", from_scratch=False, dtype=torch.float32, dist=other)
    assert all(p.is_meta for p in lm.parameters())


def test_load_model_user_errors(tmp_path) -> None:
    from transformers import ViTConfig

    with pytest.raises(UserError, match="no such folder"):
        load_model(tmp_path / "nope", from_scratch=False, dtype=torch.float32, dist=CPU1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="the folder has no config.json"):
        load_model(tmp_path / "empty", from_scratch=False, dtype=torch.float32, dist=CPU1)
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "vit")
    with pytest.raises(UserError, match="not a causal LM"):
        load_model(tmp_path / "vit", from_scratch=True, dtype=torch.float32, dist=CPU1)
    tiny_softcapped_config().save_pretrained(tmp_path / "gemma2")
    with pytest.raises(UserError, match="final_logit_softcapping"):
        load_model(tmp_path / "gemma2", from_scratch=True, dtype=torch.float32, dist=CPU1)
    tiny_llama_config().save_pretrained(tmp_path / "noweights")
    with pytest.raises(UserError, match="--from-scratch"):
        load_model(tmp_path / "noweights", from_scratch=False, dtype=torch.float32, dist=CPU1)


@pytest.fixture(scope="module")
def one_rank_group():
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    ("strategy", "ac", "tied"),
    [("FULL_SHARD", False, False), ("SHARD_GRAD_OP", True, True), ("NO_SHARD", False, True)],
)
def test_shard_model_one_rank_matches_unsharded(one_rank_group, strategy: str, ac: bool, tied: bool) -> None:
    lm = build_lm(PACKED_ATTENTION, tie_word_embeddings=tied)
    plain = copy.deepcopy(lm)
    samples = make_samples([9, 4, 11])
    batch = pack(samples)

    ref = CausalLMWithLoss(plain, use_liger=False, chunk_size=8)(batch)
    ref.backward()
    want = grads(plain)

    model = shard_model(
        CausalLMWithLoss(lm, use_liger=False, chunk_size=8),
        dist=CPU1,
        strategy=strategy,
        mixed_precision=True,  # ignored on the CPU: fp32 stays fp32
        master_dtype=torch.float32,
        cpu_offload=False,
        activation_checkpointing=ac,
    )
    loss = model(batch)
    loss.backward()
    got = grads(model)
    assert_same_loss_and_grads(loss, ref, got, want)
    # rotary buffers survived the trip through the meta device
    for (name, a), (_, b) in zip(plain.named_buffers(), lm.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_shard_model_rejects_unknown_strategy(one_rank_group) -> None:
    with pytest.raises(UserError, match="unknown FSDP sharding strategy"):
        shard_model(
            CausalLMWithLoss(build_lm(), use_liger=False),
            dist=CPU1,
            strategy="ZERO3",
            mixed_precision=False,
            master_dtype=torch.float32,
            cpu_offload=False,
            activation_checkpointing=False,
        )


def test_shard_model_bf16_master_keeps_fp32_buffers_and_offload_is_a_no_op_on_cpu(one_rank_group) -> None:
    lm = build_lm(PACKED_ATTENTION)
    batch = pack(make_samples([6, 9]))
    ref = CausalLMWithLoss(copy.deepcopy(lm), use_liger=False)(batch).item()
    model = shard_model(
        CausalLMWithLoss(lm, use_liger=False),
        dist=CPU1,
        strategy="FULL_SHARD",
        mixed_precision=False,
        master_dtype=torch.bfloat16,
        cpu_offload=True,  # host memory already: ignored on the CPU
        activation_checkpointing=False,
    )
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers())  # rotary inv_freq stays fp32
    loss = model(batch)
    loss.backward()
    assert loss.item() == pytest.approx(ref, rel=1e-2)


def test_lora_on_the_head_is_refused_and_lora_elsewhere_trains() -> None:
    from peft import LoraConfig, get_peft_model

    batch = pack(make_samples([5, 6]))
    ok = get_peft_model(build_lm(PACKED_ATTENTION), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ref = reference_loss(ok, make_samples([5, 6]))
    torch.testing.assert_close(CausalLMWithLoss(ok, use_liger=False)(batch), ref, rtol=1e-6, atol=1e-5)
    head = get_peft_model(build_lm(PACKED_ATTENTION), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(UserError, match="lm_head"):
        CausalLMWithLoss(head, use_liger=False)(batch)


def test_a_weights_error_without_a_message_is_still_a_user_error(tmp_path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    def fail(*_args, **_kwargs):
        raise OSError()  # no message: the first line of its text does not exist

    build_lm().save_pretrained(tmp_path / "m")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fail)
    with pytest.raises(UserError, match=r"cannot load weights from .* \(OSError\)"):
        load_model(tmp_path / "m", from_scratch=False, dtype=torch.float32, dist=CPU1)


def test_the_stored_dtype_is_read_from_the_safetensors_headers(tmp_path) -> None:
    from minitrain.train.model import load_dtype, stored_dtype

    lm = build_lm()
    lm.save_pretrained(tmp_path / "fp32")
    lm.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert stored_dtype(tmp_path / "fp32") == torch.float32
    assert stored_dtype(tmp_path / "bf16") == torch.bfloat16
    assert stored_dtype(tmp_path / "nowhere") is None
    assert stored_dtype(tmp_path) is None  # no weights in this folder
    fp32, bf16 = torch.float32, torch.bfloat16
    # fp32 master weights from a bf16 checkpoint: loaded in bf16 (widened per shard later, exactly)
    assert load_dtype(tmp_path / "bf16", fp32, from_scratch=False, adapters=False) == bf16
    assert load_dtype(tmp_path / "fp32", fp32, from_scratch=False, adapters=False) == fp32  # never narrowed
    assert load_dtype(tmp_path / "bf16", fp32, from_scratch=True, adapters=False) == fp32
    assert load_dtype(tmp_path / "bf16", fp32, from_scratch=False, adapters=True) == fp32
    assert load_dtype("org/model-on-the-hub", fp32, from_scratch=False, adapters=False) == fp32
    assert load_dtype(tmp_path / "fp32", bf16, from_scratch=False, adapters=False) == bf16


def test_a_bf16_checkpoint_becomes_exact_fp32_master_shards(one_rank_group, tmp_path, monkeypatch) -> None:
    # rank 0 holds the bf16 weights only (what it broadcasts); each shard is widened when it arrives
    import torch.distributed.checkpoint.state_dict as dcp_state

    sent: set[torch.dtype] = set()
    real = dcp_state.set_model_state_dict

    def spy(model, state, **kwargs):
        sent.update(v.dtype for v in state.values())
        return real(model, state, **kwargs)

    monkeypatch.setattr(dcp_state, "set_model_state_dict", spy)
    build_lm(PACKED_ATTENTION).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    lm = load_model(tmp_path / "bf16", from_scratch=False, dtype=torch.bfloat16, dist=CPU1)
    want = {k: v.float() for k, v in lm.state_dict().items()}
    model = shard_model(
        CausalLMWithLoss(lm, use_liger=False), dist=CPU1, strategy="FULL_SHARD", mixed_precision=False,
        master_dtype=torch.float32, cpu_offload=False, activation_checkpointing=False,
    )  # fmt: skip
    got = {k.removeprefix("lm."): v.full_tensor() for k, v in model.state_dict().items()}
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v), k
    assert all(b.dtype == torch.float32 for b in model.buffers())
    assert sent == {torch.bfloat16}  # no fp32 copy of the whole model on rank 0


def remote_code_model(folder):
    """A model folder that ships its own config and model classes (auto_map), as custom Hub models do."""
    tiny_llama_config(vocab_size=64).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="mini_custom",
        auto_map={
            "AutoConfig": "configuration_mini.MiniConfig",
            "AutoModelForCausalLM": "modeling_mini.MiniForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_mini.py").write_text(
        "from transformers import LlamaConfig\n\n\n"
        "class MiniConfig(LlamaConfig):\n    model_type = 'mini_custom'\n"
    )
    (folder / "modeling_mini.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_mini import MiniConfig\n\n\n"
        "class MiniForCausalLM(LlamaForCausalLM):\n    config_class = MiniConfig\n"
    )
    return folder


def test_trust_remote_code_runs_the_models_own_classes(tmp_path, monkeypatch):
    from minitrain.train.preflight import causal_lm_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = remote_code_model(tmp_path / "custom")
    with pytest.raises(UserError, match="ships its own model code; add --trust-remote-code") as err:
        causal_lm_config(folder)
    assert "\n" not in str(err.value)
    assert causal_lm_config(folder, trust_remote_code=True).model_type == "mini_custom"
    lm = load_model(folder, from_scratch=True, dtype=torch.float32, dist=CPU1, trust_remote_code=True)
    assert type(lm).__name__ == "MiniForCausalLM"
