"""minitrain/inspect/: sample selection, --stats and --audit on tokenized files built from the fixtures.

Tokenized files here are built by a reference masking that is right by construction: each piece of the
template (role header, content + end-of-turn, separator) is encoded on its own and labelled on its own.
Each audit check is then proven by corrupting such a file in exactly one way; a per-token reference
audit, written as plainly as possible, must agree with the vectorised one on randomly corrupted files.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from rich.console import Console

from minitrain.config import InspectConfig
from minitrain.data.format import read_sidecar
from minitrain.errors import UserError
from minitrain.inspect import audit as audit_module
from minitrain.inspect import inspect_file
from minitrain.inspect.audit import BATCH_SAMPLES, CHECKS, AuditReport, audit_file
from minitrain.inspect.select import select_samples
from minitrain.inspect.stats import NUM_EXAMPLES, NUM_LONGEST, PERCENTILES, StatsAccumulator, compute_stats
from minitrain.inspect.tokenizer import end_of_turn_ids, special_token_ids
from tests.conftest import DATA, FIXTURES, MESSAGES_FILES, SMOLLM2, TINYLLAMA

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures folder {FIXTURES} is absent")

FASTCHAT = DATA / "fastchat_conversations.messages.jsonl"
ALPACA = DATA / "alpaca_en_demo.messages.jsonl"
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Per tokenizer: (header of a turn, end-of-turn text, text after it, default system turn or None)
LAYOUTS = {
    "smollm2": (lambda role: f"<|im_start|>{role}\n", "<|im_end|>", "\n", SMOL_SYSTEM),
    "tinyllama": (lambda role: f"<|{role}|>\n", "</s>", "\n", None),
}
TOKENIZER_DIRS = {"smollm2": SMOLLM2, "tinyllama": TINYLLAMA}


_TOKENIZERS: dict[str, Any] = {}


def tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = AutoTokenizer.from_pretrained(TOKENIZER_DIRS[name])
    return _TOKENIZERS[name]


def reference_row(name: str, messages: list[dict[str, Any]], source_line: int) -> dict[str, Any]:
    """One tokenized sample whose labels are right by construction (pieces encoded and labelled
    separately)."""
    tok = tokenizer(name)
    header, eot, after, default_system = LAYOUTS[name]
    pieces: list[tuple[str, bool]] = []
    if default_system is not None and messages[0]["role"] != "system":
        pieces.append((header("system") + default_system + eot + after, False))
    for m in messages:
        trained = m["role"] == "assistant" and m.get("train", True) is not False
        pieces += [(header(m["role"]), False), (m["content"] + eot, trained), (after, False)]
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        enc = tok.encode(text, add_special_tokens=False)
        ids += enc
        labels += enc if trained else [-100] * len(enc)
    return {
        "input_ids": ids,
        "labels": labels,
        "len": len(ids),
        "num_loss_counted_tokens": sum(lab != -100 for lab in labels),
        "source_line": source_line,
    }


def reference_rows(name: str, source: Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    with source.open() as f:
        for line_no, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            rows.append(reference_row(name, json.loads(line)["messages"], line_no))
    return rows


def write_tokenized(
    out: Path, rows: list[dict[str, Any]], name: str | None, *, meta: dict | None = None
) -> Path:
    """Write OUT.jsonl and (when `name` is given) a sidecar naming the fixture tokenizer."""
    out.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    if name is not None:
        tok = tokenizer(name)
        sidecar = {
            "format": "minitrain.tokenized",
            "format_version": 1,
            "tokenizer": {
                "path": str(TOKENIZER_DIRS[name]),
                "vocab_size": len(tok),
                "eos_token_id": tok.eos_token_id,
                "end_of_turn_token_ids": [tok.convert_tokens_to_ids(LAYOUTS[name][1])],
            },
            "counts": {"read": len(rows), "written": len(rows), "dropped": 0, "rejected": 0},
            "tokens": sum(len(r["input_ids"]) for r in rows),
            "trained_tokens": sum(sum(lab != -100 for lab in r["labels"]) for r in rows),
        }
        sidecar.update(meta or {})
        out.with_name(out.stem + ".meta.json").write_bytes(orjson.dumps(sidecar))
    return out


def audit(out: Path, name: str, source: Path | None = None, meta: dict | None = None) -> AuditReport:
    return audit_file(out, tokenizer(name), {**(read_sidecar(out) or {}), **(meta or {})}, source=source)


# ------------------------------------------------------------------------------------------- clean files


@pytest.mark.parametrize("name", ["smollm2", "tinyllama"])
@pytest.mark.parametrize("source", [FASTCHAT, ALPACA], ids=lambda p: p.name.split(".")[0])
def test_reference_tokenization_audits_clean(tmp_path: Path, name: str, source: Path) -> None:
    out = write_tokenized(tmp_path / "out.jsonl", reference_rows(name, source), name)
    report = audit(out, name, source=source)
    assert report.counts == {}, report.examples
    assert report.ok and report.samples == sum(1 for _ in source.open())
    assert "compared" in report.notes[0]


# ------------------------------------------------------------------------------------------- corruptions


def _span_ends(row: dict[str, Any]) -> list[int]:
    lab = row["labels"]
    return [i for i in range(len(lab)) if lab[i] != -100 and (i + 1 == len(lab) or lab[i + 1] == -100)]


def _recount(row: dict[str, Any]) -> None:
    row["num_loss_counted_tokens"] = sum(lab != -100 for lab in row["labels"])


def corrupt_zero_trained(row: dict[str, Any], tok: Any) -> None:
    row["labels"] = [-100] * len(row["labels"])
    _recount(row)


def corrupt_eot_masked(row: dict[str, Any], tok: Any) -> None:
    row["labels"][_span_ends(row)[0]] = -100  # the bug peers shipped: end-of-turn not trained
    _recount(row)


def corrupt_role_header_trained(row: dict[str, Any], tok: Any) -> None:
    start = tok.convert_tokens_to_ids("<|im_start|>")
    last = max(i for i, t in enumerate(row["input_ids"]) if t == start)  # the assistant header's <|im_start|>
    row["labels"][last] = start
    _recount(row)


def corrupt_label_not_input(row: dict[str, Any], tok: Any) -> None:
    i = _span_ends(row)[0] - 1
    row["labels"][i] = row["input_ids"][i] + 1


def corrupt_len(row: dict[str, Any], tok: Any) -> None:
    row["len"] += 1


def corrupt_labels_short(row: dict[str, Any], tok: Any) -> None:
    row["labels"] = row["labels"][:-1]


def corrupt_loss_count(row: dict[str, Any], tok: Any) -> None:
    row["num_loss_counted_tokens"] += 1


def corrupt_out_of_vocab(row: dict[str, Any], tok: Any) -> None:
    row["input_ids"][0] = len(tok) + 5


def corrupt_user_trained(row: dict[str, Any], tok: Any) -> None:
    """Train the first user turn's content + end-of-turn: a mask that trains on user text."""
    ids, end = row["input_ids"], tok.convert_tokens_to_ids("<|im_end|>")
    user_header_end = next(i for i in range(len(ids) - 2) if tok.decode(ids[i : i + 2]) == "user\n") + 2
    user_eot = ids.index(end, user_header_end)
    for i in range(user_header_end, user_eot + 1):
        row["labels"][i] = ids[i]
    _recount(row)


