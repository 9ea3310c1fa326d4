"""minitrain/train/metrics.py: the metrics file (flushed per line), the plain display, FLOP counting."""

from __future__ import annotations

import pytest
from rich.console import Console

from minitrain.rundir import read_metrics
from minitrain.train.metrics import (
    MetricsWriter,
    ProgressDisplay,
    format_line,
    no_stop_rule_line,
    peak_flops_per_device,
    step_flops,
)

# The keys of every step's record: mini_trainer's (its users' scripts read them), plus epoch and timestamp.
# The contract is checked on real runs' records (tests/test_e2e.py, tests/train/test_loop.py).
MINI_TRAINER_KEYS = (
    "step", "lr", "grad_norm", "loss", "num_samples", "num_loss_counted_tokens", "num_total_tokens",
    "grad_accum", "time_per_batch", "tokens_per_second", "samples_per_second", "total_samples_accumulated",
    "peak_memory_usage_GB", "epoch", "timestamp",
)  # fmt: skip

RECORD = {
    "step": 3, "lr": 1e-5, "grad_norm": 0.5, "loss": 1.25, "num_samples": 4, "num_loss_counted_tokens": 10,
    "num_total_tokens": 40, "grad_accum": 1, "time_per_batch": 0.5, "tokens_per_second": 80.0,
    "samples_per_second": 8.0, "total_samples_accumulated": 12, "peak_memory_usage_GB": 0.1, "epoch": 1.5,
    "timestamp": "2026-01-01T00:00:00.000+00:00",
}  # fmt: skip


def test_each_line_is_on_disk_before_the_writer_closes(tmp_path):
    path = tmp_path / "training_metrics_0.jsonl"
    writer = MetricsWriter(path)
    writer.write(RECORD)
    assert read_metrics(path) == [RECORD]  # flushed, not buffered until close
    writer.write(RECORD | {"step": 4})
    writer.close()
    assert [r["step"] for r in read_metrics(path)] == [3, 4]
    with MetricsWriter(path, continue_after_step=4) as again:
        again.write(RECORD | {"step": 5})
    assert [r["step"] for r in read_metrics(path)] == [3, 4, 5]
    path.open("ab").write(b'{"step": 6, "lo')  # a line cut by a crash is ignored by the reader
    assert len(read_metrics(path)) == 3
    with MetricsWriter(path, continue_after_step=3) as resumed:  # resumed from step 3: steps 4, 5 go
        resumed.write(RECORD | {"step": 4, "loss": 0.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(3, RECORD["loss"]), (4, 0.5)]
    assert path.read_bytes().endswith(b"}\n")  # the cut line is gone from the file itself


def test_other_ranks_write_nothing(tmp_path):
    with MetricsWriter(tmp_path / "m.jsonl", enabled=False) as writer:
        writer.write(RECORD)
    assert not (tmp_path / "m.jsonl").exists()


def test_plain_lines_when_not_a_terminal(capsys):
    display = ProgressDisplay(total_steps=10, console=Console(force_terminal=False))
    display.update(RECORD)
    display.close()
    out = capsys.readouterr().out
    assert out == format_line(RECORD, 10, 0.5 * 7) + "\n"
    assert out.startswith("step 3/10  epoch 1.50  loss 1.2500  lr 1e-05")
    assert out.endswith("  0.50s  ETA 0:00:04\n")  # 7 steps left at the 0.5 s this step took (3.5 s, rounded)


def test_eta_is_the_mean_step_time_of_this_launch_times_the_steps_left(capsys):
    display = ProgressDisplay(total_steps=100, console=Console(force_terminal=False))
    for step, seconds in ((41, 10.0), (42, 20.0), (43, 30.0)):  # a resumed run: its first step is 41
        display.update(RECORD | {"step": step, "time_per_batch": seconds})
    lines = capsys.readouterr().out.splitlines()
    assert [line.rsplit("ETA ", 1)[1] for line in lines] == [
        "0:09:50",
        "0:14:30",
        "0:19:00",
    ]  # 59x10, 58x15, 57x20


def test_without_a_stop_rule_the_line_shows_the_epoch_and_no_total(capsys):
    display = ProgressDisplay(total_steps=None, console=Console(force_terminal=False))
    display.update(RECORD | {"step": 54, "epoch": 3.25})
    out = capsys.readouterr().out
    assert out.startswith("step 54  epoch 3.25  loss") and "ETA" not in out and "/" not in out.split()[1]


def test_the_no_stop_rule_line_names_the_real_checkpoint_setting():
    assert no_stop_rule_line(2000) == (
        "no stop rule (--max-steps, --max-samples or --max-epochs): infinite sampling, runs until Ctrl+C; "
        "checkpoints every 2,000 samples"
    )
    assert no_stop_rule_line(None).endswith(
        "one checkpoint when stopped (--min-samples-per-checkpoint N for more)"
    )


def test_disabled_display_is_silent(capsys):
    display = ProgressDisplay(total_steps=None, enabled=False)
    display.update(RECORD)
    display.print("x")
    assert capsys.readouterr().out == ""


def test_flops_count_matmuls_and_causal_attention_per_sample():
    # 6 * params * tokens, plus 6 * layers * hidden * len^2 per sample (not (sum len)^2: samples are apart)
    assert step_flops(
        num_params=1000, num_layers=2, hidden_size=8, lengths=[3, 5]
    ) == 6 * 1000 * 8 + 6 * 2 * 8 * (9 + 25)


def test_a_frozen_parameter_costs_4_flops_per_token_not_6():
    # LoRA: the frozen base computes its forward (2) and its input gradient (2), never a weight gradient
    full = step_flops(num_params=1000, num_layers=2, hidden_size=8, lengths=[3, 5])
    lora = step_flops(num_params=10, frozen_params=990, num_layers=2, hidden_size=8, lengths=[3, 5])
    assert full - lora == 2 * 990 * 8


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L40", 181e12),  # not the L4's 121
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA GB200", 2500e12),  # not the B200's 2250
        ("NVIDIA B200", 2250e12),
        ("Quadro RTX 8000", None),
        ("NVIDIA H20", None),  # a different chip, not an H200 or H100
    ],
)
def test_peak_flops_by_device_name(name, peak):
    assert peak_flops_per_device(name) == peak


def test_lora_counts_the_base_as_frozen_and_the_embedding_table_not_at_all(tiny_llama):
    from minitrain.train.adapters import LoraSettings, add_adapters
    from minitrain.train.metrics import matmul_params

    embedding = tiny_llama.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in tiny_llama.parameters())
    assert matmul_params(tiny_llama) == (total - embedding, 0)
    lm = add_adapters(tiny_llama, LoraSettings(rank=4, target_modules=("q_proj", "v_proj")))
    trained = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    # 2 layers x (q: 4 x (64 + 64), v: 4 x (64 + 32))
    assert trained == 2 * (4 * 128 + 4 * 96)
    assert matmul_params(lm) == (trained, total - embedding)
