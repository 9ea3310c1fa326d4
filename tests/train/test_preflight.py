"""minitrain/train/preflight.py: `check_inputs`, the parent's first checks, imports no torch."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import tiny_llama_config
from tests.train.test_loop import write_tokenized


def test_check_inputs_imports_no_torch(tmp_path):
    """Flag and file mistakes answer before torch is imported; `is_rank0` once imported it in the parent."""
    write_tokenized(tmp_path / "data.jsonl", num=8, vocab=64, seed=0)
    tiny_llama_config(vocab_size=64).save_pretrained(tmp_path / "model")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from minitrain.config import TrainConfig\n"
        "from minitrain.train.preflight import check_inputs\n"
        "check_inputs(TrainConfig(data_path=Path('data.jsonl'), model_name_or_path='model',\n"
        "    output_dir=Path('out'), from_scratch=True, max_steps=2, num_warmup_steps=0, nproc=2))\n"
        "print('torch' in sys.modules)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False", done.stdout + done.stderr