CORRUPTIONS = [
    (corrupt_zero_trained, "zero_trained"),
    (corrupt_eot_masked, "eot_not_trained"),
    (corrupt_role_header_trained, "trained_special"),
    (corrupt_label_not_input, "label_not_input"),
    (corrupt_len, "len_mismatch"),
    (corrupt_labels_short, "len_mismatch"),
    (corrupt_loss_count, "loss_count_mismatch"),
    (corrupt_out_of_vocab, "token_out_of_vocab"),
    (corrupt_user_trained, "text_mismatch"),
]


@pytest.fixture(scope="module")
def clean_rows() -> list[dict[str, Any]]:
    return reference_rows("smollm2", FASTCHAT, limit=8)


@pytest.mark.parametrize(("corrupt", "kind"), CORRUPTIONS, ids=[c.__name__[8:] for c, _ in CORRUPTIONS])
def test_each_corruption_is_found(tmp_path: Path, clean_rows, corrupt, kind: str) -> None:
    rows = [dict(r, input_ids=list(r["input_ids"]), labels=list(r["labels"])) for r in clean_rows]
    corrupt(rows[5], tokenizer("smollm2"))
    out = write_tokenized(tmp_path / "out.jsonl", rows, "smollm2")
    report = audit(out, "smollm2", source=FASTCHAT)
    assert kind in report.counts, report.counts
    assert report.counts[kind] == 1
    assert [e.index for e in report.examples[kind]] == [5]
    assert report.examples[kind][0].source_line == 6
    assert (
        not report.ok
    )  # with --source even a zero-trained sample is an error: its assistant turn is missing
    if kind != "text_mismatch":
        assert audit(out, "smollm2").ok is (CHECKS[kind].severity == "warning")
    # The sidecar was written from the corrupted rows, so only the corruption itself is reported.
    extra = set(report.counts) - {kind, "eot_not_trained", "trained_special", "text_mismatch"}
    assert not extra, report.counts


