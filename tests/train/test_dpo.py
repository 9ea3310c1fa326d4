"""minitrain/train/dpo.py against the obviously-right computation, then through the real CLI.

In process (one rank, no sharding): each side of each pair run ALONE through the HF model with full logits,
log-probs of its trained tokens summed, the textbook formula of each objective written out here, the mean
over pairs, autograd. `preference_step` on packed minibatches (a small token budget: several per step) must
give the same loss, rewards and gradients to 1e-5, for every loss type.

Through `minitrain train --objective dpo` (torchrun, gloo, CPU, fp32): step 1 with the reference equal to
the policy is exactly ln 2 with zero rewards; `--nproc 1`, `--nproc 2` and a small token budget give the
same per-step losses; a few steps move the margins up; a resumed run reads the cached reference.
"""

from __future__ import annotations

import functools
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel

from minitrain.config import LoraSettings
from minitrain.data.batch import collate
from minitrain.data.store import TokenStore
from minitrain.train import dpo as dpo_module
from minitrain.train.adapters import (
    CPU_QLORA_ENV,
    add_adapters,
    base_adapter_names,
    reference_adapters,
    save_adapter,
)
from minitrain.train.dpo import (
    PreferenceObjective,
    adapter_reference,
    cached_reference,
    load_or_compute_reference,
    preference_step,
    reference_key,
    reference_logps,
    sequence_logps,
    sides,
)
from minitrain.train.evaluate import evaluate_pairs, plan_pair_eval
from minitrain.train.model import CausalLMWithLoss
from tests.conftest import outside_any_launch, run_minitrain, tiny_llama_config
from tests.train.test_adapters import randomize_new_adapter
from tests.train.test_model import CPU1, build_lm, grads

VOCAB = 128
NUM_PAIRS = 8


