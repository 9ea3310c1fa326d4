"""benchmarks/gpu_smoke.sh on a machine without a GPU: exit 0, one line saying it needs one, JSON in OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_smoke.sh"), str(tmp_path / "out"), "120"],
        capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gpu_smoke: needs an NVIDIA GPU with CUDA; none is visible" in proc.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results == {"skipped": {"reason": "needs an NVIDIA GPU with CUDA; none is visible"}}
