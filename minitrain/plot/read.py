"""Which runs `minitrain plot` reads: each run's metrics file (through `minitrain.rundir`) and its legend
name."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from minitrain.errors import UserError
from minitrain.rundir import METRICS_FILE, MetricsFile, metrics_path


def run_names(paths: Sequence[Path]) -> list[str]:
    """Legend names: the directory name (or file stem), with parents prepended until they differ."""
    full = []
    for p in paths:
        p = p.resolve()
        if p.is_file() and p.name == METRICS_FILE:
            p = p.parent
        parts = [p.name if p.is_dir() or p.suffix != ".jsonl" else p.stem, *reversed(p.parent.parts)]
        full.append([part for part in parts if part not in ("", "/")] or [str(p)])
    depth = [1] * len(full)
    while True:
        names = ["/".join(reversed(parts[:d])) for parts, d in zip(full, depth, strict=True)]
        grow = [  # the same name, a different path: show one more parent
            i
            for i, n in enumerate(names)
            if depth[i] < len(full[i]) and any(m == n and full[j] != full[i] for j, m in enumerate(names))
        ]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # the same path given twice
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n} ({seen[n]})"
    return names


@dataclass
class Runs:
    """The metrics files of several runs, read together, with their legend names."""

    files: list[MetricsFile]
    names: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, paths: Sequence[Path], *, wait: bool = False) -> Runs:
        files = []
        for run in paths:
            path = metrics_path(run)
            if not wait and not path.exists():
                raise UserError(
                    f"{run} has no {METRICS_FILE}; "
                    "pass a directory written by 'minitrain train' or a metrics .jsonl"
                )
            files.append(MetricsFile(path))
        return cls(files, run_names(paths))

    def refresh(self) -> bool:
        return any([f.refresh() for f in self.files])  # a list: refresh every file, not the first changed

    def rows(self) -> list[tuple[str, list[dict]]]:
        """(legend name, rows) per run, as `build_curves` takes them."""
        return list(zip(self.names, [f.rows for f in self.files], strict=True))