def write_pairs(path: Path, *, num: int, vocab: int, seed: int, sidecar: bool = True) -> Path:
    """A tokenized preference file (the `tokenize` format): a shared masked prompt, two trained responses."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        for line in range(1, num + 1):
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(2, 10))]

            def side(prompt: list[int] = prompt) -> dict:
                response = [rng.randrange(vocab) for _ in range(rng.randint(2, 14))]
                ids = prompt + response
                return {
                    "input_ids": ids, "labels": [-100] * len(prompt) + response, "len": len(ids),
                    "num_loss_counted_tokens": len(response),
                }  # fmt: skip

            pair = {"chosen": side(), "rejected": side(), "prompt_len": len(prompt), "source_line": line}
            f.write(orjson.dumps(pair) + b"\n")
    if sidecar:
        meta = {"format": "minitrain.tokenized", "format_version": 1, "kind": "preference"}
        path.with_name(path.stem + ".meta.json").write_bytes(orjson.dumps(meta))
    return path


def _seq_logp(lm, store: TokenStore, sample: int) -> torch.Tensor:
    """Sum of log p of the trained tokens of one sequence, run alone with full logits."""
    ids = torch.from_numpy(store.input_ids(sample).astype(np.int64))
    labels = torch.from_numpy(store.labels(sample).astype(np.int64))
    logits = lm(input_ids=ids[None]).logits[0].float()  # (n, V)
    logp = torch.log_softmax(logits[:-1], dim=-1)
    target = labels[1:]
    keep = target != -100
    return logp[keep].gather(1, target[keep][:, None]).sum().double()


def _textbook(kind: str, pc, pr, rc, rr, nc, nr, beta, gamma, sft_weight):
    """(loss, reward chosen, reward rejected) of one pair, as the papers write them."""
    if kind in ("simpo", "orpo"):
        ac, ar = pc / nc, pr / nr
        rewards = (beta * ac, beta * ar)
        if kind == "simpo":
            return -F.logsigmoid(beta * (ac - ar) - gamma), *rewards
        odds_c = ac - torch.log1p(-torch.exp(ac))  # log(p / (1 - p)) with p the mean-token probability
        odds_r = ar - torch.log1p(-torch.exp(ar))
        return -ac - beta * F.logsigmoid(odds_c - odds_r), *rewards
    logits = beta * ((pc - rc) - (pr - rr))
    if kind == "sigmoid":
        loss = -F.logsigmoid(logits)
    elif kind == "hinge":
        loss = torch.relu(1 - logits)
    else:  # ipo: per-token averages
        loss = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    return loss + sft_weight * (-pc / nc), beta * (pc - rc), beta * (pr - rr)


@pytest.fixture(scope="module")
def pairs_store(tmp_path_factory) -> TokenStore:
    path = write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", num=NUM_PAIRS, vocab=VOCAB, seed=5)
    return TokenStore.open(path, "dpo")


def test_the_store_flattens_pair_i_into_samples_2i_and_2i_plus_1(pairs_store, tmp_path):
    pairs = [orjson.loads(line) for line in pairs_store.path.read_bytes().splitlines()]
    assert len(pairs_store) == 2 * NUM_PAIRS and pairs_store.num_pairs == NUM_PAIRS
    for i, pair in enumerate(pairs):
        assert pairs_store.input_ids(2 * i).tolist() == pair["chosen"]["input_ids"]
        assert pairs_store.labels(2 * i + 1).tolist() == pair["rejected"]["labels"]
        assert pairs_store.pair_lengths[i] == pair["chosen"]["len"] + pair["rejected"]["len"]
        assert pairs_store.source_lines[2 * i] == pairs_store.source_lines[2 * i + 1] == i + 1


def test_packed_reference_log_probs_equal_each_sequence_alone(pairs_store):
    lm = build_lm(vocab_size=VOCAB)
    model = CausalLMWithLoss(lm, use_liger=False, chunk_size=5)
    got = reference_logps(model, pairs_store, dist=CPU1, max_tokens_per_gpu=50, pairs_per_plan=3)
    with torch.no_grad():
        want = [_seq_logp(lm, pairs_store, s).item() for s in range(len(pairs_store))]
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize(
    ("kind", "sft_weight"),
    [("sigmoid", 0.0), ("sigmoid", 0.5), ("ipo", 0.0), ("hinge", 0.0), ("simpo", 0.0), ("orpo", 0.0)],
)
def test_step_loss_rewards_and_gradients_equal_the_textbook_computation(pairs_store, kind, sft_weight):
    lm = build_lm(vocab_size=VOCAB)
    model = CausalLMWithLoss(lm, use_liger=False, chunk_size=5)
    # a reference that is not the policy (else every log-ratio is 0): the policy's sums, shifted per side
    shift = np.random.default_rng(0).uniform(-3, 3, size=len(pairs_store))
    reference = (
        reference_logps(model, pairs_store, dist=CPU1, max_tokens_per_gpu=4096, pairs_per_plan=8) + shift
    )
    objective = PreferenceObjective(loss=kind, beta=0.3, simpo_gamma=0.4, sft_weight=sft_weight)
    pairs = [5, 0, 3, 7, 1, 2]
    ref = None if kind in ("simpo", "orpo") else cached_reference(reference)
    budget = int(pairs_store.pair_lengths.max())  # every pair fits, a few per minibatch
    result = preference_step(
        model, pairs_store, pairs, objective=objective, reference=ref, dist=CPU1, max_tokens_per_gpu=budget
    )
    assert result.minibatches > 1  # the small budget really split the batch
    got = grads(lm)
    lm.zero_grad()

    losses, rewards_c, rewards_r = [], [], []
    for p in pairs:
        c, r = 2 * p, 2 * p + 1
        terms = _textbook(
            kind, _seq_logp(lm, pairs_store, c), _seq_logp(lm, pairs_store, r),
            torch.tensor(reference[c]), torch.tensor(reference[r]),
            int(pairs_store.num_trained[c]), int(pairs_store.num_trained[r]), 0.3, 0.4, sft_weight,
        )  # fmt: skip
        losses.append(terms[0])
        rewards_c.append(terms[1].detach())
        rewards_r.append(terms[2].detach())
    want_loss = torch.stack(losses).mean()
    want_loss.backward()
    want = grads(lm)

    assert result.loss == pytest.approx(want_loss.item(), rel=1e-5)
    assert result.metrics["rewards/chosen"] == pytest.approx(torch.stack(rewards_c).mean().item(), rel=1e-5)
    assert result.metrics["rewards/rejected"] == pytest.approx(torch.stack(rewards_r).mean().item(), rel=1e-5)
    accuracy = np.mean([float(a > b) for a, b in zip(rewards_c, rewards_r, strict=True)])
    assert result.metrics["rewards/accuracies"] == pytest.approx(accuracy)
    assert result.units == len(pairs)
    assert result.loss_tokens == int(
        pairs_store.num_trained[[s for p in pairs for s in (2 * p, 2 * p + 1)]].sum()
    )
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().max() > 0 for g in want.values())  # a real gradient was compared


def save_sft_adapter(path: Path) -> Path:
    """A LoRA adapter with real (non-zero) weights on the tiny base: an SFT adapter to stack a DPO one on."""
    settings = LoraSettings(rank=4, target_modules=("q_proj", "v_proj", "down_proj"))
    model = add_adapters(build_lm(vocab_size=VOCAB), settings)
    randomize_new_adapter(model, seed=1)
    save_adapter(model, model.state_dict(), path, settings)
    return path


def test_the_reference_cache_is_recomputed_when_anything_it_depends_on_changes(
    pairs_store, tmp_path, monkeypatch
):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return np.full(2 * pairs_store.num_pairs, float(len(calls)))  # which computation a value came from

    monkeypatch.setattr(dpo_module, "reference_logps", counted)
    model_dir = tmp_path / "model"
    tiny_llama_config(vocab_size=VOCAB).save_pretrained(model_dir)
    adapter = save_sft_adapter(tmp_path / "sft")
    base = dict(
        data_path=pairs_store.path, model_name_or_path=str(model_dir), from_scratch=False, seed=0,
        master_dtype="fp32", base_adapters=(), max_tokens_per_gpu=4096, truncate=False,
    )  # fmt: skip

    def reference(**changes) -> float:
        key = reference_key(**{**base, **changes})
        values = load_or_compute_reference(
            None, pairs_store, output_dir=tmp_path / "run", key=key, dist=CPU1, max_tokens_per_gpu=4096,
            pairs_per_plan=4,
        )  # fmt: skip
        return float(values[0])

    assert reference() == 1 and reference() == 1  # computed once, then read
    assert reference(base_adapters=(adapter,)) == 2  # a frozen base adapter under the model: recomputed
    assert reference(base_adapters=(adapter,)) == 2
    save_sft_adapter(adapter)  # the same folder, new weights (a new file)
    assert reference(base_adapters=(adapter,)) == 3
    assert reference(max_tokens_per_gpu=64) == 4  # another budget: other pairs skipped, other cuts
    assert reference(truncate=True) == 5
    assert reference(master_dtype="bf16") == 6
    assert reference(seed=1, from_scratch=True) == 7
    (model_dir / "config.json").write_text((model_dir / "config.json").read_text() + " ")  # model edited
    assert reference() == 8
    assert reference() == 8 and len(calls) == 8


@pytest.mark.parametrize("stacked", [False, True], ids=["lora", "stacked"])
def test_the_adapter_reference_is_the_model_without_the_new_adapter(pairs_store, tmp_path, stacked):
    base = (save_sft_adapter(tmp_path / "sft"),) if stacked else ()
    peft = add_adapters(build_lm(vocab_size=VOCAB), LoraSettings(rank=4, base_adapters=base))
    randomize_new_adapter(peft, seed=2)  # a trained DPO adapter: the policy is not its reference
    flags = {name: p.requires_grad for name, p in peft.named_parameters()}
    model = CausalLMWithLoss(peft, use_liger=False, chunk_size=5)
    switch = functools.partial(reference_adapters, peft, base_adapter_names(len(base)))
    samples = sides([0, 3, 5])  # three pairs packed into one minibatch
    batch = collate(pairs_store, samples)
    got = adapter_reference(model, switch)(samples, batch)

    # obviously right: a fresh base model (plus the SFT adapter, loaded by PEFT itself), each side alone
    lm = build_lm(vocab_size=VOCAB)
    reference = PeftModel.from_pretrained(lm, str(base[0])) if stacked else lm
    with torch.no_grad():
        want = [_seq_logp(reference, pairs_store, s).item() for s in samples]
        policy = [_seq_logp(peft, pairs_store, s).item() for s in samples]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    # afterwards the new adapter is on again and only it trains
    assert {name: p.requires_grad for name, p in peft.named_parameters()} == flags
    np.testing.assert_allclose(sequence_logps(model, batch, len(samples))[0].numpy(), policy, rtol=1e-6)
    assert np.abs(np.subtract(policy, want)).max() > 1e-3  # the new adapter matters: the test can fail


def _direct_eval(policy, reference, store: TokenStore, pairs: list[int], kind: str, beta: float) -> dict:
    """The eval metrics written out: each side alone, the textbook formula, plain means over `pairs`."""
    rows = []
    with torch.no_grad():
        for p in pairs:
            c, r = 2 * p, 2 * p + 1
            pc, pr = _seq_logp(policy, store, c), _seq_logp(policy, store, r)
            rc, rr = reference(c), reference(r)
            nc, nr = int(store.num_trained[c]), int(store.num_trained[r])
            loss, wc, wr = (t.item() for t in _textbook(kind, pc, pr, rc, rr, nc, nr, beta, 0.5, 0.0))
            rows.append([loss, wc, wr, float(wc > wr), wc - wr, pc.item(), pr.item()])
    names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]
    names += ["logps/chosen", "logps/rejected"]
    return {f"eval_{n}": v for n, v in zip(names, np.mean(rows, axis=0), strict=True)}


@pytest.mark.parametrize("kind", ["sigmoid", "simpo"])
def test_eval_on_pairs_equals_the_direct_computation(pairs_store, kind):
    lm = build_lm(vocab_size=VOCAB)
    model = CausalLMWithLoss(lm, use_liger=False, chunk_size=5)
    shift = np.random.default_rng(1).uniform(-3, 3, size=len(pairs_store))
    values = reference_logps(model, pairs_store, dist=CPU1, max_tokens_per_gpu=4096, pairs_per_plan=8) + shift
    longest = int(np.argmax(pairs_store.pair_lengths))
    budget = int(np.sort(pairs_store.pair_lengths)[-2])  # the longest pair does not fit: skipped, counted
    assert pairs_store.pair_lengths[longest] > budget
    plan = plan_pair_eval(pairs_store, max_tokens_per_gpu=budget, world_size=1)
    assert len(plan.plan) > 1 and plan.skipped == 1 and plan.pairs == NUM_PAIRS - 1
    reference = None if kind == "simpo" else cached_reference(values)
    objective = PreferenceObjective(loss=kind, beta=0.3)
    got = evaluate_pairs(model, plan, objective=objective, reference=reference, dist=CPU1)
    pairs = [p for p in range(NUM_PAIRS) if p != longest]
    want = _direct_eval(lm, lambda s: torch.tensor(values[s]), pairs_store, pairs, kind, 0.3)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key  # fp32 token log-probs
    assert 0 < want["eval_rewards/accuracies"] < 1  # the numbers compared are not trivial


# ----------------------------------------------------------------------------------- through the CLI

STEPS = 6


def _args(data: Path, model: Path, out: Path, budget: int) -> list[str]:
    return [
        "train", "--data-path", str(data), "--model-name-or-path", str(model), "--output-dir", str(out),
        "--from-scratch", "--batch-size", "4", "--max-tokens-per-gpu", str(budget),
        "--max-steps", str(STEPS), "--learning-rate", "1e-2", "--num-warmup-steps", "0", "--seed", "7",
        "--objective", "dpo", "--min-samples-per-checkpoint", "12",
    ]  # fmt: skip


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    assert cmd[:3] == [sys.executable, "-m", "minitrain"], cmd
    done = run_minitrain(
        cmd[3:], cwd=cwd, env=outside_any_launch()
    )  # in this process; --nproc 1 trains here, no torchrun
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dpo_runs")
    data = write_pairs(root / "pairs.jsonl", num=NUM_PAIRS, vocab=VOCAB, seed=11)
    model = root / "model"
    tiny_llama_config(vocab_size=VOCAB).save_pretrained(model)
    minitrain = [sys.executable, "-m", "minitrain"]
    out = {name: root / name for name in ("one", "two", "split")}
    _run(minitrain + _args(data, model, out["one"], 4096) + ["--nproc", "1"], root)
    _run(minitrain + _args(data, model, out["two"], 4096) + ["--nproc", "2"], root)
    _run(minitrain + _args(data, model, out["split"], 64) + ["--nproc", "2"], root)
    return out


def _metrics(run: Path) -> list[dict]:
    return [orjson.loads(line) for line in (run / "training_metrics_0.jsonl").read_bytes().splitlines()]


@pytest.mark.slow
def test_step_one_is_ln2_with_zero_rewards(runs):
    first = _metrics(runs["one"])[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[key]) < 1e-6, key


@pytest.mark.slow
def test_per_step_losses_do_not_depend_on_ranks_or_token_budget(runs):
    ref = _metrics(runs["one"])
    assert len(ref) == STEPS and all(r["grad_accum"] == 1 for r in ref)
    for name in ("two", "split"):
        other = _metrics(runs[name])
        assert len(other) == STEPS
        for a, b in zip(ref, other, strict=True):
            for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (name, key, a["step"])
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (name, a["step"])
            assert b["num_samples"] == a["num_samples"] == 4  # pairs
    assert max(r["grad_accum"] for r in _metrics(runs["split"])) > 1  # the small budget split the batch


@pytest.mark.slow
def test_a_few_steps_move_the_margins_up(runs):
    rows = _metrics(runs["one"])
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    assert np.mean([r["rewards/accuracies"] for r in rows[-2:]]) > 0.5
    assert rows[-1]["loss"] < math.log(2)


@pytest.mark.slow
def test_the_reference_is_cached_beside_the_run_and_reused_on_resume(runs):
    run = runs["one"]
    cached = np.load(run / "reference_logps.npy")
    assert cached.shape == (2 * NUM_PAIRS,) and np.isfinite(cached).all()
    params = orjson.loads((run / "training_params.json").read_bytes())
    more = [a if a != str(STEPS) else str(STEPS + 2) for a in _args(Path(params["data_path"]), Path(
        params["model_name_or_path"]), run, 4096)]  # fmt: skip
    done = _run([sys.executable, "-m", "minitrain", *more, "--nproc", "1", "--resume"], run.parent)
    assert "reference log-probs of 8 pairs read from" in done.stdout + done.stderr
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 3))
    assert np.array_equal(np.load(run / "reference_logps.npy"), cached)


@pytest.fixture(scope="module")
def adapter_runs(tmp_path_factory) -> dict[str, Path]:
    """DPO runs of a saved tiny model through the CLI: LoRA (2 ranks, eval pairs), a DPO adapter stacked on an
    SFT adapter (1 rank), QLoRA on bitsandbytes' CPU backend (1 rank), full fine-tuning (1 rank, eval)."""
    root = tmp_path_factory.mktemp("dpo_adapter_runs")
    data = write_pairs(root / "pairs.jsonl", num=NUM_PAIRS, vocab=VOCAB, seed=11)
    write_pairs(root / "eval.jsonl", num=6, vocab=VOCAB, seed=12)
    model = root / "model"
    build_lm(vocab_size=VOCAB).save_pretrained(model)  # the base the SFT adapter was made on
    sft = save_sft_adapter(root / "sft")
    out = {name: root / name for name in ("lora", "stacked", "qlora", "full")}
    full = [sys.executable, "-m", "minitrain", *_args(data, model, Path("."), 4096)]
    full = [a for a in full if a != "--from-scratch"]
    common = [*full, "--lora-rank", "4", "--learning-rate", "5e-2"]
    evaluated = ["--eval-data-path", str(root / "eval.jsonl"), "--eval-every-samples", "8"]
    _run([*common, *evaluated, "--output-dir", str(out["lora"]), "--nproc", "2"], root)
    # 1 rank each (in the CLI's process): 2 ranks of DPO are the `runs` above and the LoRA run here
    _run([*full, *evaluated, "--output-dir", str(out["full"]), "--nproc", "1"], root)
    _run([*common, "--output-dir", str(out["stacked"]), "--nproc", "1", "--base-adapter", str(sft)], root)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(CPU_QLORA_ENV, "1")
        _run([*common, "--output-dir", str(out["qlora"]), "--nproc", "1", "--load-in-4bit"], root)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "stacked", "qlora"])
