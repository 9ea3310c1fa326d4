"""Training metrics: the run's `training_metrics_0.jsonl` and what rank 0 shows while it trains.

Format (read by `minitrain plot`; the keys are mini_trainer's so its plotting scripts keep working): one
JSON object per optimizer step, written by rank 0 and flushed at once, so a crash loses at most the step
in flight:

    step                       int    1-based optimizer step
    lr                         float  learning rate this step was taken with
    grad_norm                  float  global gradient norm before clipping (over all ranks' shards)
    loss                       float  mean token cross-entropy of the global batch (sum / trained tokens)
    num_samples                int    samples trained this step (all ranks)
    num_loss_counted_tokens    int    trained tokens (labels != -100 after the shift) this step
    num_total_tokens           int    tokens fed to the model this step (no padding exists to count)
    grad_accum                 int    minibatches per rank this step (forward/backward passes)
    time_per_batch             float  seconds for the step (data, forward, backward, optimizer)
    tokens_per_second          float  num_total_tokens / time_per_batch, all ranks together
    samples_per_second         float  num_samples / time_per_batch
    total_samples_accumulated  int    samples trained since the start of the run
    peak_memory_usage_GB       float  peak GPU memory allocated on rank 0 in this step (on CPU: peak RSS
                                      of rank 0)
    epoch                      float  passes over the data so far (1.5 = halfway through the second)
    timestamp                  str    ISO 8601, UTC, when the step ended
    mfu                        float  on GPU only: model FLOPs utilisation of real tokens (0..1)

With an eval set, eval lines stand between the step lines: {step, eval_loss, total_samples_accumulated,
epoch, timestamp}; with `--objective dpo` also eval_rewards/chosen|rejected|accuracies|margins and
eval_logps/chosen|rejected (`minitrain.train.evaluate.evaluate_pairs`). A resumed run keeps the lines up to
its checkpoint's step and appends after them.

Display: a rich progress bar on a terminal (step, epoch, loss, lr, tokens/s, samples, ETA when the run has a
stop criterion), one plain line per step otherwise (logs, pipes: the same, with `step N/TOTAL` and an ETA from
the mean step time when there is a stop criterion). A run without one says so once, at its start
(`no_stop_rule_line`), and its lines show the epoch growing. Trade-off: metrics are written synchronously
(a flush per step costs microseconds next to a training step) instead of through a background thread.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from minitrain.train.trackers import Trackers


# dense bf16 peak FLOP/s per GPU (no sparsity), from NVIDIA's data sheets: model -> form factor -> peak.
# `peak_flops_per_device` matches whole words of the device name, so L40 is not L4 and GB200 is not B200;
# None: the SXM / only form. H100 PCIe and NVL (and H200 NVL) have fewer SMs or lower clocks than SXM.
PEAK_BF16_FLOPS: dict[str, dict[str | None, float]] = {
    "B200": {None: 2250e12},
    "GB200": {None: 2500e12},  # per GPU of a GB200 superchip (NVL72: 180 PFLOPS dense / 72)
    "H200": {None: 989e12, "NVL": 835e12},
    "H100": {None: 989e12, "NVL": 835e12, "PCIE": 756e12},
    "H800": {None: 989e12, "PCIE": 756e12},
    "A100": {None: 312e12},
    "A800": {None: 312e12},
    "L40S": {None: 362e12},
    "L40": {None: 181e12},
    "L4": {None: 121e12},
    "A10G": {None: 70e12},
}


class MetricsWriter:
    """Appends one JSON object per line to `path`, flushed per line; a no-op object on ranks other than 0.

    A new run starts the file afresh; `continue_after_step=N` (a resumed run) keeps the lines of steps up to
    N and drops later ones (trained after the checkpoint, before the interruption) and a line cut by a crash.
    """

    def __init__(
        self,
        path: Path,
        *,
        enabled: bool = True,
        continue_after_step: int | None = None,
        trackers: Trackers | None = None,  # --report-to: fed the same records, after the file
    ) -> None:
        self.path = Path(path)
        self._file: IO[bytes] | None = None
        self._trackers = trackers
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if continue_after_step is not None:
                _keep_steps_up_to(self.path, continue_after_step)
            self._file = self.path.open("wb" if continue_after_step is None else "ab")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
            self._file.flush()
        if self._trackers is not None:
            self._trackers.log(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._trackers is not None:
            self._trackers.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def format_line(record: dict[str, Any], total_steps: int | None, eta_seconds: float | None = None) -> str:
    """The plain one-line form of a step's metrics (logs, pipes, the demo).

    With a stop criterion: `step N/TOTAL` and, given `eta_seconds`, `ETA H:MM:SS` at the end; always the
    passes over the data so far (`epoch`), which is what grows in a run without a stop criterion.
    """
    step = f"{record['step']}/{total_steps}" if total_steps else str(record["step"])
    line = (
        f"step {step}  epoch {record['epoch']:.2f}  loss {record['loss']:.4f}  lr {record['lr']:.3g}  "
        f"grad_norm {record['grad_norm']:.3g}  {record['tokens_per_second']:,.0f} tok/s  "
        f"samples {record['total_samples_accumulated']:,}  {record['time_per_batch']:.2f}s"
    )
    if total_steps and eta_seconds is not None:
        line += f"  ETA {_clock(eta_seconds)}"
    return line


def no_stop_rule_line(min_samples_per_checkpoint: int | None) -> str:
    """What a run without --max-steps, --max-samples or --max-epochs says once, at its start."""
    saves = (
        f"checkpoints every {min_samples_per_checkpoint:,} samples"
        if min_samples_per_checkpoint
        else "one checkpoint when stopped (--min-samples-per-checkpoint N for more)"
    )
    return (
        "no stop rule (--max-steps, --max-samples or --max-epochs): infinite sampling, runs until Ctrl+C; "
        + saves
    )


def _clock(seconds: float) -> str:
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _keep_steps_up_to(path: Path, step: int) -> None:
    """Rewrite `path` (atomically) with only its complete lines of steps <= `step`."""
    from minitrain.atomic import atomic_write

    if not path.exists():
        return
    keep = []
    for line in path.read_bytes().splitlines():
        try:
            if orjson.loads(line)["step"] <= step:
                keep.append(line + b"\n")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by the crash
    with atomic_write(path) as f:
        f.write(b"".join(keep))


class ProgressDisplay:
    """Rank 0's view of training: a rich bar on a terminal, plain lines elsewhere; silent when disabled."""

    def __init__(
        self, *, total_steps: int | None, enabled: bool = True, console: Console | None = None
    ) -> None:
        self.total_steps = total_steps
        self.enabled = enabled
        self.console = console or Console(file=sys.stdout)
        self._progress: Progress | None = None
        self._task: Any = None
        self._first_step: int | None = None  # the ETA is the mean step time of this launch x steps left
        self._seconds = 0.0
        if enabled and self.console.is_terminal:
            columns = [TextColumn("[bold]step {task.completed}" + (f"/{total_steps}" if total_steps else ""))]
            if total_steps:
                columns.append(BarColumn())
            columns += [TextColumn("{task.fields[stats]}"), TimeElapsedColumn()]
            if total_steps:
                columns.append(TimeRemainingColumn())
            self._progress = Progress(*columns, console=self.console, transient=False)
            self._task = self._progress.add_task("train", total=total_steps, stats="starting...")
            self._progress.start()

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._progress is None:
            print(format_line(record, self.total_steps, self.eta(record)), flush=True)
            return
        stats = (
            f"epoch {record['epoch']:.2f}  loss {record['loss']:.4f}  lr {record['lr']:.3g}  "
            f"{record['tokens_per_second']:,.0f} tok/s  "
            f"samples {record['total_samples_accumulated']:,}"
        )
        self._progress.update(self._task, completed=record["step"], stats=stats)

    def eta(self, record: dict[str, Any]) -> float | None:
        """Seconds left: the mean `time_per_batch` of the steps shown so far x the steps left (None: no
        total)."""
        if self._first_step is None:
            self._first_step = record["step"]
        self._seconds += record["time_per_batch"]
        if not self.total_steps:
            return None
        mean = self._seconds / (record["step"] - self._first_step + 1)
        return mean * max(0, self.total_steps - record["step"])

    def print(self, message: str) -> None:
        """A message that does not break the bar."""
        if self.enabled:
            (self._progress.console.print if self._progress else print)(message)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def step_flops(
    *, num_params: int, num_layers: int, hidden_size: int, lengths: Sequence[int], frozen_params: int = 0
) -> float:
    """FLOPs of forward + backward over packed samples of `lengths` (real tokens only).

    Per token and matmul parameter: 2 FLOPs forward, 2 for the gradient of the input, 2 for the gradient of
    the weight - 6 for a trained parameter, 4 for a frozen one (`frozen_params`, e.g. LoRA's base: its input
    gradient still flows back to the adapters below it, but no weight gradient is computed). `num_params`
    counts the trained matmul parameters. Plus causal attention: 6 * layers * hidden * len^2 per sample (QK^T
    and AV, 2 FLOPs per multiply-add, x3 for backward, halved by the causal mask).
    """
    tokens = sum(lengths)
    attention = 6 * num_layers * hidden_size * sum(n * n for n in lengths)
    return (6.0 * num_params + 4.0 * frozen_params) * tokens + attention