def test_user_text_trained_is_a_text_mismatch_only(tmp_path: Path, clean_rows) -> None:
    rows = [dict(r, labels=list(r["labels"])) for r in clean_rows]
    corrupt_user_trained(rows[0], tokenizer("smollm2"))
    out = write_tokenized(tmp_path / "out.jsonl", rows, "smollm2")
    plain = audit(out, "smollm2", meta={"input": "/data/in.jsonl"})
    assert plain.ok  # without --source nothing mechanical is wrong ...
    assert plain.notes == ["trained text not compared with the input; add --source /data/in.jsonl"]
    report = audit(out, "smollm2", source=FASTCHAT)  # ... with it, the extra trained turn shows
    assert report.counts == {"text_mismatch": 1}
    assert "trained span" in report.examples["text_mismatch"][0].detail


def test_changed_assistant_content_is_a_text_mismatch(tmp_path: Path, clean_rows) -> None:
    out = write_tokenized(tmp_path / "out.jsonl", clean_rows, "smollm2")
    lines = FASTCHAT.read_text().splitlines()[: len(clean_rows)]
    convo = json.loads(lines[3])
    convo["messages"][1]["content"] = convo["messages"][1]["content"].replace("a", "@", 1)
    lines[3] = json.dumps(convo)
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    report = audit(out, "smollm2", source=source)
    assert report.counts == {"text_mismatch": 1}
    assert report.examples["text_mismatch"][0].index == 3
    assert "'@" in report.examples["text_mismatch"][0].detail


def test_malformed_line_in_the_middle_is_a_finding(tmp_path: Path, clean_rows) -> None:
    out = write_tokenized(tmp_path / "out.jsonl", clean_rows, "smollm2")
    lines = out.read_bytes().splitlines(keepends=True)
    lines[2] = b'{"input_ids": [1, 2\n'
    out.write_bytes(b"".join(lines))
    report = audit(out, "smollm2")
    assert report.counts == {"malformed_line": 1} and report.examples["malformed_line"][0].index == 2
    assert not report.ok


def test_source_lines_that_cannot_be_matched(tmp_path: Path, clean_rows) -> None:
    rows = [dict(r) for r in clean_rows]
    rows[1]["source_line"] = 10_000  # past the end of the source ...
    del rows[2]["source_line"]  # ... absent (a mini_trainer file)
    out = write_tokenized(tmp_path / "out.jsonl", rows[:3], "smollm2")
    report = audit(out, "smollm2", source=FASTCHAT)
    assert report.counts == {"source_unmatched": 2}
    assert [e.index for e in report.examples["source_unmatched"]] == [1, 2]


def test_sidecar_counts_that_disagree(tmp_path: Path, clean_rows) -> None:
    out = write_tokenized(tmp_path / "out.jsonl", clean_rows, "smollm2", meta={"trained_tokens": 1})
    report = audit(out, "smollm2")
    assert report.counts == {"sidecar_mismatch": 1}
    assert "trained_tokens: sidecar 1" in report.examples["sidecar_mismatch"][0].detail


def reference_findings(row: dict[str, Any], special: set[int], eot: set[int], vocab: int) -> set[str]:
    """The per-sample checks written token by token, as plainly as possible."""
    ids, labels, found = row["input_ids"], row["labels"], set()
    if row.get("len") != len(ids) or len(labels) != len(ids):
        found.add("len_mismatch")
    if len(labels) != len(ids):
        return found
    trained = [lab != -100 for lab in labels]
    if row.get("num_loss_counted_tokens") != sum(trained):
        found.add("loss_count_mismatch")
    for i in range(len(ids)):
        if trained[i] and labels[i] != ids[i]:
            found.add("label_not_input")
        if not 0 <= ids[i] < vocab:
            found.add("token_out_of_vocab")
    if not any(trained):
        return found | {"zero_trained"}
    for i in range(len(ids)):
        if trained[i] and 0 <= ids[i] < vocab and ids[i] in special and ids[i] not in eot:
            found.add("trained_special")
        span_ends_here = trained[i] and (i + 1 == len(ids) or not trained[i + 1])
        if span_ends_here and ids[i] not in eot:
            found.add("eot_not_trained")
    return found


