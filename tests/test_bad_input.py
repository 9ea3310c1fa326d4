"""The bad-input matrix: every user mistake, on every command, is one line naming the problem and the fix.

Each `Row` is one line of docs/bad-input.md's table (command | what the user did | what minitrain says | exit
code). `test_row` runs the real Typer app in-process and checks that the command raised a `UserError`
(which `minitrain.cli.main` prints as one line and exit code 1) whose text contains every fragment in
`says`: the problem and the fix. `test_rendered_as_one_line` runs a few rows again as real
`python -m minitrain` processes to prove the rendering: exit code 1, one `minitrain: error: ...` line on
stderr, no traceback. Degraded but valid flag combinations (`--use-liger-kernels` on the CPU, samples
longer than the token budget) exit 0 with one warning: they are checked on one real 1-step training run.

Trade-off: the rows share one module-scoped workspace of small files (a 64-id tiny Llama config, a few
tokenized files, a tokenizer copy without a chat template), so the whole matrix runs in well under a
minute on two cores; a row that unexpectedly passed every check would fail on the guard instead of
launching torchrun.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from minitrain.cli import app
from minitrain.errors import UserError
from tests.conftest import (
    SMOLLM2,
    outside_any_launch,
    run_minitrain,
    tiny_llama_config,
    tiny_softcapped_config,
)
from tests.data.test_tokenizer import remote_code_tokenizer
from tests.train.test_loop import write_tokenized
from tests.train.test_model import remote_code_model

W = "{w}"  # replaced by the workspace folder in every argument


@dataclass(frozen=True)
class Row:
    """One user mistake: the command line, and fragments the one-line message must contain."""

    command: str
    did: str  # what the user did, as docs/bad-input.md says it
    args: tuple[str, ...]  # after the command name; W is the workspace
    says: tuple[str, ...]  # the problem and the fix, as substrings of the message
    gpus: int | None = None  # pretend this many CUDA GPUs are visible (the --nproc check)
    gpu_bytes: int | None = None  # pretend each has this much memory (the memory check before spawning)
    missing: str | None = None  # pretend this package is not installed

    @property
    def id(self) -> str:
        return f"{self.command}: {self.did}"


TOKENIZER = str(SMOLLM2)


def _train(*extra: str, data: str = f"{W}/d.jsonl", model: str = f"{W}/model", out: str = f"{W}/out"):
    return ("--data-path", data, "--model-name-or-path", model, "--output-dir", out, "--nproc", "1", *extra)


ROWS = [
    # ---------------------------------------------------------------------------------------- tokenize
    Row("tokenize", "input file does not exist",
        (f"{W}/nope.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER),
        ("nope.jsonl: no such file", "give the JSONL file to tokenize")),
    Row("tokenize", "input file is empty",
        (f"{W}/empty.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER),
        ("empty.jsonl: the file is empty", "nothing to tokenize")),
    Row("tokenize", "-o under an existing file (folder cannot be created)",
        (f"{W}/in.jsonl", "-o", f"{W}/afile/t.jsonl", "--model-name-or-path", TOKENIZER),
        ("cannot create the folder", "a file is in the way", "choose another -o path")),
    Row("tokenize", "-o not ending in .jsonl",
        (f"{W}/in.jsonl", "-o", f"{W}/t.txt", "--model-name-or-path", TOKENIZER),
        ("must end in .jsonl",)),
    Row("tokenize", "--model-name-or-path folder does not exist",
        (f"{W}/in.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", f"{W}/notok"),
        ("--model-name-or-path", "notok: no such folder", "check the path")),
    Row("tokenize", "--model-name-or-path ./mymdoel (a typo'd relative path)",
        (f"{W}/in.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", "./mymdoel"),
        ("--model-name-or-path ./mymdoel: no such folder", "check the path")),
    Row("tokenize", "--model-name-or-path mymodel (a typo'd bare name), offline mode on",
        (f"{W}/in.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", "mymodel"),
        ("mymodel: no such folder, and not in the local Hugging Face cache", "offline mode: HF_HUB_OFFLINE=1",
         "check the spelling, or pass a local model folder")),
    Row("tokenize", "--model-name-or-path is a model folder without tokenizer files",
        (f"{W}/in.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", f"{W}/model"),
        ("no tokenizer.json", "pass the folder of the model's tokenizer")),
    Row("tokenize", "tokenizer has no chat template",
        (f"{W}/in.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", f"{W}/tok-no-template"),
        ("no chat template", "--chat-template chatml")),
    Row("tokenize", "--strict and a malformed input line",
        (f"{W}/in-bad.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER, "--strict",
         "--num-workers", "1"),
        ("in-bad.jsonl:2: malformed JSON", "without --strict such lines go to the rejects file")),
    Row("tokenize", "--strict and a line of no known shape",
        (f"{W}/in-odd.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER, "--strict",
         "--num-workers", "1"),
        ("in-odd.jsonl:1: no known shape", "`conversations` (ShareGPT)", "saw keys: text, label",
         "--messages-field")),
    Row("tokenize", "Parquet file without a conversation column",
        (f"{W}/text.parquet", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER),
        ("text.parquet: no conversation column", "its columns are text, label",
         "name yours with --messages-field")),
    Row("tokenize", "--messages-field not a column of the Parquet file",
        (f"{W}/text.parquet", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER, "--messages-field",
         "dialog"),
        ("no column `dialog` (--messages-field)", "its columns are text, label")),
    Row("tokenize", "a folder that is not a save_to_disk folder",
        (f"{W}/emptydir", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER),
        ("not a `datasets.save_to_disk` folder (no state.json)", "give a JSONL, Parquet or Arrow file")),
    Row("tokenize", "--dataset not in the offline datasets cache",
        ("--dataset", "tester/absent:train", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER),
        ("--dataset tester/absent:train: not found in the datasets cache", "download it once",
         "HF_DATASETS_OFFLINE=0")),
    Row("tokenize", "--dataset and an input file",
        (f"{W}/in.jsonl", "--dataset", "a/b", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER),
        ("give one input", "not both")),
    Row("tokenize", "--config file with a misspelt key",
        ("--config", f"{W}/tok-typo.yaml", "-o", f"{W}/t.jsonl"),
        ("tok-typo.yaml: unknown key 'max_sample_tokens'", "did you mean max_sample_num_tokens?")),
    Row("tokenize", "one role name for two roles",
        (f"{W}/in.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER, "--user-role", "bot",
         "--assistant-role", "bot"),
        ("role 'bot' given to both --user-role and --assistant-role", "give it to one")),
    Row("tokenize", "Parquet input without pyarrow",
        (f"{W}/text.parquet", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER),
        ("needs pyarrow", "pip install 'minitrain[datasets]'"), missing="pyarrow"),
    Row("tokenize", "--train-on with an unknown value",
        (f"{W}/in.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER, "--train-on", "first"),
        ("--train-on first", "expected one of all, last")),
    Row("tokenize", "--split-turns with --train-on last",
        (f"{W}/in.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER, "--split-turns",
         "--train-on", "last"),
        ("--split-turns trains every turn", "pass one of them")),
    Row("tokenize", "--chat-template-kwargs that is not JSON",
        (f"{W}/in.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER,
         "--chat-template-kwargs", "enable_thinking=false"),
        ("--chat-template-kwargs is not valid JSON", """such as '{"enable_thinking": false}'""")),
    Row("tokenize", "--chat-template-kwargs naming what tokenize sets itself",
        (f"{W}/in.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER,
         "--chat-template-kwargs", '{"add_generation_prompt": true}'),
        ("--chat-template-kwargs: 'add_generation_prompt' is set by tokenize itself", "drop it")),
    Row("tokenize", "--chat-template-kwargs for another model's template",
        (f"{W}/in.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER,
         "--chat-template-kwargs", '{"enable_thinking": false}'),
        ("--chat-template-kwargs: the chat template (tokenizer) never reads 'enable_thinking'",
         "the render would be the same without it")),
    Row("tokenize", "every line rejected (records of no known shape)",
        (f"{W}/in-odd2.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER, "--num-workers", "1"),
        ("in-odd2.jsonl: no line could be tokenized, nothing written", "2 rejected: no known shape (2)",
         "first, line 1: no known shape", "fix the input")),
    Row("tokenize", "every pair rejected (preference lines with empty responses)",
        (f"{W}/prefs.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER, "--num-workers", "1"),
        ("prefs.jsonl: no line could be tokenized, nothing written", "2 rejected: empty response (2)",
         "first, line 1: empty response", "fix the input")),
    Row("tokenize", "--split-turns on a preference file",
        (f"{W}/prefs.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER, "--split-turns"),
        ("prefs.jsonl holds preference pairs", "drop --split-turns")),
    Row("tokenize", "--train-on last on a preference file",
        (f"{W}/prefs.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", TOKENIZER, "--train-on", "last"),
        ("prefs.jsonl holds preference pairs", "a pair trains its whole response; drop --train-on")),
    # ----------------------------------------------------------------------------------------- inspect
    Row("inspect", "file does not exist", (f"{W}/nope.jsonl",),
        ("nope.jsonl: no such file", "pass the OUT.jsonl written by `minitrain tokenize`")),
    Row("inspect", "file is empty", (f"{W}/empty.jsonl",),
        ("no samples (empty file)", "run `minitrain tokenize` first")),
    Row("inspect", "file is not a tokenize output (raw conversations)", (f"{W}/in.jsonl", "--stats"),
        ("in.jsonl:1: not a tokenized sample", "run `minitrain tokenize` first")),
    Row("inspect", "--source on a preference file",
        (f"{W}/pairs-tok.jsonl", "--audit", "--source", f"{W}/in.jsonl"),
        ("compares SFT samples with their messages", "holds preference pairs", "drop --source")),
    Row("inspect", "tokenized file with a malformed line", (f"{W}/bad.jsonl", "--stats"),
        ("bad.jsonl:4: malformed JSON", "fix or delete that line")),
    # ------------------------------------------------------------------------------------------- train
    Row("train", "a preference file (tokenized prompt/chosen/rejected) given to SFT training",
        _train(data=f"{W}/pairs-tok.jsonl"),
        ("pairs-tok.jsonl was tokenized as preference pairs", "train it with --objective dpo")),
    Row("train", "a preference file without its .meta.json sidecar given to SFT training",
        _train(data=f"{W}/pairs-nosidecar.jsonl"),
        ("pairs-nosidecar.jsonl was tokenized as preference pairs", "train it with --objective dpo")),
    Row("train", "an SFT file given to --objective dpo", _train("--objective", "dpo"),
        ("d.jsonl holds SFT samples", "--objective dpo needs preference pairs",
         "tokenize prompt/chosen/rejected")),
    Row("train", "an SFT file as the eval set of --objective dpo",
        _train("--objective", "dpo", "--eval-data-path", f"{W}/d.jsonl", data=f"{W}/pairs-tok.jsonl"),
        ("d.jsonl holds SFT samples", "--objective dpo needs preference pairs")),
    Row("train", "a tokenized pair without its rejected side",
        _train("--objective", "dpo", data=f"{W}/pairs-bad.jsonl"),
        ("pairs-bad.jsonl:1: not a tokenized pair (`rejected` lacks input_ids/labels)",
         "run `minitrain tokenize`")),
    Row("train", "every pair longer than --max-tokens-per-gpu",
        _train("--objective", "dpo", "--max-tokens-per-gpu", "3", data=f"{W}/pairs-tok.jsonl"),
        ("every pair is longer than --max-tokens-per-gpu 3", "raise --max-tokens-per-gpu")),
    Row("train", "--objective ppo", _train("--objective", "ppo"), ("--objective must be one of sft, dpo",)),
    Row("train", "--preference-loss kto", _train("--objective", "dpo", "--preference-loss", "kto"),
        ("--preference-loss must be one of sigmoid, ipo, hinge, simpo, orpo",)),
    Row("train", "--beta 0", _train("--objective", "dpo", "--beta", "0"),
        ("--beta must be a positive number",)),
    Row("train", "--sft-weight -1", _train("--objective", "dpo", "--sft-weight", "-1"),
        ("--sft-weight must be >= 0",)),
    Row("train", "a preference flag without --objective dpo", _train("--beta", "0.5"),
        ("--beta sets a preference loss", "add --objective dpo")),
    Row("train", "--simpo-gamma with another loss", _train("--objective", "dpo", "--simpo-gamma", "1"),
        ("--simpo-gamma is SimPO's margin", "add --preference-loss simpo")),
    Row("train", "--sft-weight with orpo",
        _train("--objective", "dpo", "--preference-loss", "orpo", "--sft-weight", "1"),
        ("orpo has its own SFT term", "drop --sft-weight")),
    Row("train", "--truncate with --objective dpo when no pair's prompt leaves room for a response",
        _train("--objective", "dpo", "--truncate", "--max-tokens-per-gpu", "3", data=f"{W}/pairs-tok.jsonl"),
        ("pairs-tok.jsonl: no pair fits --max-tokens-per-gpu 3 even cut by --truncate",
         "raise --max-tokens-per-gpu")),
    Row("train", "data file does not exist", _train(data=f"{W}/nope.jsonl"),
        ("nope.jsonl: no such file", "pass the output of `minitrain tokenize`")),
    Row("train", "data file is empty", _train(data=f"{W}/empty.jsonl"),
        ("empty.jsonl: the file is empty", "tokenize some data first")),
    Row("train", "tokenized file with a malformed line", _train(data=f"{W}/bad.jsonl"),
        ("bad.jsonl:4: malformed JSON", "fix or delete that line, or re-run `minitrain tokenize`")),
    Row("train", "token ids outside the model's vocabulary", _train(data=f"{W}/big-vocab.jsonl"),
        ("token id", "does not fit the vocabulary", "(64 ids)", "tokenize with this model's tokenizer")),
    Row("train", "every sample longer than --max-tokens-per-gpu", _train("--max-tokens-per-gpu", "3"),
        ("every sample is longer than --max-tokens-per-gpu 3",
         "raise --max-tokens-per-gpu or add --truncate")),
    Row("train", "--batch-size 0", _train("--batch-size", "0"),
        ("--batch-size must be a positive integer, got 0",)),
    Row("train", "--batch-size -8", _train("--batch-size", "-8"),
        ("--batch-size must be a positive integer, got -8",)),
    Row("train", "--max-tokens-per-gpu 0", _train("--max-tokens-per-gpu", "0"),
        ("--max-tokens-per-gpu must be a positive integer, got 0",)),
    Row("train", "unknown --lr-scheduler", _train("--lr-scheduler", "wsd"),
        ("--lr-scheduler must be one of constant_with_warmup, cosine, linear, constant", "'wsd'")),
    Row("train", "unknown --fsdp-sharding-strategy", _train("--fsdp-sharding-strategy", "ZERO3"),
        ("--fsdp-sharding-strategy must be one of FULL_SHARD", "'ZERO3'")),
    Row("train", "--model-name-or-path does not exist", _train(model=f"{W}/nomodel"),
        ("nomodel: no such folder", "check the path")),
    Row("train", "--model-name-or-path org/typo (a typo'd Hub id), offline mode on", _train(model="org/typo"),
        ("org/typo: no such folder, and not in the local Hugging Face cache",
         "offline mode: HF_HUB_OFFLINE=1", "check the spelling, or pass a local model folder")),
    Row("train", "--model-name-or-path folder without config.json", _train(model=f"{W}/emptydir"),
        ("emptydir: the folder has no config.json", "pass a model folder")),
    Row("train", "model is not a causal LM (T5 config)", _train(model=f"{W}/t5"),
        ("is a 't5' model, not a causal LM", "pass a decoder-only model")),
    Row("train", "model is an encoder (BERT config)", _train(model=f"{W}/bert"),
        ("is a 'bert' model, not a causal LM", "pass a decoder-only model")),
    Row("train", "model whose head soft-caps its logits (Gemma 2)", _train(model=f"{W}/gemma2"),
        ("scales its logits (final_logit_softcapping=30.0)",
         "pass a model whose head is a plain linear layer")),
    Row("train", "model folder without weights (and no --from-scratch)", _train(model=f"{W}/config-only"),
        ("no weights there", "add --from-scratch")),
    Row("train", "--output-dir under an existing file", _train(out=f"{W}/afile/out"),
        ("--output-dir", "cannot create it (Not a directory)", "choose a writable folder")),
    Row("train", "--output-dir already holds a run", _train(out=f"{W}/prev-run"),
        ("already holds a run", "add --resume to continue it, --overwrite to replace it")),
    Row("train", "--resume with no checkpoint", _train("--resume", "latest", out=f"{W}/fresh"),
        ("--resume: no complete checkpoint", "start without --resume")),
    Row("train", "--resume and --overwrite", _train("--resume", "latest", "--overwrite"),
        ("--resume continues the run", "--overwrite replaces it; give one")),
    Row("train", "two stop criteria", _train("--max-steps", "10", "--max-epochs", "1"),
        ("give at most one stop criterion, not --max-steps and --max-epochs",)),
    Row("train", "cosine schedule without a stop criterion", _train("--lr-scheduler", "cosine"),
        ("needs --max-steps, --max-samples or --max-epochs", "or use constant_with_warmup")),
    Row("train", "--nproc 0", _train("--nproc", "0"), ("--nproc must be a positive integer, got 0",)),
    Row("train", "--nproc larger than the GPUs present", _train("--nproc", "4"),
        ("--nproc 4 but only 2 GPUs are visible", "use --nproc 2 or fewer"), gpus=2),
    Row("train", "--load-in-4bit without a GPU", _train("--lora-rank", "4", "--load-in-4bit"),
        ("--load-in-4bit (QLoRA) needs a CUDA GPU", "Drop the flag"), gpus=0),
    Row("train", "--load-in-4bit without bitsandbytes", _train("--lora-rank", "4", "--load-in-4bit"),
        ("--load-in-4bit needs bitsandbytes", "pip install 'minitrain[qlora]'"), gpus=1,
        missing="bitsandbytes"),
    Row("train", "--load-in-4bit without --lora-rank", _train("--load-in-4bit"),
        ("--load-in-4bit trains an adapter: add --lora-rank R",)),
    Row("train", "--base-adapter without --lora-rank", _train("--base-adapter", f"{W}/model"),
        ("--base-adapter trains an adapter: add --lora-rank R",)),
    Row("train", "--merge-lora without --lora-rank", _train("--merge-lora"),
        ("--merge-lora trains an adapter: add --lora-rank R",)),
    Row("train", "--load-in-4bit with --merge-lora",
        _train("--lora-rank", "4", "--load-in-4bit", "--merge-lora"),
        ("--load-in-4bit with --merge-lora", "merge the saved adapter into the full-precision base")),
    Row("train", "--load-in-4bit with --from-scratch",
        _train("--lora-rank", "4", "--load-in-4bit", "--from-scratch"),
        ("--load-in-4bit with --from-scratch", "QLoRA quantizes pretrained weights")),
    Row("train", "--load-in-4bit with --cpu-offload",
        _train("--lora-rank", "4", "--load-in-4bit", "--cpu-offload"),
        ("--load-in-4bit with --cpu-offload", "drop --cpu-offload")),
    Row("train", "--compile on a GPU without Triton", _train("--compile"),
        ("--compile on a GPU needs Triton", "pip install triton, or drop --compile"), gpus=1,
        missing="triton"),
    Row("train", "--eval-every-samples without --eval-data-path", _train("--eval-every-samples", "4"),
        ("--eval-every-samples needs --eval-data-path TOK.jsonl or --validation-split F",)),
    Row("train", "--validation-split outside (0, 1)", _train("--validation-split", "1.5"),
        ("--validation-split must be a fraction between 0 and 1 (exclusive), got 1.5",)),
    Row("train", "--validation-split with --eval-data-path",
        _train("--validation-split", "0.2", "--eval-data-path", f"{W}/d.jsonl"),
        ("--validation-split holds out part of --data-path", "pass one of them")),
    Row("train", "--validation-split with --objective dpo",
        _train("--validation-split", "0.2", "--objective", "dpo", data=f"{W}/pairs-tok.jsonl"),
        ("--validation-split does not split preference pairs yet", "pass --eval-data-path")),
    Row("train", "--validation-split too small to hold out one sample", _train("--validation-split", "0.05"),
        ("--validation-split 0.05 of 8 samples holds out none", "raise it to at least 0.125")),
    Row("train", "--save-best-val-loss without an eval set", _train("--save-best-val-loss"),
        ("--save-best-val-loss keeps the export with the lowest eval loss: it needs an eval set",)),
    Row("train", "--lora-rank 0", _train("--lora-rank", "0"), ("--lora-rank must be positive, got 0",)),
    Row("train", "unknown --report-to", _train("--report-to", "comet"),
        ("--report-to must be one of none, tensorboard, wandb, mlflow; got 'comet'",)),
    Row("train", "--report-to none with a tracker", _train("--report-to", "none", "--report-to", "wandb"),
        ("--report-to none with another tracker",)),
    Row("train", "--report-to wandb without wandb", _train("--report-to", "wandb"),
        ("--report-to wandb needs the wandb package", "pip install 'minitrain[wandb]'"), missing="wandb"),
    Row("train", "a plan whose predicted peak cannot fit the GPU's memory", _train(), gpus=1, gpu_bytes=2**16,
        says=("the plan needs ~", "MiB per GPU of 0.1 MiB",
              "with --activation-checkpointing at the longest sample",
              "add GPUs (--nproc, --nnodes) or use LoRA/QLoRA")),
    Row("train", "--dry-run-report without --dry-run", _train("--dry-run-report", f"{W}/plan.json"),
        ("--dry-run-report needs --dry-run",)),
    Row("train", "--beta1 1.0", _train("--beta1", "1.0"), ("--beta1 must be in [0, 1), got 1.0",)),
    Row("train", "--eps 0", _train("--eps", "0"), ("--eps must be a positive number, got 0.0",)),
    Row("train", "--save-dtype fp8", _train("--save-dtype", "fp8"),
        ("--save-dtype must be one of fp32, bf16, fp16; got 'fp8'",)),
    Row("train", "--max-tokens 0", _train("--max-tokens", "0"), ("--max-tokens must be a positive integer",)),
    Row("train", "--max-tokens with --lr-scheduler cosine",
        _train("--max-tokens", "1000", "--lr-scheduler", "cosine"),
        ("--lr-scheduler cosine decays to 0", "needs --max-steps, --max-samples or --max-epochs",
         "--max-tokens gives no step count in advance")),
    Row("train", "--lr-scheduler-kwargs that is not JSON", _train("--lr-scheduler-kwargs", "{num_cycles: 1}"),
        ("--lr-scheduler-kwargs is not valid JSON", """write a JSON object such as '{"num_cycles": 0.5}'""")),
    Row("train", "--lr-scheduler-kwargs with an argument the schedule does not take",
        _train("--lr-scheduler", "cosine", "--max-steps", "3", "--lr-scheduler-kwargs", '{"cycles": 1}'),
        ("cosine has no argument 'cycles'", "it takes num_cycles")),
    Row("tokenize", "a tokenizer with its own code, without --trust-remote-code",
        (f"{W}/in.jsonl", "-o", f"{W}/t.jsonl", "--model-name-or-path", f"{W}/custom-tokenizer"),
        ("custom-tokenizer: it ships its own tokenizer code", "add --trust-remote-code")),
    Row("train", "a model with its own code, without --trust-remote-code",
        _train("--from-scratch", model=f"{W}/custom-model"),
        ("custom-model ships its own model code", "add --trust-remote-code")),
    Row("train", "--config file does not exist", _train("--config", f"{W}/nope.yaml"),
        ("--config", "nope.yaml: no such file")),
    Row("train", "--config file with a misspelt key", _train("--config", f"{W}/cfg-typo.yaml"),
        ("cfg-typo.yaml: unknown key 'max-tokens-per-gpus'", "did you mean max_tokens_per_gpu?")),
    Row("train", "--config file with a value of the wrong type", _train("--config", f"{W}/cfg-type.yaml"),
        ("cfg-type.yaml: key 'batch_size' must be an integer, got 1.5",)),
    Row("train", "--config file that is not valid YAML", _train("--config", f"{W}/cfg-bad.yaml"),
        ("cfg-bad.yaml: not valid YAML at line",)),
    Row("train", "--config file that is not a mapping", _train("--config", f"{W}/cfg-list.json"),
        ("cfg-list.json: expected a mapping of flag names to values",)),
    Row("train", "--config file of an unknown type", _train("--config", f"{W}/run.toml"),
        ("unknown file type '.toml'", "name it .yaml, .yml or .json")),
    # -------------------------------------------------------------------------------------------- plot
    Row("plot", "run directory does not exist", (f"{W}/norun",),
        ("norun does not exist", "pass a training output directory or a metrics .jsonl file")),
    Row("plot", "metrics file is empty", (f"{W}/run-empty",),
        ("training_metrics_0.jsonl is empty", "try again later or use --watch")),
    Row("plot", "unknown --metric", (f"{W}/run-ok", "-m", "accuracy"),
        ("unknown metric 'accuracy'", "available: loss, lr, step")),
    Row("plot", "malformed line in the middle of the metrics", (f"{W}/run-bad",),
        ("training_metrics_0.jsonl:2: not a JSON line", "fix or delete that line")),
    Row("plot", "-o with an unknown image type", (f"{W}/run-ok", "-o", f"{W}/curves.jpg2"),
        ("unknown image type '.jpg2'", "end it in .png, .svg, .pdf")),
    # -------------------------------------------------------------------------------------------- demo
    Row("demo", "--output-dir under an existing file", ("--output-dir", f"{W}/afile/demo"),
        ("--output-dir", "cannot create it (Not a directory)", "choose a writable folder")),
    Row("demo", "--nproc 0", ("--output-dir", f"{W}/demo", "--nproc", "0"),
        ("--nproc must be a positive integer, got 0",)),
    Row("demo", "--output-dir holds a previous demo, no --overwrite", ("--output-dir", f"{W}/demo-done"),
        ("demo-done already holds a demo run", "add --overwrite to replace it")),
    Row("demo", "--output-dir is a non-empty folder that is not a demo's", ("--output-dir", f"{W}/prev-run"),
        ("prev-run is not empty and holds no demo run", "choose a new or empty folder")),
]  # fmt: skip

# Rows run again as real processes, to prove `main` renders them as one line (one per command, and the
# FILE:LINE rows, whose messages are the longest).
RENDERED = [
    "tokenize: input file does not exist",
    "inspect: tokenized file with a malformed line",
    "train: tokenized file with a malformed line",
    "train: --batch-size 0",
    "train: --model-name-or-path org/typo (a typo'd Hub id), offline mode on",
    "plot: unknown --metric",
    "train: --config file with a misspelt key",
]


def _good_conversation() -> str:
    return json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The files every row points at."""
    from transformers import BertConfig, T5Config

    w = tmp_path_factory.mktemp("bad-input")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=64)).save_pretrained(w / "model")
    tiny_llama_config(vocab_size=64).save_pretrained(w / "config-only")
    T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2).save_pretrained(w / "t5")
    BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(w / "bert")
    tiny_softcapped_config().save_pretrained(w / "gemma2")  # final_logit_softcapping=30 by default
    for name in ("t5", "bert", "gemma2"):  # a real one has weights: the cheap check for them must pass
        (w / name / "model.safetensors").write_bytes(b"")
    (w / "emptydir").mkdir()
    data = write_tokenized(w / "d.jsonl", num=8, vocab=64, seed=0)
    write_tokenized(w / "big-vocab.jsonl", num=8, vocab=500, seed=0)
    lines = data.read_text().splitlines()
    lines[3] = '{"input_ids": [1, 2'  # line 4: cut short, as a crashed writer leaves it
    (w / "bad.jsonl").write_text("\n".join(lines) + "\n")
    (w / "empty.jsonl").write_text("")
    remote_code_model(w / "custom-model")
    remote_code_tokenizer(w / "custom-tokenizer")
    (w / "cfg-typo.yaml").write_text("max-tokens-per-gpus: 64\n")
    (w / "cfg-type.yaml").write_text("batch_size: 1.5\n")
    (w / "cfg-bad.yaml").write_text("batch_size: [1\n")
    (w / "cfg-list.json").write_text('["--batch-size", 8]')
    (w / "run.toml").write_text("batch_size = 8\n")
    (w / "tok-typo.yaml").write_text("max_sample_tokens: 64\n")
    (w / "afile").write_text("a file, not a folder\n")
    (w / "in.jsonl").write_text(_good_conversation() + "\n")
    (w / "in-odd.jsonl").write_text('{"text": "hi", "label": 1}\n')
    (w / "in-odd2.jsonl").write_text('{"text": "hi", "label": 1}\n' * 2)
    side = {"input_ids": [1, 2], "labels": [-100, 2], "len": 2, "num_loss_counted_tokens": 1}
    pair = {"chosen": side, "rejected": side, "prompt_len": 1, "source_line": 1}
    (w / "pairs-tok.jsonl").write_bytes(orjson.dumps(pair) + b"\n")
    (w / "pairs-tok.meta.json").write_bytes(
        orjson.dumps({"format": "minitrain.tokenized", "kind": "preference", "counts": {"pairs": 1}})
    )
    shutil.copy(w / "pairs-tok.jsonl", w / "pairs-nosidecar.jsonl")  # the kind is read off its first line
    (w / "pairs-bad.jsonl").write_bytes(
        orjson.dumps({"chosen": side, "prompt_len": 1, "source_line": 1}) + b"\n"
    )
    shutil.copy(w / "pairs-tok.meta.json", w / "pairs-bad.meta.json")
    if importlib.util.find_spec("pyarrow") is not None:  # the `datasets` extra; its rows skip without it
        import pyarrow
        import pyarrow.parquet as pq

        pq.write_table(pyarrow.Table.from_pylist([{"text": "hi", "label": 1}]), w / "text.parquet")
    (w / "prefs.jsonl").write_text(
        '{"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": []}\n' * 2
    )
    (w / "in-bad.jsonl").write_text(_good_conversation() + "\n{broken\n" + _good_conversation() + "\n")
    if SMOLLM2.is_dir():
        shutil.copytree(SMOLLM2, w / "tok-no-template")
        config_file = w / "tok-no-template" / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config.pop("chat_template", None)
        config_file.write_text(json.dumps(config))
    (w / "prev-run" / "checkpoints").mkdir(parents=True)
    (w / "demo-done").mkdir()
    (w / "demo-done" / ".minitrain-demo").write_text("")
    (w / "prev-run" / "training_metrics_0.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for name, text in (
        ("run-empty", ""),
        ("run-ok", '{"step": 1, "loss": 1.0, "lr": 1e-5}\n{"step": 2, "loss": 0.9, "lr": 1e-5}\n'),
        ("run-bad", '{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.8}\n'),
    ):
        (w / name).mkdir()
        (w / name / "training_metrics_0.jsonl").write_text(text)
    return w


