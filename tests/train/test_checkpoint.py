"""Training-state checkpoints (minitrain/train/checkpoint.py): exact resume on the same and another world
size, atomic writes, crash leftovers, pruning, and clear errors when the disk refuses.

The distributed half runs tests/train/checkpoint_worker.py under a real torchrun (gloo, CPU) three times in
one module-scoped fixture: 6 uninterrupted steps on 2 ranks (saving after steps 1-3, keep_last=2), then a
resume of steps 4-6 on 1 rank whose final save is killed half-way, then a resume on 2 ranks. The reference
is the uninterrupted run: its losses and its full gathered state at step 3. The single-process half uses a
plain module without a process group.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from minitrain.errors import UserError
from minitrain.rundir import (
    checkpoints_root,
    find_latest_checkpoint,
    is_complete,
    prune_checkpoints,
    resolve_resume,
    scan_checkpoints,
)
from minitrain.train.checkpoint import CheckpointSaveError, load_training_state, save_training_state
from minitrain.train.dist import DistInfo
from tests.conftest import tiny_llama_config

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("checkpoint_worker.py")
SOLO = DistInfo(
    rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), backend="gloo"
)


def make_run_dir(run_dir: Path, num_samples: int = 40) -> Path:
    """A tiny Llama config and a tokenized file of random samples (a third of each prompt masked)."""
    from minitrain.data.store import TokenStore

    run_dir.mkdir(parents=True, exist_ok=True)
    tiny_llama_config().save_pretrained(run_dir / "model")
    rng = np.random.default_rng(0)
    with open(run_dir / "data.jsonl", "wb") as f:
        for line in range(1, num_samples + 1):
            n = int(rng.integers(6, 21))
            ids = rng.integers(0, 512, n).tolist()
            labels = [-100] * (n // 3) + ids[n // 3 :]
            sample = {"input_ids": ids, "labels": labels, "len": n, "num_loss_counted_tokens": n - n // 3}
            f.write(orjson.dumps({**sample, "source_line": line}) + b"\n")
    TokenStore.open(run_dir / "data.jsonl")  # build the cache once, before the ranks start
    return run_dir


def torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The checkpoint worker on `nproc` ranks under torchrun; one rank is a lone process (a process group
    of one, as `init_distributed` sets it up), without torchrun's process and its import of torch."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    if nproc == 1:
        cmd = [sys.executable]
    return subprocess.run(
        [*cmd, str(WORKER), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train on 2 ranks; resume on 1 (then crash in a save); resume on 2. Snapshots between the launches."""
    run_dir = make_run_dir(tmp_path_factory.mktemp("resume"))
    out: dict = {"dir": run_dir}
    train = torchrun(2, "train", str(run_dir))
    assert train.returncode == 0, (train.stdout + train.stderr)[-6000:]
    out["after_train"] = scan_checkpoints(run_dir)
    out["latest_after_train"] = (checkpoints_root(run_dir) / "latest").read_text().strip()

    crash = torchrun(1, "resume", str(run_dir), "crash")
    out["crash"] = crash
    out["after_crash"] = scan_checkpoints(run_dir)
    resume2 = torchrun(2, "resume", str(run_dir))
    assert resume2.returncode == 0, (resume2.stdout + resume2.stderr)[-6000:]
    out["losses"] = json.loads((run_dir / "losses_train.json").read_text())
    out["resume"] = {
        (w, r): json.loads((run_dir / f"resume_w{w}_rank{r}.json").read_text())
        for w, r in [(1, 0), (2, 0), (2, 1)]
    }
    out["ref_rng"] = [json.loads((run_dir / "ref" / f"rng_{r}.json").read_text()) for r in range(2)]
    return out


