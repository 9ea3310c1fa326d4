"""Experiment trackers (`--report-to tensorboard|wandb|mlflow`): rank 0 copies each metrics record to them.

The JSONL (`training_metrics_0.jsonl`, `metrics.py`) stays the source of truth and is always written;
each tracker receives the same record right after it is written: every number in it (loss, lr, grad_norm,
eval_loss, throughput, ...) as a scalar at the record's `step`. At start each tracker gets the run name (the
output folder's name), the training parameters and the tokenized data's sidecar, flattened to `a.b.c` keys.

    tensorboard  OUT/tensorboard/ event files (torch.utils.tensorboard;
                 `tensorboard --logdir OUT/tensorboard`)
    wandb        a W&B run in OUT/wandb/; project $WANDB_PROJECT or "minitrain"; offline with
                 WANDB_MODE=offline
    mlflow       a run in $MLFLOW_TRACKING_URI, else the file store OUT/mlruns (no server, no network);
                 experiment $MLFLOW_EXPERIMENT_NAME or "minitrain"

Each is an optional extra (`pip install 'minitrain[wandb]'`), imported only when asked for; the parent
checks the packages are installed before spawning torchrun (`check_trackers`). A resumed run starts a new
W&B/MLflow run and appends to the TensorBoard folder (steps continue where the checkpoint was).
Trade-off: trackers are fed synchronously on rank 0 (W&B and MLflow's file store buffer or write locally;
a remote MLflow server adds a round trip per step).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minitrain.errors import UserError

if TYPE_CHECKING:
    from minitrain.config import TrainConfig

PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # tracker -> module needed
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
HINT = {
    "tensorboard": "check that the output folder is writable",
    "wandb": "log in (wandb login) or set WANDB_MODE=offline on a machine without network",
    "mlflow": "check MLFLOW_TRACKING_URI (unset: a file store in OUT/mlruns)",
}
MAX_PARAM_CHARS = 500  # MLflow's limit per parameter value is larger; long lists are cut and say so


def check_trackers(report_to: Iterable[str]) -> None:
    """UserError naming the extra when a requested tracker's package is not installed (nothing imported)."""
    for name in report_to:
        if name != "none" and importlib.util.find_spec(PACKAGE[name]) is None:
            raise UserError(
                f"--report-to {name} needs the {PACKAGE[name]} package; pip install 'minitrain[{name}]' "
                "(or drop --report-to)"
            )


def open_trackers(config: TrainConfig, sidecar: dict[str, Any] | None) -> Trackers | None:
    """Rank 0's trackers for `config.report_to` (None when none is asked for), with the run's params."""
    if not [n for n in config.report_to if n != "none"]:
        return None
    params = {"config": config.to_dict(), "data": sidecar or {}}
    return Trackers(config.report_to, output_dir=config.output_dir, params=params)


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level with dotted keys; lists and other values kept as they are."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record, except `step` (the x axis)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class Trackers:
    """The requested trackers of one run, on rank 0; `log` a metrics record, `close` at the end."""

    def __init__(self, report_to: Iterable[str], *, output_dir: Path, params: dict[str, Any]) -> None:
        self._open: list[Any] = []
        names = [n for n in dict.fromkeys(report_to) if n != "none"]
        run_name = Path(output_dir).name
        flat = flatten(params)
        openers = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
        try:
            for name in names:
                try:
                    self._open.append(openers[name](Path(output_dir), run_name, flat))
                except Exception as err:
                    raise UserError(
                        f"--report-to {name}: the tracker did not start ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}); {HINT[name]}"
                    ) from None
        except BaseException:
            self.close()
            raise

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values and "step" in record:
            for tracker in self._open:
                tracker.log(values, int(record["step"]))

    def close(self) -> None:
        while self._open:
            self._open.pop().close()


class _TensorBoard:
    def __init__(self, output_dir: Path, run_name: str, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / TENSORBOARD_DIR))
        table = "\n".join(f"| {k} | {_text(v)} |" for k, v in params.items())
        self.writer.add_text("params", f"run: {run_name}\n\n| param | value |\n|---|---|\n{table}", 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, output_dir: Path, run_name: str, params: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "minitrain"),
            name=run_name,
            dir=str(output_dir),
            config=params,
            reinit="create_new",
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, output_dir: Path, run_name: str, params: dict[str, Any]) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (output_dir / MLFLOW_DIR).resolve().as_uri()
        if uri.startswith(
            "file:"
        ):  # MLflow 3 refuses its file store unless asked; here it is the offline default
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "minitrain")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        items = [Param(k, _text(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _text(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_CHARS else f"{text[: MAX_PARAM_CHARS - 20]}... ({len(text)} chars)"