def _fill(args, ws: Path) -> list[str]:
    return [a.replace(W, str(ws)) for a in args]


def _args(row: Row, ws: Path) -> list[str]:
    return [row.command, *_fill(row.args, ws)]


@pytest.fixture
def no_launch(monkeypatch):
    """A row that passed every check would start torchrun or the demo's training: fail instead."""

    def refuse(*args, **kwargs):
        raise AssertionError("the bad input was not refused: training was launched")

    monkeypatch.setattr("minitrain.train.launch.run_command", refuse)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_row(row: Row, ws: Path, no_launch, monkeypatch):
    if (TOKENIZER in row.args or f"{W}/tok-no-template" in row.args) and not SMOLLM2.is_dir():
        pytest.skip(f"fixture tokenizer {SMOLLM2} is absent")
    if f"{W}/text.parquet" in row.args and not (ws / "text.parquet").is_file():
        pytest.skip("pyarrow (the datasets extra) is not installed")
    if row.gpus is not None:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: row.gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: row.gpus)
        if row.gpu_bytes is not None:
            props = type("Props", (), {"total_memory": row.gpu_bytes})()
            monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.delenv("MINITRAIN_QLORA_ON_CPU", raising=False)  # the tests' CPU QLoRA seam stays shut here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub-id rows name the variable; never ask the network
    if row.missing is not None:
        import importlib.util

        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == row.missing else find_spec(name, *a)
        )
    result = CliRunner().invoke(app, _args(row, ws))
    assert isinstance(result.exception, UserError), (result.exception, result.output)
    message = str(result.exception)
    assert "\n" not in message, message
    for fragment in row.says:
        assert fragment in message, message
    assert result.exit_code == 1


