"""Config files (`--config run.yaml`): read a YAML or JSON mapping of flag values, check every key and type.

A config file holds one key per flag of the command, spelled like the flag (`max-tokens-per-gpu`) or
snake_case (`max_tokens_per_gpu`); flags given on the command line override it (the CLI hands the checked
values to Typer as the command's `default_map`, so a flag on the command line wins). A run's
`OUT/training_params.json` is itself a valid `train` config: its record-keeping keys
(`TRAINING_PARAMS_EXTRAS`: versions, world size, dates, the data summary, the launch history) are
ignored by design, and its field names that differ from a flag (`base_adapters`) are aliases.

Trade-off: types are checked here, strictly, against the kind of each flag (an integer flag refuses 1.5
and "8"; a float flag takes 3 or 3.0), instead of letting the command-line parser convert strings, which
would turn 1.5 into 1 without a word. JSON needs nothing beyond the standard library; YAML needs PyYAML,
imported only when a `.yaml`/`.yml` file is read. No torch here: a bad config answers at once.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minitrain.errors import UserError

YAML_SUFFIXES = (".yaml", ".yml")

# Keys of OUT/training_params.json that record the run rather than set it (minitrain.rundir and
# Preflight.params write them); a config file may hold them and they are ignored.
TRAINING_PARAMS_EXTRAS = frozenset(
    {
        "world_size",
        "minitrain_version",
        "torch_version",
        "transformers_version",
        "python_version",
        "created",
        "resumed_from",
        "launches",
        "num_samples",
        "num_samples_too_long",
        "num_samples_truncated",
        "num_samples_held_out",
        "num_tokens_truncated",
        "tokenizer_source",
    }
)

# the value kinds of the commands' flags; "json": a flag taking a JSON object, written in the file as a
# mapping (or as the JSON text)
KINDS = ("integer", "float", "boolean", "text", "path", "json")


@dataclass(frozen=True)
class Key:
    """One config key: the command parameter it sets, the kind of its value, and whether it is a list."""

    param: str  # the command's parameter name (what `default_map` is keyed by)
    kind: str  # one of KINDS
    multiple: bool = False  # a repeatable flag: the value is a list


def read_config_file(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML (.yaml/.yml) or JSON file; a one-line UserError otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as err:
        raise UserError(f"--config {path}: cannot read it as text ({type(err).__name__})") from None
    if path.suffix.lower() in YAML_SUFFIXES:
        data = _load_yaml(path, text)
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"--config {path}: not valid JSON ({err})") from None
    else:
        raise UserError(f"--config {path}: unknown file type {path.suffix!r}; name it .yaml, .yml or .json")
    if data is None:
        data = {}  # an empty YAML file: no settings
    if not isinstance(data, dict):
        raise UserError(
            f"--config {path}: expected a mapping of flag names to values at the top level, "
            f"got {type(data).__name__}"
        )
    return data


def _load_yaml(path: Path, text: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise UserError(
            f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or write the file as JSON"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise UserError(f"--config {path}: not valid YAML{line} ({problem})") from None


def resolve_config(
    data: Mapping[str, Any], keys: Mapping[str, Key], *, path: Path, ignored: Iterable[str] = ()
) -> dict[str, Any]:
    """The `default_map` of `data`: {parameter name: checked value}.

    `keys` maps every accepted snake_case spelling to its `Key`; a key may also be written with dashes
    (and a leading `--`). Keys in `ignored` are dropped (said once in the module docstring and the docs).
    A null value means "the flag's default". Unknown keys, a key given twice (two spellings) and values of
    the wrong kind are one-line UserErrors naming the file and the key.
    """
    ignored = frozenset(ignored)
    out: dict[str, Any] = {}
    given: dict[str, str] = {}  # parameter -> the key that set it
    for raw, value in data.items():
        name = str(raw).removeprefix("--").replace("-", "_")
        if name in ignored:
            continue
        key = keys.get(name)
        if key is None:
            close = difflib.get_close_matches(name, sorted(keys), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "see the command's --help for the flags"
            raise UserError(f"--config {path}: unknown key {raw!r}; {hint}")
        if key.param in given:
            raise UserError(f"--config {path}: {given[key.param]!r} and {raw!r} set the same flag; keep one")
        given[key.param] = str(raw)
        if value is not None:
            out[key.param] = _checked(value, key, raw=str(raw), path=path)
    return out


def _checked(value: Any, key: Key, *, raw: str, path: Path) -> Any:
    """`value` when it is of the key's kind (a list of them for a repeatable flag), else a UserError."""
    if key.multiple:
        items = value if isinstance(value, list) else [value]  # `report_to: wandb` is a one-item list
        return [_checked(item, Key(key.param, key.kind), raw=raw, path=path) for item in items]
    ok = {
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "text": isinstance(value, str),
        "path": isinstance(value, str),
        "json": isinstance(value, (str, dict)),
    }[key.kind]
    if not ok:
        expected = {
            "integer": "an integer",
            "float": "a number",
            "boolean": "true or false",
            "text": "a string",
            "path": "a path (a string)",
            "json": "a mapping (or its JSON text)",
        }[key.kind]
        raise UserError(
            f"--config {path}: key {raw!r} must be {expected}, got {value!r} ({type(value).__name__})"
        )
    if key.kind == "json" and isinstance(value, dict):
        return json.dumps(value)  # the flag's own spelling: the config checks it like a command-line value
    return float(value) if key.kind == "float" else value
