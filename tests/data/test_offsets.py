"""minitrain/data/offsets.py: the ids and offsets derived from a byte-level vocabulary are the tokenizer's
own (`Tokenizer.encode`), on every fixture tokenizer and text, and every text they cannot prove takes
`encode`."""

from __future__ import annotations

import contextlib

import orjson
import pytest
from tokenizers import Tokenizer, pre_tokenizers, processors

from minitrain.data import offsets
from minitrain.data.offsets import TokenBytes, byte_alphabet, encode_with_offsets
from minitrain.data.pipeline import Policy, encode_lines
from minitrain.data.probe import load_chat_encoder
from tests.conftest import DATA, QWEN3, SMOLLM2, TINYLLAMA, needs_fixtures

pytestmark = needs_fixtures

# Texts where offsets are easy to get wrong: spaces and newlines in runs, at the edges, beside added tokens.
TRICKY = [
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "\n\n\t x\r\n y",
    "a  b   c    d",
    "1234567890 3.14159",
    "it's we'll I'M",
    "<|im_start|>user\n   find . -name '*.py'<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\nok<|im_end|>\n",
    "<|im_end|><|im_end|>x<|im_start|>",
    "~!@#$%^&*()_+`-=[]{}|;':\",./<>?",
    "naïve café ☕ 日本語 Ελληνικά и русский",
    "e\u0301 (not NFC) \u00a0nbsp 👍🏽 👨‍👩‍👧 ﷺ",
]


def own(backend, text):
    """The reference: the tokenizer's own ids and character offsets."""
    enc = backend.encode(text, add_special_tokens=False)
    return enc.ids, [list(pair) for pair in zip(*enc.offsets, strict=True)] if enc.ids else [[], []]


def fixture_texts(encoder, limit=300):
    texts = list(TRICKY)
    for path in sorted(DATA.glob("*.messages.jsonl")):
        for line in path.read_bytes().splitlines()[:limit]:
            with contextlib.suppress(Exception):  # a line the template refuses: not this test's business
                texts.append(encoder.render(orjson.loads(line)["messages"]))
    return texts


def test_the_byte_alphabet_is_the_byte_level_pre_tokenizers():
    alphabet = byte_alphabet()
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(alphabet.values()) == list(range(256))
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # every byte that UTF-8 text can hold, as the pre-tokenizer writes it
    texts = [chr(b) for b in range(128)]
    texts += [bytes([0xC2, b]).decode() for b in range(0x80, 0xC0)]  # continuation bytes
    texts += [bytes([b, 0x80]).decode() for b in range(0xC2, 0xE0)]  # two-byte leads
    texts += [bytes([b, 0xA0 if b == 0xE0 else 0x80, 0x80]).decode() for b in range(0xE0, 0xF0)]  # 3 bytes
    texts += [bytes([b, 0x90 if b == 0xF0 else 0x80, 0x80, 0x80]).decode() for b in range(0xF0, 0xF5)]
    for text in texts:
        ((written, _),) = level.pre_tokenize_str(text)
        assert bytes(alphabet[c] for c in written) == text.encode(), text


@pytest.mark.parametrize("path", [SMOLLM2, QWEN3], ids=["smollm2", "qwen3"])
def test_derived_offsets_are_the_tokenizers_own(path):
    encoder = load_chat_encoder(str(path)).encoder
    backend = encoder.backend
    tokens = TokenBytes.of(backend)
    assert tokens is not None
    proven = {True: 0, False: 0}  # ASCII or not: texts whose offsets were derived, not fallen back
    for text in fixture_texts(encoder):
        ids, (starts, ends) = encode_with_offsets(backend, text, tokens)
        assert (ids, [list(starts), list(ends)]) == own(backend, text), text[:80]
        derived = tokens.offsets(text, ids) is not None
        assert derived or not text.isascii(), text[:80]
        proven[text.isascii()] += derived
    assert proven[True] > 500 and proven[False] > 10


def test_sentencepiece_and_trimming_tokenizers_always_take_encode():
    tiny = load_chat_encoder(str(TINYLLAMA)).encoder.backend
    assert TokenBytes.of(tiny) is None  # Metaspace `▁`, byte fallback: not the byte-level alphabet
    smol = load_chat_encoder(str(SMOLLM2)).encoder.backend
    trimming = Tokenizer.from_str(smol.to_str())
    trimming.post_processor = processors.ByteLevel(trim_offsets=True)
    assert TokenBytes.of(trimming) is None  # its offsets leave out a word's leading space
    trimming.post_processor = processors.ByteLevel(trim_offsets=False)
    assert TokenBytes.of(trimming) is not None
    trimming.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False)])
    assert TokenBytes.of(trimming) is None  # what a sequence does is not looked into


