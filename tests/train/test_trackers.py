"""Tests for minitrain/train/trackers.py: each tracker's own files hold the loss curve and the run's params.

Each tracker is read back with its own reader (TensorBoard's EventAccumulator, MLflow's MlflowClient on the
file store, W&B's protobuf records in the offline run file), with no network: W&B in offline mode, MLflow on
a file store. One real `minitrain train` run with all three proves the hook: the curves equal the JSONL.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import orjson
import pytest

from minitrain.errors import UserError
from minitrain.rundir import read_metrics
from minitrain.train.metrics import MetricsWriter
from minitrain.train.trackers import Trackers, check_trackers, flatten, scalars
from tests.conftest import REPO, run_minitrain, tiny_llama_config
from tests.train.test_loop import write_tokenized

RECORDS = [
    {"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 1.0, "timestamp": "t", "epoch": 0.25},
    {"step": 2, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "timestamp": "t", "epoch": 0.5},
    {"step": 2, "eval_loss": 2.2, "total_samples_accumulated": 8, "timestamp": "t"},
    {"step": 3, "loss": 1.5, "lr": 1e-3, "grad_norm": 0.25, "timestamp": "t", "epoch": 0.75},
]
PARAMS = {"config": {"learning_rate": 0.001, "report_to": ["wandb"]}, "data": {"counts": {"written": 24}}}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B offline and quiet; MLflow on the run folder's file store (its default)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)


def tensorboard_curve(out: Path, tag: str = "loss") -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def mlflow_run(out: Path):
    """(loss curve, params, run name) of the one run in OUT/mlruns."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("minitrain")
    (run,) = client.search_runs([experiment.experiment_id])
    curve = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
    return sorted(curve), run.data.params, run.info.run_name


def wandb_records(out: Path):
    """Every record of the offline run file, parsed with W&B's own protobuf (its log: 32 KiB blocks of
    records, each with a 7-byte header: crc32, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block  # block trailer padding
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def wandb_run(out: Path):
    """(loss curve, config keys, run name) of the offline W&B run in OUT/wandb."""
    curve, config, name = [], {}, None
    for record in wandb_records(out):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "loss" in items:
                curve.append((items["_step"], items["loss"]))
        elif kind == "run":
            name = record.run.display_name
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    return curve, config, name


def test_every_tracker_holds_the_loss_curve_and_params(tmp_path, offline):
    out = tmp_path / "my-run"
    out.mkdir()
    writer = MetricsWriter(
        out / "training_metrics_0.jsonl",
        trackers=Trackers(["tensorboard", "wandb", "mlflow"], output_dir=out, params=PARAMS),
    )
    with writer:
        for record in RECORDS:
            writer.write(record)
    expected = [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert read_metrics(out / "training_metrics_0.jsonl") == RECORDS  # the JSONL is still written
    assert tensorboard_curve(out) == expected
    assert tensorboard_curve(out, "eval_loss") == [(2, pytest.approx(2.2))]
    curve, params, name = mlflow_run(out)
    assert curve == expected and name == "my-run"
    assert params["config.learning_rate"] == "0.001" and params["data.counts.written"] == "24"
    curve, config, name = wandb_run(out)
    assert curve == expected and name == "my-run"
    assert config["config.learning_rate"] == 0.001 and config["data.counts.written"] == 24


def test_no_tracker_unless_asked(tmp_path):
    from minitrain.config import TrainConfig
    from minitrain.train.trackers import open_trackers

    for report_to in ((), ("none",)):
        config = TrainConfig(
            data_path="d.jsonl", model_name_or_path="m", output_dir=tmp_path, report_to=report_to
        )
        assert open_trackers(config, None) is None
    assert list(tmp_path.iterdir()) == []


def test_a_tracker_that_cannot_start_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    with pytest.raises(
        UserError, match=r"^--report-to mlflow: the tracker did not start \(.*check MLFLOW_TRACKING_URI"
    ):
        Trackers(["tensorboard", "mlflow"], output_dir=tmp_path, params={})


def test_scalars_and_flatten():
    assert scalars({"step": 3, "loss": 1, "ok": True, "timestamp": "t"}) == {"loss": 1.0}
    assert flatten({"a": {"b": {"c": 1}}, "d": [1]}) == {"a.b.c": 1, "d": [1]}


def test_missing_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    check_trackers(["none", "tensorboard"])
    with pytest.raises(
        UserError, match=r"--report-to wandb needs the wandb package; pip install 'minitrain\[wandb\]'"
    ):
        check_trackers(["tensorboard", "wandb"])


@pytest.mark.slow
def test_a_real_run_reports_the_jsonl_curve_to_every_tracker(tmp_path):
    """`minitrain train --report-to tensorboard --report-to wandb --report-to mlflow`: 3 steps, 2 ranks, and
    only rank 0 reports (one W&B run, one MLflow run)."""
    model = tmp_path / "model"
    tiny_llama_config(vocab_size=64).save_pretrained(model)
    data = write_tokenized(tmp_path / "d.jsonl", num=16, vocab=64, seed=1)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path / "run"
    args = ["--data-path", data, "--model-name-or-path", model, "--output-dir", out, "--nproc", "2"]
    args += ["--from-scratch", "--max-steps", "3", "--batch-size", "8", "--learning-rate", "1e-2"]
    args += ["--report-to", "tensorboard", "--report-to", "wandb", "--report-to", "mlflow"]
    done = run_minitrain(["train", *args], env=env)  # the parent here; its 2 ranks report
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    jsonl = [(r["step"], r["loss"]) for r in read_metrics(out / "training_metrics_0.jsonl") if "loss" in r]
    assert len(jsonl) == 3
    assert tensorboard_curve(out) == [(s, pytest.approx(v, rel=1e-6)) for s, v in jsonl]  # stored as float32
    curve, params, name = mlflow_run(out)
    assert curve == jsonl and name == "run" and params["config.max_steps"] == "3"
    assert params["config.report_to"] == "['tensorboard', 'wandb', 'mlflow']"
    curve, config, _ = wandb_run(out)
    assert curve == jsonl and config["config.batch_size"] == 8
    assert orjson.loads((out / "training_params.json").read_bytes())["report_to"] == [
        "tensorboard",
        "wandb",
        "mlflow",
    ]
