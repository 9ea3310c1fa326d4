"""Tests for minitrain/data/probe.py: a tokenizer loaded for chat encoding, and its template probed.

The probed facts of the fixture tokenizers (end-of-turn text and tokens, generation prompt, the tokens
trained in the model's voice), the template chosen up front (the tokenizer's, `chatml`, a Jinja file) and
the errors of loading, and the fingerprint: its values, which `train` compares with the model's tokenizer,
and its definition against a plain sorted reference. The masks themselves are tested in test_chat.py.
"""

from __future__ import annotations

import pytest

from minitrain.data import chat, probe
from minitrain.data.chat import SampleRejected
from minitrain.data.probe import load_chat_encoder
from minitrain.errors import UserError
from tests.conftest import QWEN3, SMOLLM2, TINYLLAMA, needs_fixtures
from tests.data.test_chat import assert_exact, write_tokenizer

pytestmark = needs_fixtures


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOLLM2))


# --------------------------------------------------------------------------------------- probed once per load


@pytest.mark.parametrize(
    ("folder", "eot", "voice"),
    [
        (SMOLLM2, "<|im_end|>", []),
        (TINYLLAMA, "</s>", []),
        (QWEN3, "<|im_end|>", ["<tool_call>", "</tool_call>", "<think>", "</think>"]),
    ],
    ids=lambda v: v.name if hasattr(v, "name") else None,
)
def test_the_fixture_templates_probe_as_written(folder, eot, voice):
    loaded = load_chat_encoder(str(folder))
    tok = loaded.tokenizer
    assert loaded.encoder.eot_text == eot and loaded.encoder.eot_tokens == (eot,)
    assert loaded.end_of_turn_token_ids == [tok.convert_tokens_to_ids(eot)]
    assert loaded.encoder.has_generation_prompt and loaded.encoder.final_turn_ender is None
    assert [tok.convert_ids_to_tokens(i) for i in loaded.turn_token_ids] == voice


def test_leading_added_tokens_reads_whitespace_then_the_run_of_added_tokens():
    added = ["<|end|>", "<|e|>"]  # longest first, as find_end_of_turn sorts them
    assert probe._leading_added_tokens("a \n<|end|><|e|>b", 1, added) == (" \n", ["<|end|>", "<|e|>"])
    assert probe._leading_added_tokens("a<|e|>", 1, added) == ("", ["<|e|>"])
    assert probe._leading_added_tokens("a b", 1, added) == (" ", [])


# ---------------------------------------------------------------------------------- templates chosen up front


def test_tokenizer_without_template_is_refused_with_a_hint(tmp_path, smollm2_tokenizer):
    folder = write_tokenizer(tmp_path, SMOLLM2, None)
    with pytest.raises(UserError, match="--chat-template"):
        load_chat_encoder(str(folder))
    builtin = load_chat_encoder(str(folder), "chatml")
    assert builtin.template_origin == "chatml" and builtin.encoder.eot_text == "<|im_end|>"
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    sample = builtin.encoder.encode(record)
    assert (
        smollm2_tokenizer.decode(sample.input_ids)
        == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert_exact(sample, smollm2_tokenizer, ["Hello"], "<|im_end|>")
    jinja = tmp_path / "mine.jinja"
    jinja.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\\n' }}{% endfor %}"
    )
    from_file = load_chat_encoder(str(folder), str(jinja))
    assert from_file.template_origin == str(jinja) and from_file.encoder.eot_text == "<|im_end|>"


def test_unknown_template_name_and_template_without_end_of_turn_token(tmp_path):
    with pytest.raises(UserError, match="not a built-in template"):
        load_chat_encoder(str(SMOLLM2), "vicuna")
    jinja = tmp_path / "plain.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n\\n' }}{% endfor %}")
    plain = load_chat_encoder(
        str(SMOLLM2), str(jinja)
    )  # no token ends a turn: each line says so, not the file
    with pytest.raises(SampleRejected) as err:
        plain.encoder.encode(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
        )
    assert err.value.reason == chat.NO_END_OF_TURN
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(UserError, match="does not compile"):
        load_chat_encoder(str(SMOLLM2), str(broken))
    with pytest.raises(UserError, match="missing: no such folder"):
        load_chat_encoder(str(tmp_path / "missing"))


# -------------------------------------------------------------------------------------------- the fingerprint


def test_fingerprint_is_stable_and_distinguishes_tokenizers(smollm2_tokenizer):
    smollm2, tinyllama = load_chat_encoder(str(SMOLLM2)), load_chat_encoder(str(TINYLLAMA))
    assert probe.tokenizer_fingerprint(smollm2_tokenizer) == smollm2.fingerprint
    assert smollm2.fingerprint != tinyllama.fingerprint


def _fingerprint_by_sort(tokenizer) -> str:
    """The fingerprint's definition, written plainly: every entry's line, sorted by id, hashed."""
    import hashlib

    digest = hashlib.sha256()
    for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        digest.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    return "sha256:" + digest.hexdigest()


# Written into every sidecar and compared by `train` with the model's: a change of these values would
# refuse every dataset tokenized before it.
FIXTURE_FINGERPRINTS = {
    SMOLLM2: "sha256:46c0542294848967a4ec3aa5a35e5ac8509637d09a1919a3e1c27b7f7e235f93",
    TINYLLAMA: "sha256:fe56f82cb0368a695de548846e10be3ba13a71bebd2f1a5f65a3dcbc51f73eab",
    QWEN3: "sha256:1c26410abd5642b735b24941f770906bfd8efb1f98b7fb15f2e38180c0c99ee0",
}


@pytest.mark.parametrize("folder", list(FIXTURE_FINGERPRINTS), ids=lambda p: p.name)
def test_fingerprint_keeps_its_values_and_its_definition(folder):
    tokenizer = load_chat_encoder(str(folder)).tokenizer
    assert (
        probe.tokenizer_fingerprint(tokenizer)
        == FIXTURE_FINGERPRINTS[folder]
        == _fingerprint_by_sort(tokenizer)
    )


class _Vocab:
    def __init__(self, vocab: dict) -> None:
        self.vocab = vocab

    def get_vocab(self) -> dict:
        return dict(self.vocab)


@pytest.mark.parametrize(
    "vocab",
    [
        {"c": 2, "a": 0, "b": 1},  # dense: placed by id
        {"a": 0, "c": 5, "b": 1},  # a hole, and an id past the end
        {"a": 0, "b": 1, "B": 1},  # two tokens share an id: the dict's order is kept
        {"x": -1, "a": 0, "b": 1},  # a negative id fills the slots by wrap-around: must still sort
        {"a": 0, "b": 2, "c": -1},  # a negative id with a hole
        {},
    ],
)
def test_fingerprint_equals_the_sorted_definition_for_odd_vocabularies(vocab):
    assert probe.tokenizer_fingerprint(_Vocab(vocab)) == _fingerprint_by_sort(_Vocab(vocab))