@pytest.mark.parametrize("batch_samples", [BATCH_SAMPLES, 7, 1])
def test_audit_matches_a_per_token_reference_on_random_corruptions(
    tmp_path: Path, clean_rows, monkeypatch, batch_samples: int
) -> None:
    monkeypatch.setattr(
        audit_module, "BATCH_SAMPLES", batch_samples
    )  # batches of 7: several, the last one partial
    tok = tokenizer("smollm2")
    rng = random.Random(0)
    rows = []
    for k in range(120):
        row = json.loads(json.dumps(clean_rows[k % len(clean_rows)]))
        n = len(row["input_ids"])
        for _ in range(rng.randrange(4)):  # 0-3 random edits of labels, ids and counts
            i = rng.randrange(n)
            what = rng.randrange(6)
            if what == 0:
                row["labels"][i] = -100
            elif what == 1:
                row["labels"][i] = row["input_ids"][i]
            elif what == 2:
                row["labels"][i] = rng.randrange(len(tok))
            elif what == 3:
                row["input_ids"][i] = rng.choice([0, 1, 2, 3, len(tok) + 1, rng.randrange(len(tok))])
            elif what == 4:
                row["num_loss_counted_tokens"] += rng.choice([-1, 1])
            else:
                row["len"] += rng.choice([-1, 1])
        rows.append(row)
    out = write_tokenized(tmp_path / "out.jsonl", rows, "smollm2")
    report = audit(out, "smollm2")

    special = set(special_token_ids(tok))
    eot = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    expected: dict[str, set[int]] = {}
    for k, row in enumerate(rows):
        for kind in reference_findings(row, special, eot, len(tok)):
            expected.setdefault(kind, set()).add(k)
    assert len(expected) >= 5  # the random edits reach most checks
    assert {k: c for k, c in report.counts.items() if k != "sidecar_mismatch"} == {
        k: len(v) for k, v in expected.items()
    }
    for kind, examples in report.examples.items():
        if kind != "sidecar_mismatch":
            assert [e.index for e in examples] == sorted(expected[kind])[:NUM_EXAMPLES]


# ------------------------------------------------------------------------------------------- stats


def test_stats_match_a_direct_computation(tmp_path: Path) -> None:
    rows = reference_rows("tinyllama", FASTCHAT, limit=200)
    rows[7]["labels"] = [-100] * rows[7]["len"]
    rows[7]["num_loss_counted_tokens"] = 0
    out = write_tokenized(tmp_path / "out.jsonl", rows, "tinyllama")
    s = compute_stats(out)
    lengths = sorted(r["len"] for r in rows)
    assert s.samples == 200 and s.tokens == sum(lengths)
    assert s.trained_tokens == sum(r["num_loss_counted_tokens"] for r in rows)
    for q in PERCENTILES:  # the smallest length with at least q% of samples at or below it
        assert s.percentiles[q] == lengths[int(np.ceil(q / 100 * 199))]
    assert sum(c for _, _, c in s.histogram) == 200
    assert s.histogram[0][0] == lengths[0] and s.histogram[-1][0] <= lengths[-1] <= s.histogram[-1][1]
    for lo, hi, c in s.histogram:
        assert c == sum(lo <= x <= hi for x in lengths)
    assert s.zero_trained == 1 and s.zero_trained_examples == [7]
    by_len = sorted(range(200), key=lambda i: (-rows[i]["len"], i))[:NUM_LONGEST]
    assert [i for _, i, _, _ in s.longest] == by_len
    assert [line for _, _, line, _ in s.longest] == [i + 1 for i in by_len]
    assert s.packing is None


def test_packing_stats_use_the_planner(tmp_path: Path) -> None:
    from minitrain.data.packing import plan_minibatches

    rows = reference_rows("smollm2", ALPACA, limit=100)
    out = write_tokenized(tmp_path / "out.jsonl", rows, "smollm2")
    s = compute_stats(out, max_tokens_per_gpu=1024, batch_size=16, nproc=2, seed=3)
    lengths = np.array([r["len"] for r in rows])
    order = np.random.default_rng([3, 0]).permutation(100)
    counts = [len(plan_minibatches(lengths[order[i : i + 16]].tolist(), 1024, 2)) for i in range(0, 100, 16)]
    p = s.packing
    assert p is not None and p.steps == 7 and p.minibatches_max == max(counts)
    assert p.minibatches_mean == pytest.approx(sum(counts) / 7)
    assert p.too_long == int((lengths > 1024).sum())
    placed = int(lengths[lengths <= 1024].sum())
    assert p.utilization == pytest.approx(placed / (sum(counts) * 2 * 1024))