def _minitrain(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minitrain", *args], capture_output=True, text=True,
        env=outside_any_launch(**env), timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("row", [r for r in ROWS if r.id in RENDERED], ids=lambda r: r.id)
def test_rendered_as_one_line(row: Row, ws: Path):
    if TOKENIZER in row.args and not SMOLLM2.is_dir():
        pytest.skip(f"fixture tokenizer {SMOLLM2} is absent")
    done = _minitrain(_args(row, ws), HF_HUB_OFFLINE="1")
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("minitrain: error: "), done.stderr
    assert done.stderr.endswith("\n") and done.stderr.count("\n") == 1, done.stderr  # one line, no traceback
    for fragment in row.says:
        assert fragment in done.stderr


def test_rows_cover_every_command_with_unique_ids():
    ids = [r.id for r in ROWS]
    assert len(set(ids)) == len(ids)
    assert set(RENDERED) <= set(ids)
    assert {r.command for r in ROWS} == {"tokenize", "inspect", "train", "plot", "demo"}


def test_debug_switch_shows_the_traceback(ws: Path):
    done = _minitrain(["train", *_fill(_train("--batch-size", "0"), ws)], MINITRAIN_DEBUG="1")
    assert done.returncode == 1 and "Traceback" in done.stderr and "UserError" in done.stderr


# ------------------------------------------------------------------ degraded but valid: exit 0, warned once


@pytest.fixture(scope="module")
def cpu_run_with_degraded_flags(ws: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """One real 1-step run on one CPU process with --use-liger-kernels, a budget some samples exceed and a
    warm-up longer than the run."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --use-liger-kernels is not degraded here")
    out = ws / "degraded"
    args = ["train", *_train("--from-scratch", "--use-liger-kernels", "--max-steps", "1", "--batch-size", "4",
            "--max-tokens-per-gpu", "24", "--num-warmup-steps", "5", out=str(out))]  # fmt: skip
    filled = _fill(args, ws)
    done = run_minitrain(filled, env=outside_any_launch())  # --nproc 1: trains in this process
    return done, out


WARNINGS = [
    ("--use-liger-kernels without a GPU", "minitrain: warning: --use-liger-kernels needs a GPU; using the "
     "chunked cross-entropy instead"),
    ("some samples longer than --max-tokens-per-gpu", "samples are longer than --max-tokens-per-gpu 24 and "
     "will be skipped (raise it to train them, or add --truncate)"),
    ("--max-steps below --num-warmup-steps", "minitrain: warning: the run stops after 1 steps, before the 5 "
     "warm-up steps end: the learning rate never reaches --learning-rate 5e-06 (lower --num-warmup-steps)"),
]  # fmt: skip


@pytest.mark.parametrize(("did", "warning"), WARNINGS, ids=[d for d, _ in WARNINGS])
def test_degraded_flags_warn_once_and_train(cpu_run_with_degraded_flags, did: str, warning: str):
    done, out = cpu_run_with_degraded_flags
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count(warning) == 1, done.stderr  # on stderr, once (not once per rank or per step)
    assert warning not in done.stdout
    [line] = [line for line in done.stderr.splitlines() if warning in line]
    assert line.startswith("minitrain: warning: ")
    metrics = [orjson.loads(x) for x in (out / "training_metrics_0.jsonl").read_bytes().splitlines() if x]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 1 and 0 < losses[0] < 10  # the chunked loss trained: ln(64) ~ 4.16 at the start
    assert (out / "hf_format").is_dir()


def test_more_cpu_processes_than_cores_warns_once(ws: Path, monkeypatch, capsys):
    """`--nproc` above the usable cores on the CPU: one warning line, and the run goes ahead."""
    import torch

    import minitrain.train.launch as launch
    import minitrain.train.preflight as preflight

    launched = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(preflight, "usable_cores", lambda: 2)
    monkeypatch.setattr(launch, "run_command", lambda cmd, env=None: launched.append(cmd) or 0)
    args = _fill(_train("--from-scratch", "--max-steps", "1", out=f"{W}/oversubscribed"), ws)
    args[args.index("--nproc") + 1] = "3"
    app(args=["train", *args], standalone_mode=False)
    err = capsys.readouterr().err
    warning = (
        "minitrain: warning: --nproc 3 CPU processes on 2 usable cores: they take turns and every step gets "
    )
    assert err.count(warning) == 1 and "use --nproc 2 or fewer" in err, err
    assert len(launched) == 1
