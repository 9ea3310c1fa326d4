"""minitrain/configfile.py: reading YAML and JSON, every key checked against the command's flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minitrain.configfile import TRAINING_PARAMS_EXTRAS, Key, read_config_file, resolve_config
from minitrain.errors import UserError

KEYS = {
    "batch_size": Key("batch_size", "integer"),
    "learning_rate": Key("learning_rate", "float"),
    "truncate": Key("truncate", "boolean"),
    "lr_scheduler": Key("lr_scheduler", "text"),
    "data_path": Key("data_path", "path"),
    "report_to": Key("report_to", "text", multiple=True),
    "output": Key("output", "path"),
    "output_file": Key("output", "path"),
}
P = Path("run.yaml")


def test_yaml_and_json_read_the_same_mapping(tmp_path):
    values = {"batch_size": 8, "learning_rate": 1e-5, "truncate": True, "report_to": ["wandb"]}
    (tmp_path / "a.json").write_text(json.dumps(values))
    (tmp_path / "a.yaml").write_text(
        "batch_size: 8\nlearning_rate: 1.0e-5\ntruncate: true\nreport_to: [wandb]\n"
    )
    (tmp_path / "a.yml").write_text("# comments are fine\n" + (tmp_path / "a.yaml").read_text())
    assert read_config_file(tmp_path / "a.json") == values
    assert read_config_file(tmp_path / "a.yaml") == values
    assert read_config_file(tmp_path / "a.yml") == values
    (tmp_path / "empty.yaml").write_text("")
    assert read_config_file(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("missing.yaml", None, "no such file"),
        ("bad.yaml", "batch_size: [1\n", "not valid YAML at line"),
        ("bad.json", "{batch_size: 1}", "not valid JSON"),
        ("list.yaml", "- batch_size\n", "expected a mapping"),
        ("run.toml", "batch_size = 1", "name it .yaml, .yml or .json"),
    ],
)
def test_unreadable_files_are_one_line_errors(tmp_path, name, text, says):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=says) as err:
        read_config_file(tmp_path / name)
    assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)


def test_keys_take_the_flag_or_snake_case_spelling_and_map_to_the_parameter():
    data = {"batch-size": 8, "--learning-rate": 3, "output_file": "o.jsonl", "report_to": "wandb"}
    assert resolve_config(data, KEYS, path=P) == {
        "batch_size": 8,
        "learning_rate": 3.0,  # an integer is a number
        "output": "o.jsonl",  # -o/--output/--output-file is one parameter
        "report_to": ["wandb"],  # a repeatable flag: one value is a one-item list
    }


def test_null_means_the_flags_default_and_extras_are_ignored():
    data = {"batch_size": None, "world_size": 2, "torch_version": "2.13", "launches": [{}]}
    assert resolve_config(data, KEYS, path=P, ignored=TRAINING_PARAMS_EXTRAS) == {}


def test_an_unknown_key_names_the_nearest_valid_one():
    with pytest.raises(UserError, match=r"unknown key 'batch_sise'; did you mean batch_size\?"):
        resolve_config({"batch_sise": 8}, KEYS, path=P)
    with pytest.raises(UserError, match="unknown key 'zzz'; see the command's --help"):
        resolve_config({"zzz": 8}, KEYS, path=P)
    with pytest.raises(UserError, match="unknown key 'world_size'"):  # extras only where ignored
        resolve_config({"world_size": 2}, KEYS, path=P)


def test_two_spellings_of_one_flag_are_refused():
    with pytest.raises(UserError, match="'output' and 'output_file' set the same flag; keep one"):
        resolve_config({"output": "a.jsonl", "output_file": "b.jsonl"}, KEYS, path=P)


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("batch_size", 1.5, "must be an integer, got 1.5"),  # never truncated to 1
        ("batch_size", "8", "must be an integer, got '8'"),
        ("batch_size", True, "must be an integer, got True"),
        ("learning_rate", "fast", "must be a number"),
        ("truncate", "yes", "must be true or false"),
        ("lr_scheduler", 3, "must be a string"),
        ("data_path", ["a"], "must be a path"),
        ("report_to", [1], "must be a string"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_key(key, value, says):
    with pytest.raises(UserError, match=f"run.yaml: key '{key}' {says}"):
        resolve_config({key: value}, KEYS, path=P)


def test_a_json_flag_takes_a_mapping_or_its_text():
    keys = {"lr_scheduler_kwargs": Key("lr_scheduler_kwargs", "json")}
    assert resolve_config({"lr_scheduler_kwargs": {"num_cycles": 0.5}}, keys, path=P) == {
        "lr_scheduler_kwargs": '{"num_cycles": 0.5}'
    }
    assert resolve_config({"lr_scheduler_kwargs": '{"num_cycles": 1}'}, keys, path=P) == {
        "lr_scheduler_kwargs": '{"num_cycles": 1}'
    }
    with pytest.raises(UserError, match="must be a mapping"):
        resolve_config({"lr_scheduler_kwargs": [1]}, keys, path=P)
