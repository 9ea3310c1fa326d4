"""Tests for minitrain/data/format.py's file kinds: is_preference, is_pair_file, check_kind, iter_pairs and
parse_sample on pairs."""

from __future__ import annotations

import orjson
import pytest

from minitrain.data.format import check_kind, is_pair_file, is_preference, iter_pairs, iter_samples
from minitrain.errors import UserError

SIDE = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "len": 3, "num_loss_counted_tokens": 2}
PAIR = {"chosen": SIDE, "rejected": SIDE, "prompt_len": 1, "source_line": 1}


def test_kind_of_a_sidecar():
    assert is_preference({"kind": "preference"})
    assert not is_preference({"kind": "sft"}) and not is_preference({}) and not is_preference(None)


def test_check_kind_names_the_flag_in_both_directions(tmp_path):
    path = tmp_path / "d.jsonl"
    check_kind(path, {"kind": "sft"}, "sft")
    check_kind(path, None, "sft")  # no sidecar (e.g. mini_trainer's files): SFT
    check_kind(path, {"kind": "preference"}, "dpo")
    with pytest.raises(
        UserError, match=r"d.jsonl was tokenized as preference pairs; train it with --objective dpo"
    ):
        check_kind(path, {"kind": "preference"}, "sft")
    with pytest.raises(UserError, match=r"d.jsonl holds SFT samples; --objective dpo needs preference pairs"):
        check_kind(path, {}, "dpo")


def test_without_a_sidecar_the_first_line_tells_the_kind(tmp_path):
    pairs, samples = tmp_path / "p.jsonl", tmp_path / "s.jsonl"
    pairs.write_bytes(b"\n" + orjson.dumps(PAIR) + b"\n")  # a leading blank line is skipped
    samples.write_bytes(orjson.dumps(SIDE) + b"\n")
    assert is_pair_file(pairs, None) and not is_pair_file(samples, None)
    assert not is_pair_file(pairs, {"kind": "sft"})  # a sidecar has the last word
    assert is_pair_file(samples, {"kind": "preference"})
    check_kind(pairs, None, "dpo")  # a pair file without its sidecar trains with --objective dpo
    check_kind(samples, None, "sft")
    with pytest.raises(
        UserError, match=r"p.jsonl was tokenized as preference pairs; train it with --objective"
    ):
        check_kind(pairs, None, "sft")
    with pytest.raises(UserError, match=r"s.jsonl holds SFT samples; --objective dpo needs preference pairs"):
        check_kind(samples, None, "dpo")
    broken = tmp_path / "b.jsonl"
    broken.write_bytes(b"{broken\n")
    assert not is_pair_file(broken, None)  # its reader says FILE:LINE: malformed JSON


def test_iter_pairs_reads_pairs_and_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(orjson.dumps(PAIR) + b"\n\n" + orjson.dumps({**PAIR, "source_line": 3}) + b"\n")
    assert [(n, p["source_line"]) for n, p in iter_pairs(path)] == [(1, 1), (3, 3)]
    bad = [
        (b"{broken", "p.jsonl:2: malformed JSON"),
        (b"[1]", "p.jsonl:2: expected a JSON object"),
        (orjson.dumps(SIDE), "p.jsonl:2: an SFT sample, not a preference pair"),
        (
            orjson.dumps({**PAIR, "rejected": {"input_ids": [1]}}),
            "p.jsonl:2: not a tokenized pair (`rejected`",
        ),
        (orjson.dumps({k: v for k, v in PAIR.items() if k != "prompt_len"}), "no `prompt_len`"),
    ]
    for line, says in bad:
        path.write_bytes(orjson.dumps(PAIR) + b"\n" + line + b"\n")
        with pytest.raises(UserError, match=says.replace("(", r"\(").replace("[", r"\[")) as err:
            list(iter_pairs(path))
        assert "\n" not in str(err.value)


def test_a_pair_read_as_an_sft_sample_names_the_flag(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(orjson.dumps(PAIR) + b"\n")
    with pytest.raises(UserError, match=r"p.jsonl:1: a preference pair .* train it with --objective dpo"):
        list(iter_samples(path))


def test_reasoning_dropped_text_counts_in_words():
    from minitrain.data.format import reasoning_dropped_text

    assert reasoning_dropped_text(1, 1) == "1 turn, 1 token"
    assert reasoning_dropped_text(2, 1_234) == "2 turns, 1,234 tokens"
    assert reasoning_dropped_text(0, 0) == "0 turns, 0 tokens"