def test_audit_pass_gives_the_same_stats(tmp_path: Path) -> None:
    out = write_tokenized(tmp_path / "out.jsonl", reference_rows("smollm2", FASTCHAT, limit=50), "smollm2")
    acc = StatsAccumulator()
    audit_file(out, tokenizer("smollm2"), read_sidecar(out), stats=acc)
    assert acc.finish(out) == compute_stats(out)
    packing = {"max_tokens_per_gpu": 512, "batch_size": 8, "nproc": 2, "seed": 5}
    both = inspect_file(InspectConfig(path=out, stats=True, audit=True, **packing))
    assert both.stats is not None and both.stats.packing is not None
    assert both.stats == compute_stats(out, **packing)


# ------------------------------------------------------------------------------------------- selection


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sel") / "out.jsonl"
    return write_tokenized(out, reference_rows("smollm2", FASTCHAT, limit=30), "smollm2")


def test_first_n_and_indices(small_file: Path) -> None:
    assert [s.index for s in select_samples(small_file)] == [0, 1, 2]
    assert [s.index for s in select_samples(small_file, n=5)] == [0, 1, 2, 3, 4]
    picked = select_samples(small_file, indices=(12, 3))
    assert [(s.index, s.line, s.sample["source_line"]) for s in picked] == [(3, 4, 4), (12, 13, 13)]
    with pytest.raises(UserError, match="only 30 samples"):
        select_samples(small_file, indices=(30,))


def test_selection_stops_reading_at_the_last_line_it_needs(small_file: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    big.write_bytes(small_file.read_bytes() + b"this line is never read\n")
    assert [s.index for s in select_samples(big, indices=(29,))] == [29]
    assert len(select_samples(big, n=3)) == 3
    with pytest.raises(UserError, match="malformed JSON"):
        compute_stats(big)


def test_random_is_reproducible_and_covers_the_file(small_file: Path) -> None:
    a = [s.index for s in select_samples(small_file, random_k=4, seed=1)]
    assert a == [s.index for s in select_samples(small_file, random_k=4, seed=1)]
    assert a == sorted(a) and len(set(a)) == 4
    seen = {
        i for seed in range(40) for i in (s.index for s in select_samples(small_file, random_k=4, seed=seed))
    }
    assert len(seen) >= 25  # uniform over 30 samples, not stuck at the front
    assert [s.index for s in select_samples(small_file, random_k=100)] == list(range(30))


def test_grep_filters_on_decoded_text(small_file: Path) -> None:
    tok = tokenizer("smollm2")

    def grep(sample: dict[str, Any]) -> bool:
        return "Who are you" in tok.decode(sample["input_ids"])

    rows = [json.loads(line) for line in small_file.read_text().splitlines()]
    matching = [i for i, r in enumerate(rows) if "Who are you" in tok.decode(r["input_ids"])]
    assert 3 <= len(matching) < 30
    assert [s.index for s in select_samples(small_file, n=2, grep=grep)] == matching[:2]
    assert {s.index for s in select_samples(small_file, random_k=2, grep=grep)} <= set(matching)
    assert [s.index for s in select_samples(small_file, indices=(0, 29), grep=grep)] == [
        i for i in (0, 29) if i in matching
    ]


# ------------------------------------------------------------------------------------------- errors


def test_one_line_errors(tmp_path: Path, small_file: Path) -> None:
    def message(**kwargs: Any) -> str:
        with pytest.raises(UserError) as err:
            inspect_file(InspectConfig(**kwargs))
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "no such file" in message(path=tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no samples" in message(path=empty)
    assert "not a tokenized sample" in message(path=FASTCHAT)
    bare = tmp_path / "bare.jsonl"
    bare.write_bytes(small_file.read_bytes())
    assert "--model-name-or-path" in message(path=bare)
    assert "nope: no such folder" in message(path=bare, model_name_or_path=str(tmp_path / "nope"))
    moved = write_tokenized(
        tmp_path / "moved.jsonl", [], "smollm2", meta={"tokenizer": {"path": "/no/such/tok"}}
    )
    moved.write_bytes(small_file.read_bytes())
    assert "recorded in moved.meta.json does not exist" in message(path=moved)
    relative = write_tokenized(tmp_path / "rel.jsonl", [], "smollm2", meta={"tokenizer": {"path": "../tok"}})
    relative.write_bytes(small_file.read_bytes())
    assert "relative to where tokenize ran" in message(path=relative)
    assert "pass only one" in message(path=small_file, n=2, indices=(1,))
    assert "add --audit" in message(path=small_file, source=FASTCHAT)
    assert "add --stats" in message(path=small_file, batch_size=4)
    assert "both --max-tokens-per-gpu and --batch-size" in message(path=small_file, stats=True, batch_size=4)


def test_without_a_sidecar_the_override_and_known_end_of_turn_tokens_are_used(
    tmp_path: Path, small_file
) -> None:
    bare = tmp_path / "bare.jsonl"
    bare.write_bytes(small_file.read_bytes())
    result = inspect_file(InspectConfig(path=bare, model_name_or_path=str(SMOLLM2), audit=True))
    assert result.meta is None and result.audit is not None and result.audit.counts == {}
    assert end_of_turn_ids(result.tokenizer, None) == {0, 2}  # <|im_end|> (EOS) and <|endoftext|>


# ------------------------------------------------------------------------------------------- tokenize output


def _tokenize(inp: Path, out: Path, name: str) -> Path:
    from minitrain.config import TokenizeConfig
    from minitrain.data.pipeline import tokenize_file

    config = TokenizeConfig(
        input_file=inp, output_file=out, model_name_or_path=str(TOKENIZER_DIRS[name]), num_workers=1
    )
    tokenize_file(config)
    return out


@pytest.mark.parametrize("name", ["smollm2", "tinyllama"])
@pytest.mark.parametrize("source", MESSAGES_FILES, ids=lambda p: p.name.split(".")[0])
def test_a_clean_file_from_tokenize_audits_clean(tmp_path: Path, name: str, source: Path) -> None:
    out = _tokenize(source, tmp_path / "out.jsonl", name)
    result = inspect_file(InspectConfig(path=out, audit=True, source=source))  # tokenizer from the sidecar
    assert result.audit is not None and result.audit.counts == {}, result.audit.examples
    assert result.audit.samples == sum(1 for _ in source.open())
    assert f"{result.audit.samples:,} samples compared" in result.audit.notes[0]


@pytest.mark.parametrize("name", ["smollm2", "tinyllama"])
def test_every_input_shape_from_tokenize_audits_clean(tmp_path: Path, name: str) -> None:
    lines = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "not this", "train": False},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "this"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "masked", "train": False},
            ]
        },
        {"messages": [{"role": "pretrain", "content": "Plain text to continue."}]},
        {"prompt": "2 + 2 =", "generation": " 4"},
    ]
    inp = tmp_path / "in.jsonl"  # with a byte-order mark and CRLF line ends, which tokenize accepts
    inp.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(x) + "\r\n" for x in lines).encode())
    out = _tokenize(inp, tmp_path / "out.jsonl", name)
    report = audit(out, name, source=inp)
    assert report.samples == 5
    assert report.counts == {"zero_trained": 1} and report.examples["zero_trained"][0].index == 2
    assert report.ok and "5 samples compared" in report.notes[0]


