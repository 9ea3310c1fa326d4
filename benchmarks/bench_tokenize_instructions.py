"""Instructions per sample of the tokenize stage against the floor, counted by valgrind: no timing noise.

    python benchmarks/bench_tokenize_instructions.py [--tokenizer qwen3] [--data fastchat] [--out PATH]

CPU-seconds on a shared machine swing by a third between runs (bench_tokenize.py's trade-off); the
instructions a pass executes do not (about 1% between runs). Each variant runs in a fresh interpreter under
`valgrind --tool=cachegrind` with one pass and with two passes over the fixture lines (each distinct line
once); the difference is one warm pass (imports, the encoder and the first pass's word cache left out):
  floor   one render + one batched encode per line, no mask (bench_tokenize.floor_work)
  stage   the stage's per-line work, `pipeline.encode_lines`: parse, mask, verify, serialize (no file I/O,
          no workers)
The encoder is loaded once here and handed to the children pickled, as the workers get it.
The trade-off: an instruction is not a CPU-second. Interpreted code (the masks, Jinja) retires fewer
instructions per cycle than the tokenizer's Rust encode, so the stage's time ratio to the floor is higher
than its instruction ratio; use this to compare two versions of the code, bench_tokenize.py for time.
Needs valgrind on PATH.
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_tokenize import FIXTURES, fixture_lines, floor_work  # noqa: E402


def child(mode: str, passes: int, encoder_file: Path, data: str) -> None:
    """The work counted: `passes` passes of `mode` over the fixture lines."""
    from minitrain.data.pipeline import Policy, encode_lines

    encoder = pickle.loads(encoder_file.read_bytes())
    lines = fixture_lines(data)
    for _ in range(passes):
        if mode == "floor":
            floor_work(encoder, lines)
        else:
            result = encode_lines(encoder, Policy(), list(enumerate(lines, 1)))
            assert not result.rejects, result.rejects[:1]
    print(len(lines))


def instructions(mode: str, passes: int, encoder_file: Path, data: str) -> tuple[int, int]:
    """(instructions executed, lines) of one child run under cachegrind."""
    with tempfile.NamedTemporaryFile(suffix=".out") as out:
        run = subprocess.run(
            ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out.name}",
             sys.executable, __file__, "--child", mode, str(passes), str(encoder_file), "--data", data],
            capture_output=True, text=True,
        )  # fmt: skip
        if run.returncode:  # the child's own last line (its error), not this process's traceback
            last = (run.stderr.strip() or "no message").splitlines()[-1]
            sys.exit(f"bench_tokenize_instructions: the {mode} run failed: {last}")
        summary = next(
            line for line in Path(out.name).read_text().splitlines() if line.startswith("summary:")
        )
    return int(summary.split()[1]), int(run.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="qwen3", help="a fixture tokenizer's name, or a folder")
    parser.add_argument("--data", default="fastchat", help="fixture files whose name starts with this")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "tokenize_instructions.json"
    )
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PASSES", "ENCODER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, passes, encoder_file = args.child
        return child(mode, int(passes), Path(encoder_file), args.data)
    if shutil.which("valgrind") is None:
        sys.exit("bench_tokenize_instructions: needs valgrind on PATH (apt install valgrind)")

    import orjson
    from rich.console import Console
    from rich.table import Table

    from minitrain.data.probe import load_chat_encoder

    tokenizer = Path(args.tokenizer)
    if not tokenizer.is_dir():
        tokenizer = FIXTURES / "tokenizers" / args.tokenizer
    if not tokenizer.is_dir():
        sys.exit(
            f"bench_tokenize_instructions: no tokenizer folder {args.tokenizer} (nor in {tokenizer.parent})"
        )
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        encoder_file = Path(tmp) / "encoder.pkl"
        encoder_file.write_bytes(pickle.dumps(load_chat_encoder(str(tokenizer)).encoder))
        for mode in ("floor", "stage"):
            one, lines = instructions(mode, 1, encoder_file, args.data)
            two, _ = instructions(mode, 2, encoder_file, args.data)
            rows[mode] = {"lines": lines, "instructions_per_pass": two - one, "per_line": (two - one) / lines}
    ratio = rows["stage"]["per_line"] / rows["floor"]["per_line"]
    table = Table(title=f"tokenize, {tokenizer.name}, {args.data or 'all'} data: one warm pass, instructions")
    for column in ("variant", "lines", "instructions per line", "vs the floor"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for mode, row in rows.items():
        table.add_row(
            mode,
            f"{row['lines']:,}",
            f"{row['per_line']:,.0f}",
            f"{row['per_line'] / rows['floor']['per_line']:.2f}x",
        )
    Console(width=120).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(
        orjson.dumps(
            {"tokenizer": str(tokenizer), "data": args.data, "rows": rows, "stage_over_floor": ratio},
            option=orjson.OPT_INDENT_2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