def test_adapter_runs_start_at_ln2_with_zero_rewards_and_learn(adapter_runs, name):
    rows = [r for r in _metrics(adapter_runs[name]) if "loss" in r]  # step lines (lora has eval lines too)
    assert len(rows) == STEPS
    # LoRA B starts at 0: the policy IS the reference (stacked: base + SFT adapter, which is not the base)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(rows[0][key]) < 1e-6, key
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["rewards/margins"] > 0
    assert not (adapter_runs[name] / "reference_logps.npy").exists()  # per minibatch, no cache


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "full"])
def test_eval_pairs_of_a_run_equal_the_direct_computation_with_its_final_weights(adapter_runs, name):
    from transformers import AutoModelForCausalLM

    run = adapter_runs[name]
    evals = [r for r in _metrics(run) if "eval_loss" in r]
    assert [r["total_samples_accumulated"] for r in evals] == [8, 16, 24]  # pairs
    final = max((run / "hf_format").glob("samples_*"), key=lambda p: int(p.name.split("_")[1]))
    base = run.parent / "model"
    initial = AutoModelForCausalLM.from_pretrained(base).eval()
    if name == "lora":
        policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(final)).eval()
    else:
        policy = AutoModelForCausalLM.from_pretrained(final).eval()
    store = TokenStore.open(run.parent / "eval.jsonl", "dpo")
    with torch.no_grad():
        reference = [_seq_logp(initial, store, s) for s in range(len(store))]
    want = _direct_eval(policy, reference.__getitem__, store, list(range(store.num_pairs)), "sigmoid", 0.1)
    for key, value in want.items():
        assert evals[-1][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert evals[-1]["eval_rewards/margins"] != pytest.approx(0, abs=1e-4)  # the policy moved away
    assert (run / "eval_reference_logps.npy").exists() == (name == "full")  # adapters: per minibatch
