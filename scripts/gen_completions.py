"""Write completions/minitrain.{bash,zsh,fish} from the CLI (run after changing commands).

The scripts are Typer's shims: the shell asks `minitrain` itself for candidates (with
`_MINITRAIN_COMPLETE=complete_<shell>` set), so they stay right as flags change, and answering stays fast
because importing the CLI imports no torch. tests/cli/test_completions.py regenerates and diffs them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from typer.completion import get_completion_script

SHELLS = ("bash", "zsh", "fish")


def completion_scripts() -> dict[str, str]:
    """Shell name -> completion script text for the `minitrain` command."""
    return {
        shell: get_completion_script(
            prog_name="minitrain", complete_var="_MINITRAIN_COMPLETE", shell=shell
        ).rstrip()
        + "\n"
        for shell in SHELLS
    }


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for shell, text in completion_scripts().items():
        (out_dir / f"minitrain.{shell}").write_text(text)
        print(f"wrote {out_dir / f'minitrain.{shell}'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "completions")
