"""Tests for minitrain/cli/tokenize.py: both command-line spellings, errors, --strict, the --help surface."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from minitrain.cli import app
from minitrain.data.format import iter_samples, read_sidecar, rejects_path
from minitrain.errors import UserError
from tests.conftest import DATA, QWEN3, REPO, SMOLLM2, TINYLLAMA, needs_fixtures

pytestmark = needs_fixtures
runner = CliRunner()
GOOD = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]}'


def test_help_lists_every_flag():
    result = runner.invoke(app, ["tokenize", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for flag in (
        "INPUT",
        "--dataset",
        "--messages-field",
        "--role-field",
        "--content-field",
        "--user-role",
        "--assistant-role",
        "--system-role",
        "--output",
        "-o",
        "--output-file",
        "--input-file",
        "--model-name-or-path",
        "--max-sample-num-tokens",
        "--chat-template",
        "--num-workers",
        "--strict",
        "--train-on",
        "--split-turns",
        "--trust-remote-code",
        "--chat-template-kwargs",
        "--config",
    ):
        assert flag in result.output, flag


def test_positional_spelling(tmp_path):
    out = tmp_path / "out.jsonl"
    inp = tmp_path / "alpaca.jsonl"
    inp.write_bytes(
        b"".join((DATA / "alpaca_en_demo.messages.jsonl").read_bytes().splitlines(keepends=True)[:100])
    )
    result = runner.invoke(
        app,
        ["tokenize", str(inp), "-o", str(out), "--model-name-or-path", str(TINYLLAMA), "--num-workers", "1"],
    )
    assert result.exit_code == 0, result.output
    assert "lines read" in result.output and "100" in result.output
    assert sum(1 for _ in iter_samples(out)) == 100
    assert read_sidecar(out)["counts"]["written"] == 100


def test_a_second_run_says_it_replaced_the_output(tmp_path):
    """tokenize writes OUT without a flag; when OUT was there, the summary says the new one replaced it."""
    out, inp = tmp_path / "out.jsonl", tmp_path / "in.jsonl"
    inp.write_text(GOOD + "\n")
    args = ["tokenize", str(inp), "-o", str(out), "--model-name-or-path", str(SMOLLM2), "--num-workers", "1"]
    wide = {"COLUMNS": "400"}  # the summary's console wraps at the terminal's width, paths included
    first = runner.invoke(app, args, env=wide)
    assert first.exit_code == 0, first.output
    assert f"wrote {out} (sidecar" in first.output and "replacing" not in first.output
    inp.write_text(GOOD + "\n" + GOOD + "\n")
    second = runner.invoke(app, args, env=wide)
    assert second.exit_code == 0, second.output
    assert f"wrote {out}, replacing the previous one (sidecar" in second.output
    assert sum(1 for _ in iter_samples(out)) == 2


def test_chat_template_kwargs_reach_every_render_and_the_sidecar(tmp_path):
    """Qwen3 with '{"enable_thinking": false}' (as an inference server passes it): the empty think block
    is the prompt's, so only the answer is trained; the flag (or a config file's mapping) is recorded."""
    from transformers import AutoTokenizer

    inp = tmp_path / "in.jsonl"
    inp.write_text(GOOD + "\n")
    trained = {}
    for name, extra in (
        ("default", []),
        ("off", ["--chat-template-kwargs", '{"enable_thinking": false}']),
    ):
        out = tmp_path / f"{name}.jsonl"
        args = [
            "tokenize",
            str(inp),
            "-o",
            str(out),
            "--model-name-or-path",
            str(QWEN3),
            "--num-workers",
            "1",
        ]
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
        ((_, sample),) = iter_samples(out)
        trained[name] = [
            t for t, label in zip(sample["input_ids"], sample["labels"], strict=True) if label >= 0
        ]
        assert read_sidecar(out)["config"]["chat_template_kwargs"] == (extra[1] if extra else None)
    tok = AutoTokenizer.from_pretrained(str(QWEN3))
    assert tok.decode(trained["default"]).startswith("<think>\n\n</think>\n\n")  # the model writes it
    assert "<think>" not in tok.decode(trained["off"])  # the prompt holds it
    assert tok.decode(trained["default"]).endswith(tok.decode(trained["off"]))
    config = tmp_path / "c.yaml"
    config.write_text("chat_template_kwargs:\n  enable_thinking: false\n")
    out = tmp_path / "from-config.jsonl"
    args = ["tokenize", str(inp), "-o", str(out), "--model-name-or-path", str(QWEN3), "--num-workers", "1"]
    result = runner.invoke(app, [*args, "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert (out.read_bytes(), read_sidecar(out)["config"]["chat_template_kwargs"]) == (
        (tmp_path / "off.jsonl").read_bytes(),
        '{"enable_thinking": false}',
    )


def test_trust_remote_code_reaches_the_tokenizer(tmp_path, monkeypatch):
    """A tokenizer with its own class: refused in one line without the flag, tokenized with it."""
    from tests.data.test_tokenizer import remote_code_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = remote_code_tokenizer(tmp_path / "custom")
    (tmp_path / "in.jsonl").write_text(GOOD + "\n")
    args = ["tokenize", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
            "--model-name-or-path", str(tokenizer), "--num-workers", "1"]  # fmt: skip
    refused = runner.invoke(app, args)
    assert isinstance(refused.exception, UserError) and "add --trust-remote-code" in str(refused.exception)
    result = runner.invoke(app, [*args, "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert [s["source_line"] for _, s in iter_samples(tmp_path / "out.jsonl")] == [1]


def test_mini_trainer_spelling_in_process(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(GOOD + "\n{broken\n")
    out = tmp_path / "out.jsonl"
    args = [
        "tokenize",
        "--input-file",
        str(inp),
        "--output-file",
        str(out),
        "--model-name-or-path",
        str(SMOLLM2),
        "--max-sample-num-tokens",
        "32768",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [s["source_line"] for _, s in iter_samples(out)] == [1]
    assert b'"line":2' in rejects_path(out).read_bytes()


def test_mini_trainer_spelling_as_a_subprocess(tmp_path):
    """The exact command mini_trainer users type, through `python -m minitrain` (the real entry point)."""
    inp = tmp_path / "in.jsonl"
    inp.write_text((GOOD + "\n") * 3)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "False", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "minitrain",
        "tokenize",
        "--input-file",
        str(inp),
        "--output-file",
        str(out),
        "--model-name-or-path",
        str(SMOLLM2),
        "--max-sample-num-tokens",
        "32768",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [s["source_line"] for _, s in iter_samples(out)] == [1, 2, 3]


_CLI_RECORDING_THE_START = """
import sys
from minitrain.cli import main
from minitrain.data import pipeline, workers
real, seen = workers.worker_context, []
def recording(*args):
    ctx = real(*args)
    seen.append(ctx.get_start_method())
    return ctx
