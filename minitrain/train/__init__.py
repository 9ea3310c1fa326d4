"""The training engine: launch torchrun, shard with FSDP2, run the loop, write checkpoints and metrics.

launch.py      the torchrun seam: builds the command line, spawns it, forwards signals
preflight.py   every check in the parent before spawning (torch-free first), and fitting the plan to the GPUs
worker.py      the torchrun entry point: reads training_params.json and assembles the pieces for the loop
dist.py        the distributed facts (rank, world, device) as one small value
model.py       load the model, wrap it with its loss, FSDP2 sharding, activation checkpointing
attention.py   attention that keeps packed samples apart (per-sample SDPA; flash-attn varlen on GPU)
loss.py        chunked linear + cross-entropy, normalised by the global trained-token count
optim.py       AdamW and the learning-rate schedule
adapters.py    LoRA, QLoRA (4-bit base) and stacked adapters through PEFT, adapter and merged exports
evaluate.py    eval loss over a held-out file, normalised like training
loop.py        the training loop, top to bottom
checkpoint.py  resumable training-state checkpoints (sharded, atomic) and resume
export.py      Hugging Face export of the sharded model (or of the adapter)
faults.py      graceful stop on SIGINT/SIGTERM, non-finite checks, signal forwarding in the parent
metrics.py     training_metrics_0.jsonl (written), MFU and the progress display
trackers.py    TensorBoard, W&B and MLflow fed from the same records (--report-to)
preference.py  DPO and its cousins on per-sequence log-probabilities (not wired into training yet)
dryrun.py      `train --dry-run`: replay sampler + planner without a model, predicted memory
memory.py      the per-rank memory model (no torch)
"""
