"""The `--config FILE` option of `train` and `tokenize`: a file's values become the command's defaults.

The option is eager, so Typer handles it before every other flag; its callback reads and checks the file
(`minitrain.configfile`) and installs the values as the context's `default_map`, the command-line parser's
own layer between a flag given on the command line and the flag's default. So a flag on the command line
always wins over the file, and a required flag (`--data-path`) may come from the file.

The accepted keys come from the command function's signature, the one place the flags are declared: each
option's parameter name and its long spellings (`output_file` for `-o/--output/--output-file`), with the
kind of value read from its type hint. Positional arguments are not keys (tokenize's `input_file` is).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import typer
from typer.models import OptionInfo

from minitrain.configfile import Key, read_config_file, resolve_config

_KINDS = {int: "integer", float: "float", bool: "boolean", str: "text", Path: "path"}


def config_keys(command: Callable[..., Any], aliases: Mapping[str, str] | None = None) -> dict[str, Key]:
    """Every accepted snake_case key of `command`'s options -> its `Key`; `aliases` (key -> parameter name)
    add spellings such as training_params.json's field names."""
    keys: dict[str, Key] = {}
    for name, hint in typing.get_type_hints(command, include_extras=True).items():
        if typing.get_origin(hint) is not typing.Annotated:
            continue
        base, *meta = typing.get_args(hint)
        info = next((m for m in meta if isinstance(m, OptionInfo)), None)
        if info is None or name == "config_file":
            continue
        key = _key(name, base, json=info.metavar == "JSON")
        decls = [*info.param_decls, *([info.default] if isinstance(info.default, str) else [])]
        spellings = {name}
        for decl in decls:
            for part in str(decl).split("/"):
                if part.startswith("--") and not part.startswith("--no-"):
                    spellings.add(part[2:].replace("-", "_"))
        for spelling in spellings:
            keys[spelling] = key
    for alias, param in (aliases or {}).items():
        keys[alias] = next(k for k in keys.values() if k.param == param)
    return keys


def _key(name: str, hint: Any, *, json: bool = False) -> Key:
    """The `Key` of parameter `name` with type hint `hint` (`int | None`, `list[Path] | None`, `bool`...);
    `json`: a text flag whose value is a JSON object (metavar JSON)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
    base = args[0] if len(args) == 1 else hint
    multiple = typing.get_origin(base) is list
    if multiple:
        base = typing.get_args(base)[0]
    return Key(param=name, kind="json" if json else _KINDS[base], multiple=multiple)


def apply_config_file(
    ctx: typer.Context,
    path: Path | None,
    *,
    command: Callable[..., Any],
    aliases: Mapping[str, str] | None = None,
    ignored: Iterable[str] = (),
) -> None:
    """Read `path` (when given) and make its checked values the defaults of `ctx`'s flags."""
    if path is None or ctx.resilient_parsing:  # shell completion parses without running callbacks' effects
        return
    values = resolve_config(read_config_file(path), config_keys(command, aliases), path=path, ignored=ignored)
    ctx.default_map = {**(ctx.default_map or {}), **values}