def test_a_text_its_bytes_do_not_prove_takes_encode():
    smol = load_chat_encoder(str(SMOLLM2)).encoder.backend
    prefixed = Tokenizer.from_str(smol.to_str())
    prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # a space the text does not have
    tokens = TokenBytes.of(prefixed)
    text = "Hello world"
    ids = prefixed.encode_batch_fast([text], add_special_tokens=False)[0].ids
    assert tokens.offsets(text, ids) is None
    got_ids, (starts, ends) = encode_with_offsets(prefixed, text, tokens)
    assert (got_ids, [list(starts), list(ends)]) == own(prefixed, text)
    # a token holding part of a character (a byte-level merge inside "☕"): no character boundary there
    tokens = TokenBytes.of(smol)
    text = "coffee ☕"
    ids = smol.encode_batch_fast([text], add_special_tokens=False)[0].ids
    assert any("\ufffd" in smol.decode([i]) for i in ids)  # SmolLM2 writes "☕" as three tokens
    assert tokens.offsets(text, ids) is None
    got_ids, (starts, ends) = encode_with_offsets(smol, text, tokens)
    assert (got_ids, [list(starts), list(ends)]) == own(smol, text)
    # an id first met in a text (the table fills) and an id past the table's end (ids with gaps)
    tokens = TokenBytes.of(smol)
    tokens.table = tokens.table[:10]
    ids = smol.encode("Hello world", add_special_tokens=False).ids
    assert tokens.offsets("Hello world", ids) == ([0, 5], [5, 11])


class CountingBackend:
    """A tokenizer backend that counts its batch calls (the derived path's encode)."""

    def __init__(self, backend):
        self.backend, self.batch_calls = backend, 0

    def encode_batch_fast(self, *args, **kwargs):
        self.batch_calls += 1
        return self.backend.encode_batch_fast(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.backend, name)


CJK = [
    f"<|im_start|>user\n问题{i}：今天天气怎么样？<|im_end|>\n<|im_start|>assistant\n很好。<|im_end|>\n"
    for i in range(40)
]


def test_a_tokenizer_the_derivation_keeps_failing_on_stops_being_tried(monkeypatch):
    """SmolLM2 writes most CJK characters as several tokens: every such text would be encoded twice."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    for path, derived in ((SMOLLM2, False), (QWEN3, True)):
        backend = CountingBackend(load_chat_encoder(str(path)).encoder.backend)
        tokens = TokenBytes.of(backend)
        for text in CJK:
            ids, (starts, ends) = encode_with_offsets(backend, text, tokens)
            assert (ids, [list(starts), list(ends)]) == own(backend.backend, text)
        if derived:  # Qwen3's vocabulary holds these characters whole
            assert backend.batch_calls == len(CJK) and tokens.failed == 0
        else:  # tried until eight texts failed, then never again
            assert backend.batch_calls == tokens.failed == offsets._FAILURES_ALLOWED


def test_with_tokenizers_parallelism_on_the_batch_call_is_not_made(monkeypatch):
    backend = CountingBackend(load_chat_encoder(str(QWEN3)).encoder.backend)
    tokens = TokenBytes.of(backend)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    ids, (starts, ends) = encode_with_offsets(backend, "Hello world", tokens)
    assert (ids, [list(starts), list(ends)]) == own(backend.backend, "Hello world")
    assert backend.batch_calls == 0
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    encode_with_offsets(backend, "Hello world", tokens)
    assert backend.batch_calls == 1


@pytest.mark.parametrize(
    ("value", "serial"),
    [(None, False), ("true", False), ("1", False), ("false", True), ("0", True), ("off", True), ("", True)],
)
def test_the_batch_call_is_used_only_with_tokenizers_parallelism_off(monkeypatch, value, serial):
    """With parallelism on, `encode_batch_fast` would hand each text to a thread pool: `encode` instead."""
    if value is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", value)
    assert offsets.serial() is serial


@pytest.mark.parametrize("path", [SMOLLM2, QWEN3], ids=["smollm2", "qwen3"])
def test_the_written_lines_are_the_same_either_way(monkeypatch, path):
    encoder = load_chat_encoder(str(path)).encoder
    lines = []
    for name in ("alpaca_en_demo.messages.jsonl", "fastchat_conversations.messages.jsonl"):
        lines += (DATA / name).read_bytes().splitlines()[:150]
    numbered = list(enumerate(lines, 1))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    derived = encode_lines(encoder, Policy(), numbered)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    own_offsets = encode_lines(encoder, Policy(), numbered)
    assert derived.out == own_offsets.out and derived.rejects == own_offsets.rejects
    assert derived.written > 250