@pytest.mark.parametrize("bad_value", [1.5, "7", None, [1]], ids=["float", "string", "null", "list"])
def test_a_non_integer_value_is_malformed_and_the_rest_of_its_batch_is_still_checked(
    tmp_path: Path, clean_rows, bad_value
) -> None:
    rows = [json.loads(json.dumps(r)) for r in clean_rows]
    rows[2]["labels"][3] = bad_value
    corrupt_eot_masked(rows[6], tokenizer("smollm2"))
    out = write_tokenized(tmp_path / "out.jsonl", rows, None)
    report = audit_file(out, tokenizer("smollm2"), None)
    assert report.counts == {"malformed_line": 1, "eot_not_trained": 1}
    assert (
        report.examples["malformed_line"][0].index == 2 and report.examples["eot_not_trained"][0].index == 6
    )


# ------------------------------------------------------------------------------------- reasoning (Qwen3)

QWEN3_DIR = SMOLLM2.parent / "qwen3"
REASONING_LINES = [
    {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!", "reasoning_content": "The user greets me."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>Say hi.</think>Hi!"},
        ]
    },
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
]


def _tokenize_qwen3(tmp_path: Path, **kwargs: Any) -> tuple[Path, Path]:
    from minitrain.config import TokenizeConfig
    from minitrain.data.pipeline import tokenize_file

    inp = tmp_path / "reasoning.jsonl"
    inp.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in REASONING_LINES))
    out = tmp_path / f"out-{len(kwargs)}-{kwargs.get('train_on', '')}.jsonl"
    tokenize_file(
        TokenizeConfig(
            input_file=inp, output_file=out, model_name_or_path=str(QWEN3_DIR), num_workers=1, **kwargs
        )
    )
    return inp, out


