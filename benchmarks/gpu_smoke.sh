#!/usr/bin/env bash
# The GPU smoke test: one command, a time limit, results as JSON in one folder.
#
#     bash benchmarks/gpu_smoke.sh [OUT_DIR] [SECONDS]       (defaults: gpu_smoke_results, 480)
#
# Runs benchmarks/gpu_smoke.py (see its docstring: flash-attn vs packed SDPA, Liger vs chunked loss, bf16
# FSDP2 on all visible GPUs vs one, --cpu-offload, a checkpoint round trip, tokens/s, MFU and peak memory
# per GPU next to the dry-run prediction) under `timeout`; each check lands in OUT_DIR/results.json as it
# ends. Exit 0: all checks passed, or no GPU (it says so); 1: a check failed; 124: the time limit hit.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_smoke_results}"
limit="${2:-480}"
mkdir -p "$out"
python="${PYTHON:-python}"
exec timeout --kill-after=20 "$limit" "$python" benchmarks/gpu_smoke.py "$out"