pipeline.worker_context = workers.worker_context = recording  # the early call and the workers' start
try:
    main()
finally:
    print(*seen, file=sys.stderr)
"""


def test_the_command_forks_its_workers_from_its_one_thread(tmp_path):
    """`minitrain tokenize --num-workers 2` in a fresh process: numpy's BLAS pool kept at one thread (the
    command sets OPENBLAS_NUM_THREADS unless the user did), nothing else starts a thread before the
    workers, so they fork from the command's process instead of from a forkserver."""
    inp = tmp_path / "in.jsonl"
    inp.write_text((GOOD + "\n") * 300)
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"} | {"PYTHONPATH": str(REPO)}
    args = ["tokenize", str(inp), "-o", str(tmp_path / "out.jsonl"), "--model-name-or-path", str(SMOLLM2)]
    done = subprocess.run(
        [sys.executable, "-c", _CLI_RECORDING_THE_START, *args, "--num-workers", "2"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.split()[-2:] == ["fork", "fork"], done.stderr


def test_strict_exit_code_and_one_line_error_through_main(tmp_path, monkeypatch, capsys):
    """`minitrain.cli.main` (the console script) turns the --strict error into one line and exit code 1."""
    from minitrain.cli import main

    inp = tmp_path / "in.jsonl"
    inp.write_text(GOOD + "\n" + '{"messages": [{"role": "robot", "content": "x"}]}\n')
    out = tmp_path / "strict.jsonl"
    argv = [
        "minitrain",
        "tokenize",
        str(inp),
        "-o",
        str(out),
        "--model-name-or-path",
        str(SMOLLM2),
        "--strict",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("MINITRAIN_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{inp}:2: unknown role" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model-name-or-path", "m", "-o", "o.jsonl"], "no input"),
        (
            ["a.jsonl", "--input-file", "b.jsonl", "-o", "o.jsonl", "--model-name-or-path", "m"],
            "either INPUT.jsonl or --input-file",
        ),
        (["a.jsonl", "--model-name-or-path", "m"], "no output"),
        (["a.jsonl", "-o", "o.jsonl"], "no tokenizer"),
        (["missing.jsonl", "-o", "o.jsonl", "--model-name-or-path", "m"], "no such file"),
    ],
)
def test_user_mistakes_are_user_errors(tmp_path, args, message):
    result = runner.invoke(app, ["tokenize", *args])
    assert isinstance(result.exception, UserError), result.output
    assert message in str(result.exception)


def test_strict_names_the_file_and_line(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        GOOD
        + "\n\n"
        + '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}\n'
    )
    result = runner.invoke(
        app,
        [
            "tokenize",
            str(inp),
            "-o",
            str(tmp_path / "o.jsonl"),
            "--model-name-or-path",
            str(SMOLLM2),
            "--strict",
        ],
    )
    assert isinstance(result.exception, UserError)
    assert str(result.exception).startswith(f"{inp}:3: empty assistant content")


def test_chat_template_flag_for_a_tokenizer_without_one(tmp_path):
    import json

    folder = tmp_path / "no-template"
    folder.mkdir()
    for f in SMOLLM2.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    inp = tmp_path / "in.jsonl"
    inp.write_text(GOOD + "\n")
    base = ["tokenize", str(inp), "-o", str(tmp_path / "o.jsonl"), "--model-name-or-path", str(folder)]
    refused = runner.invoke(app, base)
    assert isinstance(refused.exception, UserError) and "--chat-template" in str(refused.exception)
    accepted = runner.invoke(app, [*base, "--chat-template", "chatml"])
    assert accepted.exit_code == 0, accepted.output
    assert read_sidecar(tmp_path / "o.jsonl")["chat_template_origin"] == "chatml"


def test_help_and_a_jsonl_tokenize_import_neither_pyarrow_nor_datasets(tmp_path):
    """The `datasets` extra is imported only for the inputs that need it (and no tracker at all)."""
    inp = tmp_path / "in.jsonl"
    inp.write_text(GOOD + "\n")
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from minitrain.cli import app\n"
        "r = CliRunner()\n"
        "assert r.invoke(app, ['--help']).exit_code == 0\n"
        "assert r.invoke(app, ['tokenize', '--help']).exit_code == 0\n"
        f"res = r.invoke(app, ['tokenize', {str(inp)!r}, '-o', {str(tmp_path / 'o.jsonl')!r}, "
        f"'--model-name-or-path', {str(SMOLLM2)!r}, '--num-workers', '1'])\n"
        "assert res.exit_code == 0, res.output\n"
        "print(','.join(m for m in ('pyarrow', 'datasets', 'wandb', 'mlflow', 'tensorboard') if m in "
        "sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
    assert (tmp_path / "o.jsonl").is_file()


def test_sharegpt_parquet_with_mapping_flags_through_the_cli(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"chat": [{"who": "client", "said": "Hi"}, {"who": "bot", "said": "Hello there."}]}] * 3
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    args = ["tokenize", str(tmp_path / "in.parquet"), "-o", str(tmp_path / "out.jsonl")]
    args += ["--model-name-or-path", str(SMOLLM2), "--num-workers", "1", "--messages-field", "chat"]
    args += [
        "--role-field",
        "who",
        "--content-field",
        "said",
        "--user-role",
        "client",
        "--assistant-role",
        "bot",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    reference = tmp_path / "ref.jsonl"
    reference.write_text(GOOD + "\n" + GOOD + "\n" + GOOD + "\n")
    ref = runner.invoke(
        app,
        [
            "tokenize",
            str(reference),
            "-o",
            str(tmp_path / "ref.tok.jsonl"),
            "--model-name-or-path",
            str(SMOLLM2),
        ]
        + ["--num-workers", "1"],
    )
    assert ref.exit_code == 0, ref.output
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "ref.tok.jsonl").read_bytes()
    assert read_sidecar(tmp_path / "out.jsonl")["config"]["assistant_role"] == ["bot"]


def test_a_preference_file_through_the_cli(tmp_path):
    """The fixture's prompt/chosen/rejected lines: pairs in the summary, the sidecar and OUT.jsonl."""
    from minitrain.data.format import iter_pairs

    head = b"".join((DATA / "dpo_en_demo.preference.jsonl").read_bytes().splitlines(keepends=True)[:5])
    inp = tmp_path / "pairs.jsonl"
    inp.write_bytes(head + b'{"messages": [{"role": "user", "content": "hi"}]}\n')
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["tokenize", str(inp), "-o", str(out), "--model-name-or-path", str(SMOLLM2)])
    assert result.exit_code == 0, result.output
    assert "written (preference pairs)" in result.output and "mixed kinds" in result.output
    meta = read_sidecar(out)
    assert meta["kind"] == "preference" and meta["counts"]["pairs"] == 5
    assert meta["counts"]["rejected_by_reason"] == {"mixed kinds": 1}
    assert [p["source_line"] for _, p in iter_pairs(out)] == [1, 2, 3, 4, 5]