@pytest.mark.slow
def test_saves_are_complete_and_pruned_to_keep_last(runs: dict) -> None:
    scan = runs["after_train"]
    names = [p.name for p in scan.complete]
    assert names == ["samples_8", "samples_12"], names  # steps 2 and 3 of 4 samples each; step 1's pruned
    assert scan.incomplete == ()
    assert scan.latest is not None and scan.latest.name == "samples_12" == runs["latest_after_train"]
    state = json.loads((scan.latest / "trainer_state.json").read_text())
    assert state["counters"]["step"] == 3 and state["counters"]["samples_seen"] == 12
    assert state["sampler"] == {"num_samples": 40, "seed": 5, "epoch": 0, "position": 12}
    assert state["world_size"] == 2 and state["scheduler"]["last_epoch"] == 3
    assert sorted(p.name for p in (scan.latest / "rng").iterdir()) == ["rank_0.json", "rank_1.json"]
    assert sorted(p.name for p in (scan.latest / "state").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_resume_gives_the_same_state_and_losses(runs: dict, world: int) -> None:
    result = runs["resume"][(world, 0)]
    assert result["checkpoint"] == "samples_12" and result["state_equal"]  # the worker asserted equality
    want = runs["losses"][3:]
    assert len(result["losses"]) == 3
    np.testing.assert_allclose(result["losses"], want, rtol=1e-5, atol=0)
    assert runs["losses"][0] > runs["losses"][-1]  # it trains at all


@pytest.mark.slow
def test_rng_states_return_per_rank_on_the_same_world_size(runs: dict) -> None:
    for rank in range(2):
        assert runs["resume"][(2, rank)]["rng"] == runs["ref_rng"][rank]
    # another world size: reseeded from (seed, step, rank), reproducibly
    from minitrain.train.checkpoint import _reseed
    from tests.train.checkpoint_worker import rng_draws

    _reseed(5, 3, 0)
    assert runs["resume"][(1, 0)]["rng"] == rng_draws()


@pytest.mark.slow
def test_a_crash_during_a_save_leaves_the_previous_checkpoint_latest(runs: dict) -> None:
    crash = runs["crash"]
    assert crash.returncode == 17, crash.stdout + crash.stderr  # the simulated crash, not something else
    scan = runs["after_crash"]
    assert scan.latest is not None and scan.latest.name == "samples_12"  # the 2-rank resume started from it
    assert [p.name for p in scan.incomplete] == [".tmp-samples_24"]
    assert (scan.incomplete[0] / "state" / ".metadata").is_file()  # the shards were all there, unsealed
    assert not is_complete(scan.incomplete[0])


# --- single process, no process group --------------------------------------------------------------------


class Sampler:
    def __init__(self, position: int) -> None:
        self.position = position

    def state_dict(self) -> dict:
        return {"num_samples": 100, "seed": 3, "epoch": 0, "position": self.position}


def tiny_training(seed: int = 0, width: int = 16):
    from transformers import get_scheduler

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=10)
    return model, optimizer, scheduler


def step(model, optimizer, scheduler, seed: int = 0) -> None:
    x = torch.randn(
        3, model[0].in_features, generator=torch.Generator().manual_seed(seed)
    )  # not the global RNG
    model(x).square().sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def draws() -> list:
    return [torch.rand(2).tolist(), random.random(), float(np.random.rand())]


def save(run_dir: Path, model, optimizer, scheduler, samples: int, **kwargs) -> Path:
    return save_training_state(
        run_dir, model=model, optimizer=optimizer, scheduler=scheduler, sampler=Sampler(samples),
        counters={"step": samples // 4, "samples_seen": samples}, dist=SOLO, **kwargs,
    )  # fmt: skip


def test_single_process_round_trip_restores_everything(tmp_path: Path) -> None:
    model, optimizer, scheduler = tiny_training()
    for i in range(3):
        step(model, optimizer, scheduler, seed=i)
    leftovers = [checkpoints_root(tmp_path) / n for n in (".tmp-samples_8", ".old-samples_4", "samples_9")]
    for leftover in leftovers:
        leftover.mkdir(parents=True)
    path = save(tmp_path, model, optimizer, scheduler, 12)
    assert [p.exists() for p in leftovers] == [False, False, True]  # interrupted writes of ours are removed
    assert path == tmp_path / "checkpoints" / "samples_12" and is_complete(path)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "samples_12\n"
    want_rng = draws()
    step(model, optimizer, scheduler, seed=3)  # where the uninterrupted run goes next

    model2, optimizer2, scheduler2 = tiny_training(seed=1)  # other weights, no optimizer state yet
    sampler_state, counters = load_training_state(
        path, model=model2, optimizer=optimizer2, scheduler=scheduler2, dist=SOLO
    )
    assert sampler_state["position"] == 12 and counters == {"step": 3, "samples_seen": 12}
    assert draws() == want_rng  # same world size: this rank's RNG streams continue
    step(model2, optimizer2, scheduler2, seed=3)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_find_latest_follows_the_marker_and_ignores_incomplete_folders(tmp_path: Path) -> None:
    model, optimizer, scheduler = tiny_training()
    for samples in (4, 8, 12):
        step(model, optimizer, scheduler)
        save(tmp_path, model, optimizer, scheduler, samples)
    root = checkpoints_root(tmp_path)
    (root / ".tmp-samples_16" / "state").mkdir(parents=True)  # a crash in the middle of a write
    (root / "samples_20").mkdir()  # copied by hand, half-way: no COMPLETE
    scan = scan_checkpoints(tmp_path)
    assert [p.name for p in scan.complete] == ["samples_4", "samples_8", "samples_12"]
    assert [p.name for p in scan.incomplete] == [".tmp-samples_16", "samples_20"]
    assert find_latest_checkpoint(tmp_path) == root / "samples_12" and scan.note is None

    (root / "latest").write_text("samples_8\n")  # resumed from 8 on purpose: 12 is a stale future
    assert find_latest_checkpoint(tmp_path) == root / "samples_8"
    (root / "latest").write_text("samples_20\n")  # the marker names something incomplete: fall back
    scan = scan_checkpoints(tmp_path)
    assert scan.latest == root / "samples_12" and "samples_20" in (scan.note or "")
    assert find_latest_checkpoint(tmp_path / "nowhere") is None

    # keep-last: the newest K complete ones and `latest` survive; leftovers of crashes go
    (root / "latest").write_text("samples_4\n")
    removed = prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in removed) == [".tmp-samples_16", "samples_20", "samples_8"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "samples_12", "samples_4"]
    with pytest.raises(UserError, match="--keep-last must be >= 1"):
        prune_checkpoints(tmp_path, keep_last=0)


def test_resolve_resume_explains_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no complete checkpoint"):
        resolve_resume(tmp_path, None)
    (checkpoints_root(tmp_path) / ".tmp-samples_4").mkdir(parents=True)
    with pytest.raises(UserError, match=r"only incomplete ones: \.tmp-samples_4"):
        resolve_resume(tmp_path, None)
    with pytest.raises(UserError, match="incomplete checkpoint"):
        resolve_resume(tmp_path, checkpoints_root(tmp_path) / ".tmp-samples_4")
    with pytest.raises(UserError, match="no such checkpoint folder"):
        resolve_resume(tmp_path, tmp_path / "missing")
    model, optimizer, scheduler = tiny_training()
    path = save(tmp_path, model, optimizer, scheduler, 4)
    assert resolve_resume(tmp_path, None) == path == resolve_resume(tmp_path, path)
    (tmp_path / "hf_format" / "samples_4").mkdir(parents=True)
    with pytest.raises(UserError, match="Hugging Face export; resume from"):
        resolve_resume(tmp_path, tmp_path / "hf_format" / "samples_4")


def test_loading_into_another_model_is_a_user_error(tmp_path: Path) -> None:
    model, optimizer, scheduler = tiny_training()
    step(model, optimizer, scheduler)
    path = save(tmp_path, model, optimizer, scheduler, 4)
    other, other_optimizer, other_scheduler = tiny_training(width=8)
    with pytest.raises(UserError, match="does not fit this model"):
        load_training_state(
            path, model=other, optimizer=other_optimizer, scheduler=other_scheduler, dist=SOLO
        )


def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    model, optimizer, scheduler = tiny_training(width=64)
    step(model, optimizer, scheduler)
    first = save(tmp_path, model, optimizer, scheduler, 4)
    before = sorted((p.relative_to(first), p.stat().st_size) for p in first.rglob("*"))
    step(model, optimizer, scheduler)
    # a real write error deep inside DCP: files may not grow past 4 KiB (EFBIG, like ENOSPC to the writer)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        with pytest.raises(CheckpointSaveError) as err:
            save(tmp_path, model, optimizer, scheduler, 8, keep_last=1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    message = str(err.value)
    assert "\n" not in message and "samples_8" in message and "File too large" in message
    assert f"the previous checkpoint {first} is intact" in message
    assert sorted(p.name for p in checkpoints_root(tmp_path).iterdir()) == [
        "latest",
        "samples_4",
    ]  # tmp removed
    assert sorted((p.relative_to(first), p.stat().st_size) for p in first.rglob("*")) == before
    assert find_latest_checkpoint(tmp_path) == first


def test_an_unwritable_checkpoints_folder_is_one_clear_line(tmp_path: Path) -> None:
    model, optimizer, scheduler = tiny_training()
    checkpoints_root(tmp_path).parent.mkdir(exist_ok=True)
    checkpoints_root(tmp_path).write_text("not a folder")
    with pytest.raises(CheckpointSaveError, match=r"cannot write checkpoint .*samples_4: .*make .* writable"):
        save(tmp_path, model, optimizer, scheduler, 4)


def test_counters_must_name_the_checkpoint(tmp_path: Path) -> None:
    model, optimizer, scheduler = tiny_training()
    with pytest.raises(ValueError, match="samples_seen"):
        save_training_state(
            tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, sampler=Sampler(0),
            counters={"step": 1}, dist=SOLO,
        )  # fmt: skip
