"""minitrain/train/export.py: a trained, FSDP2-sharded model exported and reloaded with stock HF tools.

In-process, world of one (gloo): load from a config, shard, take two optimizer steps, export; then
`AutoModelForCausalLM.from_pretrained` must reproduce the trained model's logits, and `AutoTokenizer`
must load the copied tokenizer. (The 2-rank gather is covered by tests/train/test_loop.py, whose 1- and
2-rank exports must hold the same weights.)
"""

from __future__ import annotations

import shutil
import socket

import pytest
import torch

from tests.conftest import SMOLLM2, needs_fixtures, tiny_llama_config
from tests.train.test_loop import write_tokenized


@pytest.fixture
def dist(monkeypatch):
    from minitrain.train.dist import close_distributed, init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    info = init_distributed()
    yield info
    close_distributed()


@needs_fixtures
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_export_round_trips_through_from_pretrained(tmp_path, dist, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minitrain.data.batch import collate
    from minitrain.data.store import TokenStore
    from minitrain.train.export import save_hf_checkpoint
    from minitrain.train.model import CausalLMWithLoss, load_model, shard_model
    from minitrain.train.optim import build_optimizer

    model_dir = tmp_path / "model"
    tiny_llama_config(vocab_size=256, tie_word_embeddings=tied).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SMOLLM2 / name, model_dir / name)
    store = TokenStore.open(write_tokenized(tmp_path / "data.jsonl", num=6, vocab=256, seed=1))
    torch.manual_seed(0)
    lm = load_model(model_dir, from_scratch=True, dtype=torch.float32, dist=dist)
    model = shard_model(
        CausalLMWithLoss(lm, use_liger=False),
        dist=dist,
        strategy="FULL_SHARD",
        mixed_precision=False,
        master_dtype=torch.float32,
        cpu_offload=False,
        activation_checkpointing=False,
    )
    optimizer = build_optimizer(model, learning_rate=1e-2, weight_decay=0.1, device=dist.device)
    for _ in range(2):
        model(collate(store, range(len(store)))).backward()
        optimizer.step()
        optimizer.zero_grad()

    path = save_hf_checkpoint(
        model, model.lm, output_dir=tmp_path / "out", samples=12, dist=dist, dtype=torch.float32,
        tokenizer_source=str(model_dir),
    )  # fmt: skip
    assert path == tmp_path / "out" / "hf_format" / "samples_12"
    assert [p.name for p in path.parent.iterdir()] == ["samples_12"]  # the temporary folder was renamed

    ids = torch.tensor([store.input_ids(i).tolist() for i in [0]])  # (1, T), one sample
    model.eval()
    model.unshard()  # FSDP2: gather the root's parameters so the HF model can run outside the root's forward
    with torch.no_grad():
        trained = model.lm(input_ids=ids, use_cache=False).logits
    model.reshard()
    loaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        reloaded = loaded(input_ids=ids).logits
    torch.manual_seed(0)  # the initial weights of the trained model
    fresh = AutoModelForCausalLM.from_config(
        tiny_llama_config(vocab_size=256), attn_implementation="sdpa"
    ).eval()
    with torch.no_grad():
        untrained = fresh(input_ids=ids).logits
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-5)
    assert (untrained - trained).abs().max() > 1e-2  # the comparison can fail: two steps moved the logits
    assert loaded.config.use_cache is True  # exported for inference
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tied
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(SMOLLM2).get_vocab()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_the_streamed_export_state_equals_gather_then_cast(dist, tied):
    from transformers import AutoModelForCausalLM

    from minitrain.train.export import gather_full_state_dict, gather_full_state_dict_as
    from minitrain.train.model import CausalLMWithLoss, shard_model

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_llama_config(tie_word_embeddings=tied))
    model = shard_model(
        CausalLMWithLoss(lm, use_liger=False), dist=dist, strategy="FULL_SHARD", mixed_precision=False,
        master_dtype=torch.float32, cpu_offload=False, activation_checkpointing=True,
    )  # fmt: skip
    want = {k: v.to(torch.bfloat16) for k, v in gather_full_state_dict(model).items()}
    got = gather_full_state_dict_as(model, torch.bfloat16)
    assert list(got) == list(want)  # the same names (no activation-checkpointing prefix), in the same order
    for k, v in want.items():
        assert got[k].dtype == torch.bfloat16 and got[k].device.type == "cpu" and torch.equal(got[k], v), k
    if tied:  # gathered once, kept under both names
        assert got["model.embed_tokens.weight"] is got["lm_head.weight"]


def test_merge_lora_host_memory_is_said_in_bytes_per_parameter():
    from minitrain.train.export import merge_host_bytes

    # 70B with fp32 master weights, bf16 export: 4 (gathered) + 4 (PEFT's CPU model) + 2 (cast) bytes each
    assert merge_host_bytes(70_000_000_000, torch.float32, torch.bfloat16) == 700_000_000_000
    assert merge_host_bytes(10, torch.bfloat16, torch.bfloat16) == 80