@pytest.mark.parametrize(
    "kwargs", [{}, {"split_turns": True}, {"train_on": "last"}], ids=["all", "split-turns", "last"]
)
def test_reasoning_files_from_tokenize_audit_clean(tmp_path: Path, kwargs: dict) -> None:
    inp, out = _tokenize_qwen3(tmp_path, **kwargs)
    result = inspect_file(InspectConfig(path=out, audit=True, stats=True, source=inp))
    assert result.audit is not None and result.audit.counts == {}, result.audit.examples
    assert result.audit.samples == (4 if kwargs.get("split_turns") else 3)
    # --stats says what the template dropped: line 1's first reasoning (not trained with last, kept with
    # split)
    dropped = result.stats.reasoning_dropped
    assert dropped["turns"] == (0 if kwargs else 1)  # only trained turns count
    assert (dropped["tokens"] > 0) == bool(dropped["turns"])


def test_masked_reasoning_is_found(tmp_path: Path) -> None:
    """The old mask (answer + end of turn only) on a rendered reasoning block: the audit fails."""
    inp, out = _tokenize_qwen3(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(QWEN3_DIR))
    think_end = tok.convert_tokens_to_ids("</think>")
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    for row in rows:  # in each trained span, mask its reasoning block: up to and including "</think>\n\n"
        ids, labels = row["input_ids"], row["labels"]
        k = 0
        while k < len(ids):
            if labels[k] != -100 and (k == 0 or labels[k - 1] == -100):
                end = next((j for j in range(k, len(ids)) if labels[j] == -100), len(ids))
                think = [j for j in range(k, end) if ids[j] == think_end]
                if think:
                    labels[k : think[-1] + 2] = [-100] * (think[-1] + 2 - k)
                k = end
            k += 1
        row["num_loss_counted_tokens"] = sum(lab != -100 for lab in labels)
    out.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    meta = read_sidecar(out)
    meta["trained_tokens"] = sum(r["num_loss_counted_tokens"] for r in rows)
    report = audit_file(out, tok, meta, source=inp)
    # line 1: the last turn's reasoning (the first turn's is dropped by the template); line 2: inline <think>
    assert report.counts == {"reasoning_masked": 2}, report.examples
    assert [e.source_line for e in report.examples["reasoning_masked"]] == [1, 2]


# ------------------------------------------------------------------------------------------ preference pairs


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    """The first 12 pairs of the fixture, tokenized with SmolLM2 (prompts of 1 to several messages)."""
    from minitrain.config import TokenizeConfig
    from minitrain.data.pipeline import tokenize_file

    folder = tmp_path_factory.mktemp("pairs")
    inp = folder / "in.jsonl"
    inp.write_bytes(
        b"".join((DATA / "dpo_en_demo.preference.jsonl").read_bytes().splitlines(keepends=True)[:12])
    )
    config = TokenizeConfig(
        input_file=inp, output_file=folder / "pairs.jsonl", model_name_or_path=str(SMOLLM2), num_workers=1
    )
    tokenize_file(config)
    return config.output_file


def _pairs(path: Path) -> list[dict[str, Any]]:
    from minitrain.data.format import iter_pairs

    return [p for _, p in iter_pairs(path)]


def test_the_pair_view_shows_the_prompt_once_then_each_response(pair_file):
    from typer.testing import CliRunner

    from minitrain.cli import app
    from minitrain.inspect.render import SPAN_CLOSE, SPAN_OPEN

    result = CliRunner().invoke(app, ["inspect", str(pair_file), "--index", "2", "--no-color"])
    assert result.exit_code == 0, result.output
    pair = _pairs(pair_file)[2]
    tok = _tokenizer(SMOLLM2)
    text = {k: tok.decode(pair[k]["input_ids"], skip_special_tokens=False) for k in ("chosen", "rejected")}
    k = pair["prompt_len"]
    prompt = tok.decode(pair["chosen"]["input_ids"][:k], skip_special_tokens=False)
    head, rest = result.output.split("--- prompt (shared, masked)\n")
    assert head.startswith("=== pair 2 | source line 3 | prompt ")
    shown_prompt, rest = rest.split("\n--- chosen response\n")
    chosen, rejected = rest.split("\n--- rejected response\n")
    assert shown_prompt + "\n" == prompt and SPAN_OPEN not in shown_prompt  # shown once, all masked
    for key, shown in (("chosen", chosen), ("rejected", rejected)):
        response = shown.rstrip("\n").replace(SPAN_OPEN, "").replace(SPAN_CLOSE, "")
        assert prompt + response == text[key].rstrip("\n")
        assert shown.startswith(SPAN_OPEN)  # the response starts trained


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_pair_stats_against_a_direct_count(pair_file):
    from minitrain.inspect.stats import compute_pair_stats

    pairs = _pairs(pair_file)
    stats = compute_pair_stats(pair_file)
    trained = {k: [sum(x != -100 for x in p[k]["labels"]) for p in pairs] for k in ("chosen", "rejected")}
    lengths = {k: [len(p[k]["input_ids"]) for p in pairs] for k in ("chosen", "rejected")}
    assert stats.pairs == len(pairs) == 12
    assert stats.prompt.tokens == sum(p["prompt_len"] for p in pairs)
    for key in ("chosen", "rejected"):
        side = getattr(stats, key)
        assert (side.tokens, side.trained_tokens) == (sum(lengths[key]), sum(trained[key]))
        assert (
            side.percentiles[100] == max(lengths[key]) and side.percentiles[50] == sorted(lengths[key])[6]
        )  # "higher"
    margins = [c - r for c, r in zip(lengths["chosen"], lengths["rejected"], strict=True)]
    assert stats.margin_mean == pytest.approx(sum(margins) / 12)
    assert stats.chosen_longer == sum(
        c > r for c, r in zip(trained["chosen"], trained["rejected"], strict=True)
    )
    config = InspectConfig(path=pair_file, stats=True, audit=True)
    # inspect adds the sidecar's counts of the rendering (nothing dropped, nothing unread here)
    nothing = {"turns": 0, "tokens": 0}
    assert inspect_file(config).stats == dataclasses.replace(stats, reasoning_dropped=nothing)