def matmul_params(lm: Any) -> tuple[int, int]:
    """(trained, frozen) parameters that cost FLOPs per token: all but the input embedding table (a lookup),
    unless it is tied to the output head."""
    from minitrain.train.adapters import logical_numel

    counts = [0, 0]
    embedding = lm.get_input_embeddings().weight
    output = lm.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    for p in lm.parameters():  # a 4-bit weight's FLOPs are its full shape's
        if p is not embedding or tied:
            counts[not p.requires_grad] += logical_numel(p)
    return counts[0], counts[1]


def model_flops_utilization(
    lengths: Sequence[int],
    seconds: float,
    *,
    num_params: int,
    frozen_params: int,
    num_layers: int,
    hidden_size: int,
    peak_flops: float,
) -> float:
    """Model FLOPs utilisation of a step: `step_flops` of its real tokens over `seconds` at `peak_flops`."""
    flops = step_flops(
        num_params=num_params, frozen_params=frozen_params, num_layers=num_layers, hidden_size=hidden_size,
        lengths=lengths,
    )  # fmt: skip
    return flops / (seconds * peak_flops)


def peak_flops_per_device(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'), None when unknown.

    The model is the first word of the name found in `PEAK_BF16_FLOPS`; the form factor a later word
    (PCIe, NVL), else the SXM figure.
    """
    words = re.split(
        r"[^A-Z0-9]+", device_name.upper()
    )  # "NVIDIA A100-SXM4-80GB" -> NVIDIA, A100, SXM4, 80GB
    for i, word in enumerate(words):
        if word in PEAK_BF16_FLOPS:
            forms = PEAK_BF16_FLOPS[word]
            form = next((w for w in words[i + 1 :] if w in forms), None)
            return forms[form]
    return None


def peak_memory_gb(device: Any) -> float:
    """Peak memory in GB since the last reset: GPU memory allocated on CUDA, the process's peak RSS on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux
