"""minitrain/rundir.py: `--overwrite` removes only minitrain's files, `--keep-last` prunes state and
exports."""

from __future__ import annotations

from pathlib import Path

from minitrain.rundir import export_dir, prune_checkpoints, remove_previous_run, run_files, scan_checkpoints


def _checkpoint(out: Path, samples: int, *, export: bool = True) -> None:
    path = out / "checkpoints" / f"samples_{samples}"
    (path / "state").mkdir(parents=True)
    for name in ("COMPLETE", "trainer_state.json", "state/.metadata"):
        (path / name).write_text("{}")
    (out / "checkpoints" / "latest").write_text(f"samples_{samples}\n")
    if export:
        export_dir(out, samples).mkdir(parents=True)
        (export_dir(out, samples) / "model.safetensors").write_bytes(b"w")


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_overwrite_removes_minitrains_files_and_nothing_else(tmp_path):
    out = tmp_path
    (out / "training_params.json").write_text("{}")
    (out / "training_metrics_0.jsonl").write_text("{}\n")
    _checkpoint(out, 8)
    _checkpoint(out, 16)
    (out / "checkpoints" / ".tmp-samples_24").mkdir()  # an interrupted write
    (out / "hf_format" / ".samples_24.tmp").mkdir()
    user = {"notes.md", "hf_format/my-merged-model/config.json", "checkpoints/README", "data/mine.jsonl"}
    for name in user:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine")
    removed = remove_previous_run(out)
    assert {str(p.relative_to(out)) for p in removed} == {
        "training_params.json", "training_metrics_0.jsonl", "checkpoints/samples_8", "checkpoints/samples_16",
        "checkpoints/latest", "checkpoints/.tmp-samples_24", "hf_format/samples_8", "hf_format/samples_16",
        "hf_format/.samples_24.tmp",
    }  # fmt: skip
    assert _tree(out) == user | {"hf_format", "hf_format/my-merged-model", "checkpoints", "data"}
    assert run_files(out) == []


def test_overwrite_removes_the_run_folders_it_emptied(tmp_path):
    _checkpoint(tmp_path, 8)
    (tmp_path / "training_metrics_0.jsonl").write_text("{}\n")
    remove_previous_run(tmp_path)
    assert _tree(tmp_path) == set()


def test_keep_last_prunes_the_exports_with_the_training_state(tmp_path):
    for samples in (8, 16, 24, 32):
        _checkpoint(tmp_path, samples)
    (tmp_path / "hf_format" / ".samples_40.tmp").mkdir()  # an export whose write was interrupted
    (tmp_path / "hf_format" / "keep-me").mkdir()  # the user's
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(str(p.relative_to(tmp_path)) for p in removed) == [
        "checkpoints/samples_16", "checkpoints/samples_8", "hf_format/.samples_40.tmp",
        "hf_format/samples_16", "hf_format/samples_8",
    ]  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "hf_format").iterdir()) == [
        "keep-me",
        "samples_24",
        "samples_32",
    ]
    assert [p.name for p in scan_checkpoints(tmp_path).complete] == ["samples_24", "samples_32"]


def test_keep_last_keeps_the_export_of_the_checkpoint_latest_names(tmp_path):
    for samples in (8, 16, 24):
        _checkpoint(tmp_path, samples)
    (tmp_path / "checkpoints" / "latest").write_text("samples_8\n")  # after --resume .../samples_8
    prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "hf_format").iterdir()) == ["samples_24", "samples_8"]
