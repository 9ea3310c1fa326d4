"""The datasets people have -> minitrain's `messages` records: record shapes, field mapping, file readers.

Record shapes (detected per line/row, in this order; a record matching none is rejected naming its keys):

    messages JSONL     {"messages": [{"role", "content", ...}], "tools"?, any other keys (ignored)}
    ShareGPT           {"conversations": [{"from", "value"}], "system"?, "tools"?}
    Alpaca             {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
    prompt/generation  {"prompt", "generation"} (passed to the encoder unchanged)

Preference pairs (a line with `chosen` or `rejected`; `to_pair_record`, encoded by data/preference.py):

    conversational     {"prompt": [messages], "chosen": [assistant message(s)], "rejected": [...], "system"?,
                        "tools"?}
    plain strings      {"prompt": "text", "chosen": "text", "rejected": "text"}
    shared prefix      {"chosen": [full conversation], "rejected": [full conversation]}: the messages before
                       the first one that differs are the prompt (compared as parsed JSON)

A file holds one kind: its first line that parses as a JSON object decides (pairs or not); lines of the
other kind are rejected ("mixed kinds"). With `--messages-field` every line is an SFT record (that flag
names where its conversation is, e.g. `chosen`), so no line is a pair.

Role names (ShareGPT and mapped layouts; `--user-role` & co add more):

    human, user -> user    gpt, assistant -> assistant    system -> system    observation, tool -> tool
    function_call -> an assistant turn whose `tool_calls` are the call(s) in its value (JSON: one
                     {"name", "arguments"} object or a list of them)

Alpaca: user = instruction, then a blank line and `input` when `input` is not empty; assistant = output;
`history` pairs come first, `system` (when not empty) before them. A ShareGPT `tools` string (LLaMA-Factory
stores a JSON string) is parsed into the list the chat template receives. A `chat_template_kwargs` object on
a line of any chat shape (pairs too) goes with it: the encoder renders that line with those names.

Field mapping for other layouts (axolotl's `field_messages` / `message_property_mappings` / `roles`):
`--messages-field` names the list of turns, `--role-field`/`--content-field` the keys inside each turn
(default: `role`/`content`, else `from`/`value`), `--user-role`/`--assistant-role`/`--system-role` map
data role names onto ours. Keys of a turn other than role and content are kept (e.g. `train`).

Readers: JSONL is read by `minitrain.data.pipeline` (bytes, one line at a time). Parquet files, Arrow files
(IPC file or stream format), `datasets.save_to_disk` folders and `--dataset NAME[:split]` are read here as
chunks of (1-based row number, the row as one JSON line), the same chunks the JSONL reader yields, so the
worker pool and everything after it are unchanged and a row's number is its `source_line`. Streaming:
Parquet is read one batch at a time (`iter_batches`), Arrow files one record batch at a time (counted
beforehand through a memory map, which touches only the batch headers), so memory stays flat whatever the
file size (an Arrow file written as one giant record batch is read as that batch). The trade-off: each row
is serialised to JSON once in the parent and parsed again in a worker (cheap next to tokenizing it), in
exchange for one code path.
pyarrow and datasets (the `datasets` extra) are imported only when such an input is read.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from minitrain.data.chat import (
    EMPTY_RESPONSE,
    MISSING_SIDE,
    NO_KNOWN_SHAPE,
    NON_STRING_CONTENT,
    UNKNOWN_ROLE,
    SampleRejected,
)
from minitrain.data.format import SIDE_KEYS
from minitrain.errors import UserError

if TYPE_CHECKING:
    from minitrain.config import TokenizeConfig

Chunk = list[tuple[int, bytes]]  # (1-based line or row number, one JSON object as bytes)

FUNCTION_CALL = "function_call"  # a ShareGPT role that becomes assistant tool_calls
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
    FUNCTION_CALL: FUNCTION_CALL,
}
ROW_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}
DATASETS_EXTRA = "pip install 'minitrain[datasets]'"


@dataclass(frozen=True)
class FieldMapping:
    """Where the turns, roles and contents are in a record, and extra role names (data name -> our role)."""

    messages_field: str | None = None
    role_field: str | None = None
    content_field: str | None = None
    roles: tuple[tuple[str, str], ...] = ()

    @property
    def is_default(self) -> bool:
        return self == DEFAULT_MAPPING


DEFAULT_MAPPING = FieldMapping()  # the default layouts (messages, ShareGPT, Alpaca, prompt/generation)


def field_mapping(config: TokenizeConfig) -> FieldMapping:
    """The mapping the tokenize flags describe (--messages-field, --role-field, ..., --system-role)."""
    roles = [
        (name, role) for role in ("user", "assistant", "system") for name in getattr(config, f"{role}_role")
    ]
    return FieldMapping(config.messages_field, config.role_field, config.content_field, tuple(roles))


def to_chat_record(record: Any, mapping: FieldMapping | None = None) -> Any:
    """Any supported record shape -> the record `ChatEncoder.encode` reads; SampleRejected when none fits."""
    mapping = mapping or DEFAULT_MAPPING
    if not isinstance(record, dict):
        raise SampleRejected(NO_KNOWN_SHAPE, f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record and mapping.is_default:
        return record  # our own shape: unchanged (extra keys are ignored by the encoder)
    roles = {**ROLE_ALIASES, **dict(mapping.roles)}
    if mapping.messages_field is not None:
        if mapping.messages_field not in record:
            raise SampleRejected(
                NO_KNOWN_SHAPE, f"no `{mapping.messages_field}` (--messages-field); saw keys: {_keys(record)}"
            )
        turns = _turns(record[mapping.messages_field], mapping, roles)
        return _with_system_and_tools({"messages": turns}, record)
    if "messages" in record:
        return {**record, "messages": _turns(record["messages"], mapping, roles)}
    if "conversations" in record:
        return _with_system_and_tools({"messages": _turns(record["conversations"], mapping, roles)}, record)
    if "instruction" in record and "output" in record:
        return _alpaca(record)
    if "prompt" in record and "generation" in record:
        return record
    raise SampleRejected(
        NO_KNOWN_SHAPE,
        "expected `messages`, `conversations` (ShareGPT), `instruction`+`output` (Alpaca) or "
        f"`prompt`+`generation`; saw keys: {_keys(record)} (name yours with --messages-field)",
    )


def is_pair_record(record: Any, mapping: FieldMapping | None = None) -> bool:
    """True when a parsed line is a preference pair (has `chosen` or `rejected`) and no --messages-field."""
    if mapping is not None and mapping.messages_field is not None:
        return False
    return isinstance(record, dict) and any(k in record for k in SIDE_KEYS)


def to_pair_record(record: dict[str, Any], mapping: FieldMapping | None = None) -> dict[str, Any]:
    """A pair line in any of its shapes -> {"prompt", "chosen", "rejected", "tools"?}: all strings (plain)
    or all lists of messages (prompt may be empty for a shared-prefix pair whose first message differs).

    Shape checks only; the roles of the response messages and the tokens are checked by the encoder.
    """
    mapping = mapping or DEFAULT_MAPPING
    missing = [k for k in SIDE_KEYS if record.get(k) is None]
    if missing:
        raise SampleRejected(MISSING_SIDE, f"no `{missing[0]}`; a pair needs both `chosen` and `rejected`")
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        for key, side in (("chosen", chosen), ("rejected", rejected)):
            if not side.strip():
                raise SampleRejected(EMPTY_RESPONSE, f"`{key}` is empty")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if not all(isinstance(x, list) for x in (chosen, rejected)) or not isinstance(prompt, (list, type(None))):
        kinds = ", ".join(f"{k}: {type(record.get(k)).__name__}" for k in ("prompt", *SIDE_KEYS))
        raise SampleRejected(
            NO_KNOWN_SHAPE,
            "a pair's `prompt`, `chosen` and `rejected` must be all strings or all lists of messages "
            f"({kinds})",
        )
    roles = {**ROLE_ALIASES, **dict(mapping.roles)}
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if not side:
            raise SampleRejected(EMPTY_RESPONSE, f"`{key}` is an empty list")
    chosen, rejected = _turns(chosen, mapping, roles), _turns(rejected, mapping, roles)
    if prompt is None:  # shared prefix: the prompt is everything before the first differing message
        shared = next(
            (i for i, (c, r) in enumerate(zip(chosen, rejected, strict=False)) if c != r),
            min(len(chosen), len(rejected)),
        )
        for key, side in (("chosen", chosen), ("rejected", rejected)):
            if shared == len(side):
                raise SampleRejected(
                    EMPTY_RESPONSE,
                    f"`{key}` is the shared prefix of both conversations ({shared} messages): no response",
                )
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    elif prompt:
        prompt = _turns(prompt, mapping, roles)
    out = _with_system_and_tools({"messages": prompt}, record)
    return {"prompt": out.pop("messages"), "chosen": chosen, "rejected": rejected, **out}


def _keys(record: dict[str, Any]) -> str:
    keys = list(record)
    return ", ".join(keys[:12]) + (f", ... ({len(keys)} keys)" if len(keys) > 12 else "") if keys else "none"


def _turns(items: Any, mapping: FieldMapping, roles: dict[str, str]) -> list[dict[str, Any]]:
    """A list of turns in any role/content spelling -> our messages (function calls -> tool_calls)."""
    if not isinstance(items, list) or not items or not all(isinstance(m, dict) for m in items):
        raise SampleRejected(NO_KNOWN_SHAPE, "the list of turns must be a non-empty list of objects")
    messages = []
    for i, item in enumerate(items):
        role_key = mapping.role_field or ("role" if "role" in item else "from")
        content_key = mapping.content_field or (
            "content" if "content" in item or "from" not in item else "value"
        )
        name = item.get(role_key)
        role = roles.get(name) if isinstance(name, str) else None
        if role is None:
            raise SampleRejected(
                UNKNOWN_ROLE,
                f"message {i}: {role_key} {name!r} (known: {', '.join(sorted(roles))}; "
                "map yours with --user-role, --assistant-role or --system-role)",
            )
        rest = {k: v for k, v in item.items() if k not in (role_key, content_key)}
        content = item.get(content_key)
        if role == FUNCTION_CALL:
            messages.append(
                {**rest, "role": "assistant", "content": "", "tool_calls": _tool_calls(i, content)}
            )
        else:
            messages.append({**rest, "role": role, "content": content})
    return messages


def _tool_calls(i: int, value: Any) -> list[dict[str, Any]]:
    """A function_call turn's value (JSON text or object: {"name", "arguments"} or a list) -> tool_calls."""
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise SampleRejected(NO_KNOWN_SHAPE, f"message {i}: function_call value is not JSON") from None
    calls = value if isinstance(value, list) else [value]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise SampleRejected(
            NO_KNOWN_SHAPE,
            f'message {i}: function_call value must be {{"name", "arguments"}} or a list of them',
        )
    return [
        {"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
        for c in calls
    ]


def _with_system_and_tools(out: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """Add a record-level `system` prompt (first message), `tools` (JSON text parsed) and
    `chat_template_kwargs` (checked by the encoder) to `out`."""
    system = record.get("system")
    if system not in (None, ""):
        if not isinstance(system, str):
            raise SampleRejected(NON_STRING_CONTENT, f"`system` is {type(system).__name__}")
        out["messages"] = [{"role": "system", "content": system}, *out["messages"]]
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = orjson.loads(tools) if tools.strip() else None
        except orjson.JSONDecodeError:
            raise SampleRejected(NO_KNOWN_SHAPE, "`tools` is a string but not JSON") from None
    if tools:
        out["tools"] = tools
    if record.get("chat_template_kwargs") is not None:
        out["chat_template_kwargs"] = record["chat_template_kwargs"]
    return out


def _alpaca(record: dict[str, Any]) -> dict[str, Any]:
    """instruction (+ blank line + input), output, optional system and history -> messages."""
    instruction, extra = record["instruction"], record.get("input")
    if not isinstance(instruction, str) or not isinstance(extra, (str, type(None))):
        raise SampleRejected(NON_STRING_CONTENT, "`instruction` and `input` must be strings")
    messages = []
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(h, (list, tuple)) and len(h) == 2 for h in history
    ):
        raise SampleRejected(NO_KNOWN_SHAPE, "`history` must be a list of [user, assistant] pairs")
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    keep = {key: record.get(key) for key in ("system", "chat_template_kwargs")}  # Alpaca's `tools`: none
    return _with_system_and_tools({"messages": messages}, keep)


# ------------------------------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class RowSource:
    """A table-shaped input (Parquet, Arrow, save_to_disk folder, Hub dataset): where, what and how many
    rows."""

    label: str  # what messages and the sidecar call it
    kind: str  # parquet | arrow | save_to_disk | dataset
    num_rows: int
    files: tuple[Path, ...] = ()  # Parquet/Arrow files, read in order
    dataset: Any = None  # a datasets.Dataset (--dataset)


def is_row_input(path: Path) -> bool:
    """True when `path` is read as rows (Parquet, Arrow, a save_to_disk folder) rather than as JSONL."""
    return path.is_dir() or path.suffix.lower() in ROW_SUFFIXES


def open_rows(path: Path | None, dataset: str | None) -> RowSource:
    """Open a Parquet/Arrow file, a save_to_disk folder or `--dataset NAME[:split]`; UserError when it
    cannot."""
    if dataset is not None:
        return _open_dataset(dataset)
    assert path is not None
    pa = _import("pyarrow", str(path))
    if path.is_dir():
        return _open_saved(path, pa)
    kind = ROW_SUFFIXES[path.suffix.lower()]
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return RowSource(str(path), kind, pq.ParquetFile(path).metadata.num_rows, (path,))
        return RowSource(str(path), kind, _arrow_table(path, pa).num_rows, (path,))
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{path}: not a readable {kind} file ({_first_line(err)}); check the file") from None


def read_row_chunks(source: RowSource, chunk_rows: int) -> Iterator[Chunk]:
    """The rows as chunks of (1-based row number, JSON bytes), in order, `chunk_rows` at a time."""
    row_no = 0
    for batch in _batches(source, chunk_rows):
        rows = batch.to_pylist()
        yield [(row_no + i, _dumps(row)) for i, row in enumerate(rows, 1)]
        row_no += len(rows)


def check_columns(source: RowSource, mapping: FieldMapping) -> None:
    """UserError when no column can hold a conversation (every row would be rejected as "no known shape")."""
    columns = _columns(source)
    if mapping.messages_field is not None:
        if mapping.messages_field not in columns:
            raise UserError(
                f"{source.label}: no column `{mapping.messages_field}` (--messages-field); its columns are "
                f"{', '.join(columns) or 'none'}; pass the column that holds the conversation"
            )
        return
    shapes = (
        ("messages",),
        ("conversations",),
        ("instruction", "output"),
        ("prompt", "generation"),
        ("chosen", "rejected"),
    )
    if not any(all(c in columns for c in shape) for shape in shapes):
        raise UserError(
            f"{source.label}: no conversation column (messages, conversations, instruction+output, "
            f"prompt+generation or chosen+rejected); its columns are {', '.join(columns) or 'none'}; "
            "name yours with --messages-field"
        )


def _batches(source: RowSource, chunk_rows: int) -> Iterator[Any]:
    """Record batches of at most `chunk_rows` rows, one in memory at a time, in file and row order."""
    if source.kind == "dataset":
        yield from source.dataset.with_format("arrow").iter(batch_size=chunk_rows)
        return
    import pyarrow as pa

    for path in source.files:
        if source.kind == "parquet":
            import pyarrow.parquet as pq

            yield from pq.ParquetFile(path).iter_batches(batch_size=chunk_rows)
        else:
            yield from _arrow_batches(path, pa, chunk_rows)


def _arrow_batches(path: Path, pa: Any, chunk_rows: int) -> Iterator[Any]:
    """An Arrow file's record batches read one at a time (not mapped: RSS stays one batch), sliced."""
    with pa.OSFile(str(path)) as f:
        try:
            reader = pa.ipc.open_file(f)
            batches: Iterator[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            f.seek(0)
            batches = iter(pa.ipc.open_stream(f))
        for batch in batches:
            for start in range(0, batch.num_rows, chunk_rows):
                yield batch.slice(start, chunk_rows)


def _columns(source: RowSource) -> list[str]:
    if source.kind == "dataset":
        return list(source.dataset.column_names)
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(source.files[0]).schema_arrow.names)
    import pyarrow as pa

    return list(_arrow_table(source.files[0], pa).column_names)


def _arrow_table(path: Path, pa: Any) -> Any:
    """A memory-mapped Arrow file (IPC file format, or the stream format `datasets` writes) as a Table.

    Used for row counts and column names: zero-copy, so only the headers of the batches are read.
    """
    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()


def _open_saved(folder: Path, pa: Any) -> RowSource:
    """A `Dataset.save_to_disk` folder (state.json + Arrow files); a DatasetDict folder names its splits."""
    if (folder / "dataset_dict.json").is_file():
        splits = orjson.loads((folder / "dataset_dict.json").read_bytes()).get("splits", [])
        raise UserError(
            f"{folder}: a DatasetDict folder with splits {', '.join(splits)}; give one split's folder, "
            f"e.g. {folder / (splits[0] if splits else 'train')}"
        )
    state_file = folder / "state.json"
    if not state_file.is_file():
        raise UserError(
            f"{folder}: a folder, but not a `datasets.save_to_disk` folder (no state.json); "
            "give a JSONL, Parquet or Arrow file, or a save_to_disk folder"
        )
    state = orjson.loads(state_file.read_bytes())
    files = tuple(folder / f["filename"] for f in state.get("_data_files", []))
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise UserError(
            f"{folder}: state.json lists missing Arrow files ({', '.join(missing)}); save it again"
        )
    return RowSource(str(folder), "save_to_disk", sum(_arrow_table(f, pa).num_rows for f in files), files)


def _open_dataset(spec: str) -> RowSource:
    """`--dataset NAME[:split]` through `datasets.load_dataset`, from its cache (offline unless asked).

    Never a network wait: unless HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set (to 0, to allow downloads),
    minitrain sets both to 1 before importing `datasets`, so a dataset missing from the cache is one
    immediate error instead of a minute of retries on a machine without network.
    """
    name, _, split = spec.partition(":")
    if not name:
        raise UserError(f"--dataset {spec!r}: no name; give NAME or NAME:split, e.g. tatsu-lab/alpaca:train")
    _import("pyarrow", f"--dataset {spec}")
    if all(os.environ.get(v) is None for v in OFFLINE_VARS):
        for var in OFFLINE_VARS:
            os.environ[var] = "1"
    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in OFFLINE_VARS)
    datasets = _import("datasets", f"--dataset {spec}")
    try:
        loaded = datasets.load_dataset(name, split=split or None)
    except (
        Exception
    ) as err:  # the library raises ConnectionError, FileNotFoundError, ValueError, ... for "not there"
        where = "in the datasets cache (read offline)" if offline else "locally or on the Hub"
        raise UserError(
            f"--dataset {spec}: not found {where} ({_first_line(err)}); download it once "
            f"(python -c \"import datasets; datasets.load_dataset('{name}')\"), set HF_DATASETS_OFFLINE=0 "
            "to let minitrain download it, or give a local file"
        ) from None
    if not split:
        splits = list(loaded)
        if "train" not in splits and len(splits) != 1:
            raise UserError(f"--dataset {name}: splits {', '.join(splits)}; choose one with {name}:SPLIT")
        split = "train" if "train" in splits else splits[0]
        loaded = loaded[split]
    return RowSource(f"{name}:{split}", "dataset", loaded.num_rows, dataset=loaded)


OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def _import(module: str, what: str) -> Any:
    """Import an optional package of the `datasets` extra, or UserError naming the extra."""
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what}: reading it needs {module}; {DATASETS_EXTRA}")
    return importlib.import_module(module)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _dumps(row: dict[str, Any]) -> bytes:
    """One row as a JSON object (numpy scalars, dates as JSON; other odd values, e.g. bytes, as their
    text)."""
    return orjson.dumps(row, default=str, option=orjson.OPT_SERIALIZE_NUMPY)
