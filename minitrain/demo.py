"""`minitrain demo`: the whole pipeline on embedded assets, offline, on the CPU, in a couple of minutes.

Owns the synthetic dataset (arithmetic questions and answers in chat form, generated from a seed) and the
demo pipeline: write the dataset, `tokenize` it with the shipped tiny tokenizer (minitrain/assets/demo/,
built by scripts/build_demo_assets.py), show one sample with its trained tokens highlighted, train a tiny
Llama from its config with torchrun, and draw the loss curve in the terminal. Trade-off: the model is far
too small to learn arithmetic reliably in a minute; what it does learn quickly - the answer's format and
the operands it repeats - is enough to make the loss fall clearly, which is what the demo must show.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from minitrain.errors import UserError

_QUESTIONS = (
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "How much is {a} {word} {b}?",
    "Please calculate {a} {op} {b}.",
    "{a} {op} {b} = ?",
)
_OPS = {
    "+": ("plus", lambda a, b: a + b),
    "-": ("minus", lambda a, b: a - b),
    "*": ("times", lambda a, b: a * b),
}


DEMO_MARKER = ".minitrain-demo"  # written first into a demo's folder: what --overwrite may replace
DEMO_PARTS = ("data", "run")  # everything else a demo writes lives under these


def default_output_dir() -> Path:
    """Where `minitrain demo` writes by default: $XDG_CACHE_HOME/minitrain/demo, else
    ~/.cache/minitrain/demo."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "minitrain" / "demo"


def prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Claim `output_dir` for a demo: new or empty, or a previous demo's with --overwrite (one-line errors).

    --overwrite removes only what a demo wrote (the `data/` and `run/` folders of a folder that holds the
    demo's marker file); a folder with other content and no marker is never touched.
    """
    from minitrain.train.preflight import check_output_dir

    check_output_dir(output_dir)
    contents = [p.name for p in output_dir.iterdir()]
    if DEMO_MARKER in contents:
        if not overwrite:
            raise UserError(
                f"--output-dir {output_dir} already holds a demo run; add --overwrite to replace it, or "
                "choose another --output-dir"
            )
        for part in DEMO_PARTS:
            shutil.rmtree(output_dir / part, ignore_errors=True)
    elif contents:
        raise UserError(
            f"--output-dir {output_dir} is not empty and holds no demo run ({len(contents)} other entries); "
            "choose a new or empty folder"
        )
    (output_dir / DEMO_MARKER).write_text(
        "written by `minitrain demo`; --overwrite replaces data/ and run/\n"
    )


def assets_dir() -> Path:
    """minitrain/assets/demo: the tiny tokenizer (with a chat template) and the tiny model config."""
    return Path(str(resources.files("minitrain") / "assets" / "demo"))


def arithmetic_conversations(num: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """`num` chat records {"messages": [user, assistant]}: a question about two numbers below 100 and its
    answer."""
    rng = random.Random(seed)
    for _ in range(num):
        op = rng.choice(tuple(_OPS))
        word, fn = _OPS[op]
        a, b = rng.randrange(100), rng.randrange(100 if op != "*" else 13)
        question = rng.choice(_QUESTIONS).format(a=a, b=b, op=op, word=word)
        answer = f"{a} {op} {b} = {fn(a, b)}."
        yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_dataset(path: Path, num: int, seed: int = 0) -> Path:
    """Write the arithmetic chat dataset as JSONL (the shape `minitrain tokenize` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for record in arithmetic_conversations(num, seed):
            f.write(orjson.dumps(record) + b"\n")
    return path


@dataclass(frozen=True)
class DemoResult:
    """Where the demo put everything, and what the loss did."""

    output_dir: Path
    dataset: Path
    tokenized: Path
    run_dir: Path
    checkpoint: Path | None
    first_loss: float
    last_loss: float
    steps: int
    seconds: float


def run_demo(
    output_dir: Path | None = None,
    *,
    overwrite: bool = False,
    nproc: int = 2,
    num_samples: int = 5000,
    max_steps: int = 300,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    console: Console | None = None,
) -> DemoResult:
    """Generate, tokenize, inspect one sample, train from scratch with torchrun, plot the loss; return the
    paths.

    `output_dir` defaults to `default_output_dir()`; a previous demo there is replaced only with `overwrite`.
    """
    from minitrain.config import TokenizeConfig, TrainConfig
    from minitrain.data.pipeline import render_summary, tokenize_file
    from minitrain.rundir import METRICS_FILE, read_metrics
    from minitrain.train.launch import run_training

    console = console or Console()
    start = time.perf_counter()
    output_dir = Path(output_dir or default_output_dir()).expanduser().resolve()
    for flag, value in (("--nproc", nproc), ("--max-steps", max_steps)):  # before minutes of data work
        if value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    prepare_output_dir(output_dir, overwrite)
    model_dir = assets_dir()
    console.rule("[bold]1. data")
    dataset = write_dataset(output_dir / "data" / "arithmetic.messages.jsonl", num_samples)
    console.print(f"wrote {num_samples} synthetic arithmetic conversations to {dataset}")
    console.rule("[bold]2. tokenize")
    tokenized = output_dir / "data" / "arithmetic.tokenized.jsonl"
    summary = tokenize_file(
        TokenizeConfig(
            input_file=dataset, output_file=tokenized, model_name_or_path=str(model_dir), num_workers=1
        )
    )
    render_summary(summary, console)
    _show_sample(tokenized, model_dir, console)
    console.rule(
        f"[bold]3. train a tiny Llama from scratch on {nproc} CPU process{'es' if nproc > 1 else ''}"
    )
    run_dir = output_dir / "run"
    config = TrainConfig(
        data_path=tokenized,
        model_name_or_path=str(model_dir),
        output_dir=run_dir,
        nproc=nproc,
        batch_size=batch_size,
        max_tokens_per_gpu=1024,
        learning_rate=learning_rate,
        num_warmup_steps=10,
        lr_scheduler="cosine",
        max_steps=max_steps,
        from_scratch=True,
        seed=0,
    )
    code = run_training(config)
    if code != 0:
        raise UserError(f"demo training failed (exit {code}); see the messages above")
    records = read_metrics(run_dir / METRICS_FILE)
    checkpoints = sorted((run_dir / "hf_format").glob("samples_*"), key=lambda p: int(p.name.split("_")[1]))
    console.rule("[bold]4. loss curve")
    _plot_loss(run_dir, console)
    if checkpoints:
        console.rule("[bold]5. the trained checkpoint answers new questions (transformers, greedy)")
        _ask(checkpoints[-1], console)
    return DemoResult(
        output_dir=output_dir,
        dataset=dataset,
        tokenized=tokenized,
        run_dir=run_dir,
        checkpoint=checkpoints[-1] if checkpoints else None,
        first_loss=records[0]["loss"],
        last_loss=records[-1]["loss"],
        steps=len(records),
        seconds=time.perf_counter() - start,
    )


def _show_sample(tokenized: Path, tokenizer_dir: Path, console: Console) -> None:
    """One tokenized sample with its trained tokens highlighted (what `minitrain inspect` shows)."""
    from transformers import AutoTokenizer

    from minitrain.data.format import iter_samples
    from minitrain.inspect.render import render_sample

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    _, sample = next(iter_samples(tokenized))
    console.print("one sample (trained tokens highlighted; the rest is context the loss ignores):")
    special = set(tokenizer.all_special_ids)
    render_sample(console, tokenizer, 0, sample, special, tokens=False, color=console.is_terminal)


def _ask(checkpoint: Path, console: Console, num: int = 4) -> None:
    """Load the exported checkpoint with stock transformers and answer questions it has not seen."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of the answers
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    for record in arithmetic_conversations(num, seed=2**31 - 1):  # another seed than the training set's
        question, expected = (m["content"] for m in record["messages"])
        prompt = tokenizer.apply_chat_template(
            [record["messages"][0]], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(
                **prompt, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        right = expected.rpartition("= ")[2].rstrip(".")
        mark = "[green]right[/]" if answer == expected else f"[yellow](it is {right})[/]"
        console.print(f"  {question:<30} {answer:<18} {mark}", highlight=False)


def _plot_loss(run_dir: Path, console: Console) -> None:
    """The loss curve in the terminal (`minitrain plot RUN --metric loss`)."""
    from minitrain.config import PlotConfig
    from minitrain.plot import plot

    result = plot(PlotConfig(runs=(run_dir,), metrics=("loss",)))
    if result.terminal is not None:
        console.print(result.terminal)
