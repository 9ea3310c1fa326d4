"""Tests for minitrain/data/sources.py: every record shape and file format gives the same tokens and labels.

The reference is the plain `messages` JSONL of the same conversations, tokenized by the unchanged JSONL
path: each other format is written from the same Python conversations, tokenized, and its output lines
(input_ids, labels, source_line) must be byte-for-byte those of the reference.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import orjson
import pytest

from minitrain.config import TokenizeConfig
from minitrain.data import chat, pipeline
from minitrain.data.chat import SampleRejected
from minitrain.data.format import read_sidecar, rejects_path
from minitrain.data.probe import load_chat_encoder
from minitrain.data.sources import FieldMapping, to_chat_record
from minitrain.errors import UserError
from tests.conftest import DATA, QWEN3, REPO, SMOLLM2, needs_fixtures

pytestmark = needs_fixtures
pa = pytest.importorskip("pyarrow", reason="the `datasets` extra (pyarrow) is not installed")
SYSTEM = "You are a terse assistant."


def conversations() -> list[list[dict[str, str]]]:
    """40 multi-turn fixture conversations; every third one gets a system prompt."""
    lines = (DATA / "fastchat_conversations.messages.jsonl").read_bytes().splitlines()[:40]
    convs = [orjson.loads(line)["messages"] for line in lines]
    return [([{"role": "system", "content": SYSTEM}] if i % 3 == 0 else []) + c for i, c in enumerate(convs)]


SHAREGPT_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


def as_sharegpt(conv):
    return {"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in conv]}


def as_alpaca(conv):
    system = conv[0]["content"] if conv[0]["role"] == "system" else ""
    turns = [m["content"] for m in conv if m["role"] != "system"]
    pairs = [[turns[i], turns[i + 1]] for i in range(0, len(turns) - 2, 2)]
    return {"instruction": turns[-2], "input": "", "output": turns[-1], "system": system, "history": pairs}


def as_openai(conv, i):
    """An OpenAI-style export: extra keys on the record and on the assistant messages (ignored)."""
    extra = {"refusal": None, "annotations": []}
    messages = [m | extra if m["role"] == "assistant" else m for m in conv]
    return {"id": f"chatcmpl-{i}", "model": "gpt-x", "created": 1700000000 + i, "messages": messages}


def as_mapped(conv):
    """An odd layout: turns under `dialog`, `speaker`/`text` keys, `customer`/`agent`/`rules` role names."""
    names = {"user": "customer", "assistant": "agent", "system": "rules"}
    return {"dialog": [{"speaker": names[m["role"]], "text": m["content"]} for m in conv], "meta": {"k": 1}}


MAPPING = {
    "messages_field": "dialog",
    "role_field": "speaker",
    "content_field": "text",
    "user_role": ("customer",),
    "assistant_role": ("agent",),
    "system_role": ("rules",),
}


def write_jsonl(path, records):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def tokenize(tmp_path, name, tokenizer=SMOLLM2, workers=1, **kwargs):
    out = tmp_path / f"{name}.tok.jsonl"
    config = TokenizeConfig(output_file=out, model_name_or_path=str(tokenizer), num_workers=workers, **kwargs)
    result = pipeline.tokenize_file(config)
    assert result.read == result.written + result.dropped + result.rejected
    return result, out.read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    result, out = tokenize(tmp, "ref", input_file=write_jsonl(tmp / "ref.jsonl", map(wrap, conversations())))
    assert result.written == 40 and result.rejected == 0
    return out


def wrap(conv):
    return {"messages": conv}


@pytest.mark.parametrize(
    ("name", "convert", "mapping"),
    [
        ("sharegpt", as_sharegpt, {}),
        ("alpaca", as_alpaca, {}),
        ("openai", None, {}),
        ("mapped", as_mapped, MAPPING),
    ],
)
def test_record_shapes_give_the_reference_tokens(tmp_path, reference, name, convert, mapping):
    convs = conversations()
    records = [as_openai(c, i) for i, c in enumerate(convs)] if convert is None else list(map(convert, convs))
    _, out = tokenize(tmp_path, name, input_file=write_jsonl(tmp_path / f"{name}.jsonl", records), **mapping)
    assert out == reference


def test_parquet_arrow_and_save_to_disk_give_the_reference_tokens(tmp_path, reference):
    import pyarrow.parquet as pq

    convs = conversations()
    sharegpt = pa.Table.from_pylist([as_sharegpt(c) for c in convs])
    pq.write_table(sharegpt, tmp_path / "d.parquet", row_group_size=7)  # several row groups, odd sizes
    messages = pa.Table.from_pylist([wrap(c) for c in convs])
    with pa.ipc.new_file(tmp_path / "d.arrow", messages.schema) as writer:  # IPC file format
        writer.write_table(messages, max_chunksize=9)
    alpaca = pa.Table.from_pylist([as_alpaca(c) for c in convs])
    with pa.ipc.new_stream(
        tmp_path / "s.arrow", alpaca.schema
    ) as writer:  # stream format (what datasets writes)
        writer.write_table(alpaca, max_chunksize=5)
    for path in ("d.parquet", "d.arrow", "s.arrow"):
        result, out = tokenize(tmp_path, path.replace(".", "-"), input_file=tmp_path / path, workers=2)
        assert out == reference, path
        assert read_sidecar(tmp_path / f"{path.replace('.', '-')}.tok.jsonl")["input_format"] in (
            "parquet",
            "arrow",
        )


def test_save_to_disk_folder(tmp_path, reference):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([as_sharegpt(c) for c in conversations()])
    ds.save_to_disk(tmp_path / "saved", num_shards=3)  # several Arrow files, read in order
    assert len(list((tmp_path / "saved").glob("*.arrow"))) > 1
    _, out = tokenize(tmp_path, "saved", input_file=tmp_path / "saved")
    assert out == reference
    datasets.DatasetDict(train=ds, test=ds).save_to_disk(tmp_path / "dict")
    with pytest.raises(
        UserError, match=r"a DatasetDict folder with splits train, test; give one split's folder"
    ):
        tokenize(tmp_path, "dict", input_file=tmp_path / "dict")


def make_hub_cache(cache, rows, repo="tester/tiny_chat"):
    """A datasets cache holding `repo` as if downloaded once (the layout load_dataset finds offline)."""
    from datasets.packaged_modules.json.json import Json

    src = write_jsonl(cache.parent / "src.jsonl", rows)
    builder = Json(
        cache_dir=str(cache.parent / "build"), dataset_name="tiny_chat", data_files={"train": str(src)}
    )
    builder.download_and_prepare()
    built = next((cache.parent / "build" / "tiny_chat").glob("*/0.0.0"))
    namespace, name = repo.split("/")
    shutil.copytree(built, cache / f"{namespace}___{name}" / "default" / "0.0.0" / "0123456789abcdef")


def test_dataset_from_the_offline_cache_through_the_cli(tmp_path, reference):
    """The real CLI with HF_DATASETS_OFFLINE set: the cached dataset is read; a missing one is one line, at
    once."""
    pytest.importorskip("datasets")
    cache = tmp_path / "cache"
    make_hub_cache(cache, [as_sharegpt(c) for c in conversations()])
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1"}
    base = [
        sys.executable,
        "-m",
        "minitrain",
        "tokenize",
        "--model-name-or-path",
        str(SMOLLM2),
        "--num-workers",
        "1",
    ]
    out = tmp_path / "hub.tok.jsonl"
    done = subprocess.run(
        [*base, "--dataset", "tester/tiny_chat:train", "-o", str(out)], env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()
    assert out.read_bytes() == reference
    assert read_sidecar(out)["input"] == "tester/tiny_chat:train"
    for offline in ({"HF_DATASETS_OFFLINE": "1"}, {}):  # set by the user, or by minitrain when unset
        env = {k: v for k, v in env.items() if k not in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")} | offline
        missing = subprocess.run(
            [*base, "--dataset", "tester/absent", "-o", str(tmp_path / "x.jsonl")],
            env=env,
            capture_output=True,
            timeout=60,  # a network wait would be 5 retries (about 30 s) before the error
        )
        err = missing.stderr.decode().strip().splitlines()
        assert missing.returncode == 1 and len(err) == 1, err
        assert err[0].startswith("minitrain: error: --dataset tester/absent: not found in the datasets cache")
        assert "HF_DATASETS_OFFLINE=0" in err[0]


def test_parquet_without_the_field_is_one_error(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "a", "id": 1}]), tmp_path / "t.parquet")
    with pytest.raises(UserError, match=r"t.parquet: no conversation column .* its columns are text, id"):
        tokenize(tmp_path, "t", input_file=tmp_path / "t.parquet")
    with pytest.raises(UserError, match=r"no column `dialog` \(--messages-field\); its columns are text, id"):
        tokenize(tmp_path, "t", input_file=tmp_path / "t.parquet", messages_field="dialog")


def test_rows_keep_their_row_number_and_the_counts_identity(tmp_path):
    """A rejected row is counted and named by its 1-based row number; order is kept across workers."""
    import pyarrow.parquet as pq

    rows = [as_sharegpt(c) for c in conversations()]
    rows[4] = {"conversations": [{"from": "robot", "value": "x"}]}
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet", row_group_size=3)
    result, out = tokenize(tmp_path, "r", input_file=tmp_path / "r.parquet", workers=2)
    assert (result.read, result.written, result.rejected) == (40, 39, 1)
    assert [orjson.loads(line)["source_line"] for line in out.splitlines()] == [
        i for i in range(1, 41) if i != 5
    ]
    reject = orjson.loads(rejects_path(tmp_path / "r.tok.jsonl").read_bytes())
    assert (reject["line"], reject["reason"]) == (5, chat.UNKNOWN_ROLE) and "'robot'" in reject["detail"]


# ------------------------------------------------------------------------------------------ record mapping


def test_unknown_shape_names_the_keys_it_saw():
    with pytest.raises(SampleRejected) as err:
        to_chat_record({"text": "a", "label": 1})
    assert err.value.reason == chat.NO_KNOWN_SHAPE and "saw keys: text, label" in err.value.detail


def test_messages_records_pass_through_unchanged():
    record = {"messages": [{"role": "user", "content": "x"}], "id": 3}
    assert to_chat_record(record) is record


def test_alpaca_input_follows_the_instruction_after_a_blank_line():
    record = to_chat_record({"instruction": "Translate.", "input": "chat", "output": "cat"})
    assert record == {
        "messages": [
            {"role": "user", "content": "Translate.\n\nchat"},
            {"role": "assistant", "content": "cat"},
        ]
    }


def test_sharegpt_function_call_and_observation_become_tool_calls_and_tool_messages():
    tools = [{"name": "get_weather", "parameters": {"type": "object"}}]
    record = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": '{"temp": "18C"}'},
            {"from": "gpt", "value": "It is 18C."},
        ],
        "tools": orjson.dumps(tools).decode(),  # LLaMA-Factory keeps tools as a JSON string
    }
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    expected = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": '{"temp": "18C"}'},
            {"role": "assistant", "content": "It is 18C."},
        ],
        "tools": tools,
    }
    assert to_chat_record(record) == expected
    # Encoded with Qwen3's real tool-call template: the same tokens and labels as the messages record.
    encoder = load_chat_encoder(str(QWEN3)).encoder
    a, b = encoder.encode(to_chat_record(record)), encoder.encode(expected)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
    assert "<tool_call>" in load_chat_encoder(str(QWEN3)).encoder.render(expected["messages"], tools)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("not json", "function_call value is not JSON"), ('{"arguments": {}}', 'must be {"name", "arguments"}')],
)
def test_bad_function_calls_are_rejected(value, fragment):
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": value}]}
    with pytest.raises(SampleRejected, match=fragment):
        to_chat_record(record)


def test_unknown_role_names_the_mapping_flags():
    with pytest.raises(SampleRejected) as err:
        to_chat_record({"conversations": [{"from": "bot", "value": "x"}]})
    assert err.value.reason == chat.UNKNOWN_ROLE and "--assistant-role" in err.value.detail
    mapped = to_chat_record(
        {"conversations": [{"from": "bot", "value": "x"}]}, FieldMapping(roles=(("bot", "assistant"),))
    )
    assert mapped == {"messages": [{"role": "assistant", "content": "x"}]}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": "a/b", "input_file": "x.jsonl"}, "give one input"),
        ({"input_file": None}, "give one input"),
        ({"input_file": "x.jsonl", "messages_field": " "}, "--messages-field is empty"),
        (
            {"input_file": "x.jsonl", "user_role": ("bot",), "assistant_role": ("bot",)},
            "given to both --user-role and --assistant-role",
        ),
    ],
)
def test_config_refuses_bad_input_choices(kwargs, message):
    with pytest.raises(UserError, match=message):
        TokenizeConfig(output_file="o.jsonl", model_name_or_path="m", **kwargs)
