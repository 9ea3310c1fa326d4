"""minitrain/inspect/render.py: the sample view on the fixture tokenizers, plain output exactly, colour by
style."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from minitrain.errors import UserError
from minitrain.inspect import render
from minitrain.inspect.audit import AuditReport
from minitrain.inspect.stats import DatasetStats
from minitrain.inspect.tokenizer import special_token_ids
from tests.conftest import FIXTURES, SMOLLM2, TINYLLAMA

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures folder {FIXTURES} is absent")

# apply_chat_template([user "Hi", assistant "Café ☕ ok."]) with each fixture tokenizer; the assistant's
# content and end-of-turn token are trained. "☕" is split over several byte-level tokens in both.
SMOL_IDS = [
    1,
    9690,
    198,
    2683,
    359,
    253,
    5356,
    5646,
    11173,
    3365,
    3511,
    308,
    34519,
    28,
    7018,
    411,
    407,
    19712,
]
SMOL_IDS += [
    8182,
    2,
    198,
    1,
    4093,
    198,
    26843,
    2,
    198,
    1,
    520,
    9531,
    198,
    51,
    1939,
    2756,
    4636,
    242,
    239,
    10907,
]
SMOL_IDS += [30, 2, 198]
SMOL_TRAINED = range(31, 40)  # "Café ☕ ok." + <|im_end|>
TINY_IDS = [
    529,
    29989,
    1792,
    29989,
    29958,
    13,
    18567,
    2,
    13,
    29966,
    29989,
    465,
    22137,
    29989,
    29958,
    13,
    29907,
]
TINY_IDS += [28059, 29871, 229, 155, 152, 3431, 29889, 2, 13]
TINY_TRAINED = range(16, 25)  # "Café ☕ ok." + </s>

SMOL_PLAIN = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n⟦Café ☕ ok.<|im_end|>⟧\n"
)
TINY_PLAIN = "<|user|>\nHi</s>\n<|assistant|>\n⟦Café ☕ ok.</s>⟧\n"


def _tok(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def smol():
    return _tok(SMOLLM2)


@pytest.fixture(scope="module")
def tiny():
    return _tok(TINYLLAMA)


def _labels(ids: list[int], trained: range) -> list[int]:
    return [t if i in trained else -100 for i, t in enumerate(ids)]


@pytest.mark.parametrize(
    ("which", "ids", "trained", "expected"),
    [("smol", SMOL_IDS, SMOL_TRAINED, SMOL_PLAIN), ("tiny", TINY_IDS, TINY_TRAINED, TINY_PLAIN)],
)
def test_plain_text_marks_trained_spans_exactly(request, which, ids, trained, expected) -> None:
    tok = request.getfixturevalue(which)
    assert (
        tok.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Café ☕ ok."}],
            tokenize=True,
        )["input_ids"]
        == ids
    )  # the constants above are what the fixture tokenizer gives
    segments = render.decode_segments(tok, ids, _labels(ids, trained), special_token_ids(tok))
    assert render.sample_text(segments, color=False).plain == expected
    assert "".join(s.text for s in segments) == tok.decode(ids)  # nothing lost or doubled at the cuts
    assert [(s.start, s.end) for s in segments] == list(
        zip([0] + [s.end for s in segments[:-1]], [s.end for s in segments], strict=True)
    )


def test_whole_sample_plain_output(smol) -> None:
    out = io.StringIO()
    console = Console(file=out, no_color=True, color_system=None, width=40)
    sample = {"input_ids": SMOL_IDS, "labels": _labels(SMOL_IDS, SMOL_TRAINED), "source_line": 7}
    render.render_sample(console, smol, 3, sample, special_token_ids(smol), tokens=False, color=False)
    header = "=== sample 3 | source line 7 | 41 tokens | 9 trained (22.0%) ==="
    assert (
        out.getvalue() == header + "\n" + SMOL_PLAIN + "\n"
    )  # no wrapping at width 40, one blank line after


def test_token_cells_plain_exactly(tiny) -> None:
    ids = TINY_IDS[9:]
    text = render.token_cells(
        tiny, ids, _labels(TINY_IDS, TINY_TRAINED)[9:], special_token_ids(tiny), color=False
    )
    assert text.plain == (
        "29966:< 29989:| 465:ass 22137:istant 29989:| 29958:> 13:<0x0A>\n"
        "⟦29907:C 28059:afé 29871:▁ 229:<0xE2> 155:<0x98> 152:<0x95> 3431:▁ok 29889:. 2:</s>⟧ 13:<0x0A>\n"
    )
    colour = render.token_cells(
        tiny, ids, _labels(TINY_IDS, TINY_TRAINED)[9:], special_token_ids(tiny), color=True
    )
    assert colour.plain == text.plain.replace("⟦", "").replace("⟧", "")  # same cells and line breaks


def test_colour_gives_trained_and_masked_text_distinct_styles(smol) -> None:
    labels = _labels(SMOL_IDS, SMOL_TRAINED)
    text = render.sample_text(
        render.decode_segments(smol, SMOL_IDS, labels, special_token_ids(smol)), color=True
    )
    assert "⟦" not in text.plain and text.plain == smol.decode(SMOL_IDS)

    def style_at(sub: str) -> str:
        at = text.plain.index(sub)
        return next(str(span.style) for span in text.spans if span.start <= at < span.end)

    assert style_at("Café") == render.TRAINED
    assert style_at("Hi") == style_at("You are") == render.MASKED
    assert style_at("<|im_start|>") == render.MASKED_SPECIAL
    assert (
        style_at(
            "<|im_end|>\n",
        )
        == render.MASKED_SPECIAL
    )
    assert len({render.TRAINED, render.MASKED, render.TRAINED_SPECIAL, render.MASKED_SPECIAL}) == 4

    out = io.StringIO()
    Console(file=out, force_terminal=True, color_system="standard", width=200).print(text)
    ansi = out.getvalue()
    assert "\x1b[1;92mCafé ☕ ok.\x1b[0m" in ansi  # bold bright green
    assert "\x1b[2mHi\x1b[0m" in ansi  # dim
    assert "\x1b[1;7;92m<|im_end|>\x1b[0m" in ansi  # the trained end-of-turn: reversed bright green


def test_a_trained_newline_is_visible_in_colour(smol) -> None:
    ids = SMOL_IDS
    labels = _labels(ids, range(31, 41))  # also train the "\n" after <|im_end|>: a known masking bug
    segments = render.decode_segments(smol, ids, labels, special_token_ids(smol))
    assert render.sample_text(segments, color=False).plain.endswith("⟦Café ☕ ok.<|im_end|>\n⟧")
    colour = render.sample_text(segments, color=True)
    assert colour.plain.endswith("<|im_end|>" + render.TRAINED_NEWLINE + "\n")


def test_a_label_boundary_inside_a_character_still_covers_every_token(tiny) -> None:
    labels = _labels(TINY_IDS, range(20, 25))  # starts at the second byte of "☕"
    segments = render.decode_segments(tiny, TINY_IDS, labels, special_token_ids(tiny))
    assert segments[0].start == 0 and segments[-1].end == len(TINY_IDS)
    assert all(a.end == b.start for a, b in zip(segments, segments[1:], strict=False))
    assert "ok.</s>⟧" in render.sample_text(segments, color=False).plain


def test_a_broken_sample_still_shows_or_fails_in_one_line(smol) -> None:
    out = io.StringIO()
    console = Console(file=out, no_color=True, color_system=None)
    short = {"input_ids": SMOL_IDS[-3:], "labels": [-100], "source_line": 1}  # labels shorter than input_ids
    render.render_sample(console, smol, 0, short, special_token_ids(smol), tokens=False, color=False)
    assert out.getvalue().endswith("3 tokens | 0 trained (0.0%) ===\n.<|im_end|>\n\n")
    with pytest.raises(UserError, match="sample 1: cannot decode") as err:
        bad = {"input_ids": [-5, "x"], "labels": [-100, -100]}
        render.render_sample(console, smol, 1, bad, special_token_ids(smol), tokens=False, color=False)
    assert "\n" not in str(err.value)


def test_stats_and_audit_tables_render(tmp_path: Path) -> None:
    s = DatasetStats(
        path=tmp_path / "x.jsonl",
        samples=2,
        tokens=30,
        trained_tokens=10,
        mean_length=15.0,
        percentiles={50: 10, 100: 20},
        histogram=[(10, 14, 1), (15, 19, 0), (20, 24, 1)],
        zero_trained=1,
        zero_trained_examples=[1],
        longest=[(20, 1, 2, 0), (10, 0, 1, 10)],
    )
    report = AuditReport(path=tmp_path / "x.jsonl", samples=2)
    report.add("zero_trained", 1, 2)
    report.add("eot_not_trained", 0, 1, "1 span(s), first ends at 9 with 'x'")
    out = io.StringIO()
    console = Console(file=out, no_color=True, color_system=None, width=120)
    render.render_stats(s, console)
    render.render_audit(report, console, color=False)
    text = out.getvalue()
    for needle in (
        "trained fraction",
        "33.3%",
        "length p50",
        "20-24",
        "zero-trained sample indices",
        "eot_not_trained",
    ):
        assert needle in text, needle
    assert "FAIL: 1 error finding(s), 1 warning(s)" in text


def test_reasoning_has_its_own_style_trained_or_masked() -> None:
    """Qwen3: a trained reasoning block and a masked one are styled apart from the answer and each other."""
    from transformers import AutoTokenizer

    from minitrain.data.probe import load_chat_encoder

    qwen3 = SMOLLM2.parent / "qwen3"
    tok = AutoTokenizer.from_pretrained(str(qwen3))
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>Greet back.</think>Hello!"},
    ]
    sample = load_chat_encoder(str(qwen3)).encoder.encode({"messages": messages})
    segments = render.decode_segments(tok, sample.input_ids, sample.labels, special_token_ids(tok))
    text = render.sample_text(segments, color=True)
    assert text.plain.replace(render.TRAINED_NEWLINE, "") == tok.decode(sample.input_ids)

    def style_at(sub: str) -> str:
        at = text.plain.index(sub)
        return next(str(span.style) for span in text.spans if span.start <= at < span.end)

    assert style_at("Greet back.") == style_at("<think>") == render.TRAINED_REASONING
    assert style_at("Hello!") == render.TRAINED
    masked = [
        -100
        if lab == tok.convert_tokens_to_ids("<think>")
        or k < sample.labels.index(tok.convert_tokens_to_ids("</think>"))
        else lab
        for k, lab in enumerate(sample.labels)
    ]
    masked_text = render.sample_text(
        render.decode_segments(tok, sample.input_ids, masked, special_token_ids(tok)), color=True
    )
    at = masked_text.plain.index("Greet back.")
    assert next(str(s.style) for s in masked_text.spans if s.start <= at < s.end) == render.MASKED_REASONING
    assert len({render.TRAINED, render.TRAINED_REASONING, render.MASKED, render.MASKED_REASONING}) == 4
    # plain output is unchanged: the tags are in the text, the trained span in ⟦ ⟧
    plain = render.sample_text(segments, color=False).plain
    assert plain.endswith("⟦<think>\nGreet back.\n</think>\n\nHello!<|im_end|>⟧\n")


def test_stats_show_reasoning_dropped_by_the_template(tmp_path: Path) -> None:
    s = DatasetStats(
        path=tmp_path / "x.jsonl", samples=1, tokens=3, trained_tokens=1, mean_length=3.0, percentiles={},
        histogram=[], zero_trained=0, zero_trained_examples=[], longest=[],
        reasoning_dropped={"turns": 7, "tokens": 1234},
    )  # fmt: skip
    out = io.StringIO()
    render.render_stats(s, Console(file=out, no_color=True, color_system=None, width=120))
    assert "reasoning dropped by the template" in out.getvalue() and "7 turns, 1,234 tokens" in out.getvalue()