def test_pair_audit_is_clean_and_finds_each_broken_pair(pair_file, tmp_path):
    tok = _tokenizer(SMOLLM2)
    meta = read_sidecar(pair_file)
    report = audit_file(pair_file, tok, meta, pairs=True)
    assert report.ok and report.samples == 12 and not report.counts, report.counts
    pairs = _pairs(pair_file)
    pairs[1]["rejected"]["input_ids"][0] += 1  # the sides' prompts differ
    k = pairs[4]["prompt_len"]
    pairs[4]["chosen"]["labels"][k - 1] = pairs[4]["chosen"]["input_ids"][k - 1]  # a prompt token trained
    pairs[4]["chosen"]["num_loss_counted_tokens"] += 1
    pairs[7]["prompt_len"] += 1  # prompt_len past the first trained token
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"".join(orjson.dumps(p) + b"\n" for p in pairs))
    report = audit_file(bad, tok, None, pairs=True)
    assert [e.index for e in report.examples["prompt_mismatch"]] == [1]
    assert [e.index for e in report.examples["trained_in_prompt"]] == [4, 7]
    assert report.counts["prompt_mismatch"] == 1 and report.counts["trained_in_prompt"] == 2 and not report.ok


def test_stats_say_what_the_template_dropped_or_never_read_for_sft_and_pairs(tmp_path: Path) -> None:
    """`inspect --stats` shows the sidecar's counts of the rendering: reasoning the template dropped and
    chat_template_kwargs names it never reads, for SFT files and preference files alike."""
    from minitrain.config import TokenizeConfig
    from minitrain.data.pipeline import tokenize_file
    from minitrain.inspect.render import render_pair_stats, render_stats

    user = {"role": "user", "content": "Hi"}
    early = {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet first."}
    last = {"role": "assistant", "content": "Fine.", "reasoning_content": "Answer."}
    sft = {"messages": [user, early, {"role": "user", "content": "How are you?"}, last]}
    pair = {"prompt": [user, early, {"role": "user", "content": "And?"}], "chosen": [last],
            "rejected": [{"role": "assistant", "content": "No."}]}  # fmt: skip
    for name, line in (("sft", sft), ("pairs", pair)):
        inp = tmp_path / f"{name}.jsonl"
        inp.write_bytes(orjson.dumps({**line, "chat_template_kwargs": {"enable_thinkng": False}}) + b"\n")
        out = tmp_path / f"{name}-out.jsonl"
        tokenize_file(
            TokenizeConfig(input_file=inp, output_file=out, model_name_or_path=str(QWEN3_DIR), num_workers=1)
        )
        stats = inspect_file(InspectConfig(path=out, stats=True)).stats
        assert stats.template_kwargs_unread == {"enable_thinkng": 1}
        assert stats.reasoning_dropped["turns"] == (1 if name == "sft" else 0)  # a pair trains its last
        text = io.StringIO()
        console = Console(file=text, no_color=True, color_system=None, width=160)
        (render_stats if name == "sft" else render_pair_stats)(stats, console)
        assert "chat_template_kwargs unread by the template" in text.getvalue()
        assert "enable_thinkng (1 line)" in text.getvalue()
        assert "reasoning dropped by the template" in text.getvalue()
