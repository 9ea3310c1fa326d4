"""The data pipeline: conversations -> token ids and labels -> store -> sampler -> planner -> packed batch.

tokenizer.py   model paths and the one tokenizer loader
sources.py     the record shapes and files people have (ShareGPT, Alpaca, Parquet, ...) -> messages records
template.py    chat templates rendered exactly as transformers renders them, and traced
chat.py        one conversation -> input_ids + labels (masks computed against the rendered template)
probe.py       a tokenizer loaded for chat encoding: its template probed once (end of turn ...), fingerprint
preference.py  one preference pair -> chosen and rejected samples sharing their prompt tokens
pipeline.py    the `tokenize` stage: JSONL in, tokenized JSONL + sidecar + rejects out (parallel)
workers.py     the tokenize stage's worker processes, results in input order
format.py      the tokenized-file contract every later stage reads
store.py       memory-mapped binary cache of a tokenized file
sampler.py     infinite, seeded, resumable order of sample indices
packing.py     pure minibatch planning on lengths (no torch)
batch.py       one rank's packed minibatch tensors
"""
