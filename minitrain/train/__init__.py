"""The training engine: launch torchrun, shard with FSDP2, run the loop, write checkpoints and metrics.

    launch.py      builds the torchrun command line, spawns it, forwards signals, returns the exit code
    worker.py      the torchrun entry point: reads training_params.json and calls the loop
    dist.py        the distributed facts (rank, world, device) as one small value
    model.py       load the model, choose attention, activation checkpointing, FSDP2 sharding
    loss.py        chunked linear + cross-entropy, normalised by the global trained-token count
    loop.py        the training loop, top to bottom
    checkpoint.py  Hugging Face export of the sharded model
    metrics.py     training_metrics_0.jsonl and the progress display
"""
