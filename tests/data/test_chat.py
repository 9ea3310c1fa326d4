"""Tests for minitrain/data/chat.py: exact masks on every fixture sample, real and test-built templates.

The reference is independent of the masking code: the full token sequence must equal transformers'
`apply_chat_template(..., tokenize=True)` (plus the tokenizer's BOS), and decoding each run of trained
tokens must give exactly one assistant content followed by the end-of-turn token, one run per trained turn.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import orjson
import pytest

from minitrain.data import chat
from minitrain.data.chat import IGNORE_INDEX, SampleRejected
from minitrain.data.probe import load_chat_encoder
from tests.conftest import MESSAGES_FILES, QWEN3, SMOLLM2, TINYLLAMA, needs_fixtures
from tests.data.test_template import COPY_ROUTES, TWO_EXCHANGES, UNTRACEABLE, copying_template

pytestmark = needs_fixtures


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def smollm2():
    return load_chat_encoder(str(SMOLLM2))


@pytest.fixture(scope="module")
def tinyllama():
    return load_chat_encoder(str(TINYLLAMA))


@pytest.fixture(scope="module")
def hf_tokenizers():
    from transformers import AutoTokenizer

    return {
        SMOLLM2: AutoTokenizer.from_pretrained(str(SMOLLM2)),
        TINYLLAMA: AutoTokenizer.from_pretrained(str(TINYLLAMA)),
    }


def trained_runs(sample: chat.EncodedSample) -> list[list[int]]:
    """Maximal runs of consecutive trained positions, as token ids."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token, "labels must be aligned with input_ids (not shifted)"
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = trained
    return runs


def assert_exact(sample: chat.EncodedSample, tokenizer, contents: list[str], eot: str) -> None:
    """One trained run per trained assistant content, decoding to exactly content + end-of-turn."""
    assert len(sample.labels) == len(sample.input_ids)
    runs = trained_runs(sample)
    decoded = [
        tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False) for run in runs
    ]
    assert decoded == [c + eot for c in contents]


def reference_ids(tok, messages, **kwargs) -> list[int]:
    """transformers' own token ids for a conversation (the template rendered and encoded in one call)."""
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


def write_tokenizer(tmp_path: Path, source: Path, chat_template: str | None) -> Path:
    """A copy of a fixture tokenizer folder with its chat template replaced (None: removed)."""
    folder = tmp_path / f"{source.name}-custom"
    folder.mkdir()
    for f in source.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# ----------------------------------------------------------------------------- every fixture sample, exact


@pytest.mark.parametrize("tokenizer_path", [SMOLLM2, TINYLLAMA], ids=["smollm2", "tinyllama"])
def test_every_fixture_sample_is_exact(tokenizer_path, hf_tokenizers, smollm2, tinyllama):
    loaded = smollm2 if tokenizer_path == SMOLLM2 else tinyllama
    tok = hf_tokenizers[tokenizer_path]
    eot = {SMOLLM2: "<|im_end|>", TINYLLAMA: "</s>"}[tokenizer_path]
    bos = (
        [tok.bos_token_id] if tokenizer_path == TINYLLAMA else []
    )  # zephyr: BOS added by the tokenizer, masked
    assert MESSAGES_FILES, "no fixture *.messages.jsonl files"
    checked = 0
    for path in MESSAGES_FILES:
        for line in path.read_bytes().splitlines():
            record = orjson.loads(line)
            sample = loaded.encoder.encode(record)  # raises SampleRejected: no fixture sample may be rejected
            assert sample.input_ids == bos + reference_ids(tok, record["messages"])
            contents = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
            assert_exact(sample, tok, contents, eot)
            checked += 1
    assert checked == 1499


def test_injected_system_prompt_and_headers_are_masked(smollm2, hf_tokenizers):
    tok = hf_tokenizers[SMOLLM2]
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    sample = smollm2.encoder.encode(record)
    text = tok.decode(sample.input_ids)
    assert "You are a helpful AI assistant named SmolLM" in text  # the template injected it
    assert trained_runs(sample) == [tok.encode("Hello!<|im_end|>", add_special_tokens=False)]
    # the newline after <|im_end|> is the last token and is masked
    assert sample.input_ids[-1] == tok.encode("\n")[0] and sample.labels[-1] == IGNORE_INDEX


def test_bos_is_added_once_and_masked(tinyllama):
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    sample = tinyllama.encoder.encode(record)
    assert sample.input_ids[0] == 1 and sample.input_ids.count(1) == 1 and sample.labels[0] == IGNORE_INDEX


def test_multi_turn_system_and_train_false(smollm2, tinyllama, hf_tokenizers):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "Uno.", "train": False},
        {"role": "user", "content": "Two?"},
        {"role": "assistant", "content": "Dos."},
        {"role": "user", "content": "Three?"},
        {"role": "assistant", "content": "Tres."},
    ]
    for loaded, path, eot in ((smollm2, SMOLLM2, "<|im_end|>"), (tinyllama, TINYLLAMA, "</s>")):
        sample = loaded.encoder.encode({"id": "x", "messages": messages})
        assert_exact(sample, hf_tokenizers[path], ["Dos.", "Tres."], eot)
        assert "Be brief." not in hf_tokenizers[path].decode(
            [t for t, lab in zip(sample.input_ids, sample.labels, strict=True) if lab != -100]
        )


def test_all_train_false_trains_nothing(smollm2):
    record = {
        "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "train": False}]
    }
    assert set(smollm2.encoder.encode(record).labels) == {IGNORE_INDEX}


# ----------------------------------------------------------------------------- pretrain and prompt/generation


def test_pretrain_trains_content_and_eos(smollm2, tinyllama, hf_tokenizers):
    for loaded, path in ((smollm2, SMOLLM2), (tinyllama, TINYLLAMA)):
        tok = hf_tokenizers[path]
        sample = loaded.encoder.encode({"messages": [{"role": "pretrain", "content": "The cat sat."}]})
        body = tok.encode("The cat sat.", add_special_tokens=False) + [tok.eos_token_id]
        bos = [tok.bos_token_id] if path == TINYLLAMA else []
        assert sample.input_ids == bos + body
        assert sample.labels == [IGNORE_INDEX] * len(bos) + body


def test_prompt_generation_masks_prompt_trains_generation_and_eos(smollm2, tinyllama, hf_tokenizers):
    for loaded, path in ((smollm2, SMOLLM2), (tinyllama, TINYLLAMA)):
        tok = hf_tokenizers[path]
        sample = loaded.encoder.encode({"prompt": "Question: 2+2?\nAnswer:", "generation": " four"})
        assert sample.input_ids == tok("Question: 2+2?\nAnswer: four").input_ids + [tok.eos_token_id]
        trained = [t for t, lab in zip(sample.input_ids, sample.labels, strict=True) if lab != IGNORE_INDEX]
        assert tok.decode(trained).strip() == "four" + tok.eos_token
        assert len(trained) == len(tok.encode(" four", add_special_tokens=False)) + 1


# -------------------------------------------------------------- a tokenizer built in the test (Llama 3 style)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE trained here, with Llama-3 special tokens; EOS (<|end_of_text|>) != end of
    turn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "hello world, how are you today?",
        "user assistant system",
    ] * 20
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )
    tok.chat_template = LLAMA3_TEMPLATE
    folder = tmp_path_factory.mktemp("llama3-style")
    tok.save_pretrained(folder)
    return folder


def test_llama3_style_tokenizer_built_in_test(llama3_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama3_dir))
    loaded = load_chat_encoder(str(llama3_dir))
    assert loaded.encoder.eot_text == "<|eot_id|>"
    assert loaded.end_of_turn_token_ids == [tok.convert_tokens_to_ids("<|eot_id|>")]
    messages = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world, how are you?"},
        {"role": "user", "content": "the fox"},
        {"role": "assistant", "content": "  jumps over the lazy dog \n"},  # the template trims it
    ]
    sample = loaded.encoder.encode({"messages": messages})
    assert sample.input_ids == reference_ids(tok, messages)
    assert_exact(sample, tok, ["hello world, how are you?", "jumps over the lazy dog"], "<|eot_id|>")


# ---------------------------------------------------- templates that break the "prefix renders a prefix" rule


def test_template_that_renders_the_last_turn_differently(tmp_path, hf_tokenizers):
    """A prefix of the conversation does not render to a prefix of the text; masks must still be exact."""
    template = (
        "{% for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + ('-final' if loop.last else '') + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}"
        "{% endfor %}"
    )
    loaded = load_chat_encoder(str(write_tokenizer(tmp_path, SMOLLM2, template)))
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "second"},
    ]
    assert_exact(
        loaded.encoder.encode({"messages": messages}),
        hf_tokenizers[SMOLLM2],
        ["first", "second"],
        "<|im_end|>",
    )


def test_a_turn_before_every_trained_turn_is_not_proven(tmp_path, hf_tokenizers):
    """A template whose one-message prompt is not a prefix of the text (it opens with `[single]`): the first
    turn has no exact start, so training it rejects the line. Trained only from a later turn on (`train`
    false, `--train-on last`, `--split-turns`' samples), the first turn cannot change the mask: the line is
    exact, and that turn's prompt is not rendered at all."""
    template = (
        "{% if add_generation_prompt and messages | length == 1 %}[single]{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    encoder = load_chat_encoder(str(write_tokenizer(tmp_path, SMOLLM2, template))).encoder
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "second"},
    ]
    with pytest.raises(SampleRejected) as err:
        encoder.encode({"messages": messages})
    assert err.value.reason == chat.PREFIX_MISMATCH and "message 1" in err.value.detail
    tok = hf_tokenizers[SMOLLM2]
    untrained = [{**messages[1], "train": False}, *messages[2:]]
    for sample in (
        encoder.encode({"messages": messages}, "last"),
        encoder.encode({"messages": [messages[0], *untrained]}),
    ):
        assert sample.input_ids == reference_ids(tok, messages, chat_template=template)
        assert_exact(sample, tok, ["second"], "<|im_end|>")
    rendered = []
    original = encoder.render

    def recording(messages, tools=None, add_generation_prompt=False):
        rendered.append((len(messages), add_generation_prompt))
        return original(messages, tools, add_generation_prompt)

    encoder.render = recording
    encoder.encode({"messages": messages}, "last")
    assert (1, True) not in rendered and (3, True) in rendered  # the first turn's prompt: never rendered
    # --split-turns: the first sample trains turn 1 (rejected as above); the line is one unit
    with pytest.raises(SampleRejected):
        encoder.encode_turns({"messages": messages})


def test_template_that_drops_earlier_reasoning_is_counted_not_rejected(tmp_path, hf_tokenizers):
    """Qwen3-style: earlier assistant turns lose their reasoning. The mask follows the render, and says so."""
    template = (
        "{% for m in messages %}{% set c = m['content'] %}"
        "{% if m['role'] == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}{% endfor %}"
    )
    with_prompt = template + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    loaded = load_chat_encoder(str(write_tokenizer(tmp_path, SMOLLM2, with_prompt)))
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>r</think>x"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "<think>s</think>y"},
    ]
    sample = loaded.encoder.encode({"messages": messages})
    assert_exact(sample, hf_tokenizers[SMOLLM2], ["x", "<think>s</think>y"], "<|im_end|>")
    assert (sample.reasoning_dropped_turns, sample.reasoning_dropped_tokens) == (1, 1)  # "r": one token
    # Without a generation prompt the turn is found by its content, which the template rewrote: rejected.
    (tmp_path / "no-prompt").mkdir()
    bare = load_chat_encoder(str(write_tokenizer(tmp_path / "no-prompt", SMOLLM2, template)))
    with pytest.raises(SampleRejected) as err:
        bare.encoder.encode({"messages": messages})
    assert err.value.reason == chat.CONTENTS_REWRITTEN


def test_token_crossing_the_content_start_is_rejected(tmp_path):
    """No generation prompt; header "assist" + content "ant ..." tokenizes as "ass" "istant" -> reject."""
    template = (
        "{% for m in messages %}"
        "{{ '<|im_start|>' + ('assist' if m['role'] == 'assistant' else m['role']) + m['content'] + "
        "'<|im_end|>\\n' }}"
        "{% endfor %}"
    )
    loaded = load_chat_encoder(str(write_tokenizer(tmp_path, SMOLLM2, template)))
    with pytest.raises(SampleRejected) as err:
        loaded.encoder.encode(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ant is here"}]}
        )
    assert err.value.reason == chat.TOKEN_STRADDLE


def test_header_newline_merged_into_the_content_is_cut_as_inference_sees_it(smollm2, hf_tokenizers):
    """ChatML "assistant\\n" + "  Hi" pre-tokenizes "\\n " as one token. At inference the prompt ends in
    "\\n" and the model generates "  Hi": the prompt and the turn are encoded apart, and the turn is
    trained."""
    tok = hf_tokenizers[SMOLLM2]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  Hi"}]
    sample = smollm2.encoder.encode({"messages": messages})
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    turn = tok.apply_chat_template(messages, tokenize=False)[len(prompt) :]
    expected = (
        tok(prompt, add_special_tokens=False)["input_ids"] + tok(turn, add_special_tokens=False)["input_ids"]
    )
    assert sample.input_ids == expected
    assert sample.input_ids != reference_ids(tok, messages)  # a one-shot encode merges the two
    assert_exact(sample, tok, ["  Hi"], "<|im_end|>")
    # a leading newline stays its own token here, so the one-shot encode is kept
    messages[1]["content"] = "\\nHi"
    sample = smollm2.encoder.encode({"messages": messages})
    assert sample.input_ids == reference_ids(tok, messages)
    assert_exact(sample, tok, ["\\nHi"], "<|im_end|>")


def test_non_ascii_contents_are_exact(smollm2, tinyllama, hf_tokenizers):
    """Offsets are in characters, not bytes: emoji, CJK and accents (multi-token characters) stay exact."""
    contents = ["Café ☕ is 🙂 good.", "日本語で答えます。", "Ünïcödé — ok"]
    messages = [
        m for c in contents for m in ({"role": "user", "content": "é?"}, {"role": "assistant", "content": c})
    ]
    for loaded, path, eot in ((smollm2, SMOLLM2, "<|im_end|>"), (tinyllama, TINYLLAMA, "</s>")):
        sample = loaded.encoder.encode({"messages": messages})
        assert_exact(sample, hf_tokenizers[path], contents, eot)


def test_sentencepiece_space_merged_into_first_content_token(tmp_path, hf_tokenizers):
    """Llama-2 style "[/INST] Hello": the token "▁Hello" starts on the template's space; it is trained."""
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    )
    loaded = load_chat_encoder(str(write_tokenizer(tmp_path, TINYLLAMA, template)))
    assert loaded.encoder.eot_text == " </s>"
    tok = hf_tokenizers[TINYLLAMA]
    sample = loaded.encoder.encode(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello world"}]}
    )
    assert sample.input_ids == reference_ids(
        tok,
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello world"}],
        chat_template=template,
    )
    # SentencePiece decoding drops the leading "▁" of a sequence; the run is exactly "▁Hello ▁world ▁ </s>"
    assert [tok.convert_ids_to_tokens(run) for run in trained_runs(sample)] == [
        ["▁Hello", "▁world", "▁", "</s>"]
    ]


# ------------------------------------------------------------------------------------------------- tool calls

TOOL_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nTools: ' + (tools | tojson) + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{%- if m['content'] %}"
    "{{- m['content'] }}{%- endif %}"
    "{%- for call in m.get('tool_calls', []) %}"
    "{{- '\\n<tool_call>\\n' + (call['function'] | tojson) + '\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def tool_loaded(tmp_path_factory):
    return load_chat_encoder(str(write_tokenizer(tmp_path_factory.mktemp("tools"), SMOLLM2, TOOL_TEMPLATE)))


@pytest.mark.parametrize("content", [None, "", "Let me check."])
def test_tool_calls_are_trained_like_content(tool_loaded, hf_tokenizers, content):
    tok = hf_tokenizers[SMOLLM2]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": content, "tool_calls": [CALL]},
        {"role": "tool", "content": "18C", "tool_call_id": "c1"},
        {"role": "assistant", "content": "It is 18C."},
    ]
    sample = tool_loaded.encoder.encode({"messages": messages, "tools": TOOLS})
    assert sample.input_ids == reference_ids(tok, messages, tools=TOOLS, chat_template=TOOL_TEMPLATE)
    rendered_call = "\n<tool_call>\n" + json.dumps(CALL["function"]) + "\n</tool_call>"
    assert_exact(sample, tok, [(content or "") + rendered_call, "It is 18C."], "<|im_end|>")
    assert "Tools:" in tok.decode(sample.input_ids) and "18C<|im_end|>" not in tok.decode(
        trained_runs(sample)[0]
    )


def test_tool_calls_dropped_by_the_template_are_rejected(smollm2):
    """SmolLM2's template ignores tool_calls: training an empty turn would lose them -> template error."""
    for content in ("", None):
        record = {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": content, "tool_calls": [CALL]},
            ]
        }
        with pytest.raises(SampleRejected) as err:
            smollm2.encoder.encode(record)
        assert err.value.reason == chat.TEMPLATE_ERROR


# ---------------------------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ([1, 2], chat.NO_KNOWN_SHAPE),
        ({"text": "hi"}, chat.NO_KNOWN_SHAPE),
        ({"messages": []}, chat.NO_KNOWN_SHAPE),
        ({"messages": ["hi"]}, chat.NO_KNOWN_SHAPE),
        ({"messages": [{"role": "robot", "content": "x"}]}, chat.UNKNOWN_ROLE),
        (
            {"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]},
            chat.NON_STRING_CONTENT,
        ),
        ({"messages": [{"role": "pretrain", "content": 3}]}, chat.NON_STRING_CONTENT),
        ({"prompt": "a", "generation": 7}, chat.NON_STRING_CONTENT),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
            chat.EMPTY_ASSISTANT,
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]},
            chat.EMPTY_ASSISTANT,
        ),
        ({"prompt": "a", "generation": ""}, chat.EMPTY_ASSISTANT),
        (
            {"messages": [{"role": "pretrain", "content": "x"}, {"role": "user", "content": "y"}]},
            chat.PRETRAIN_MIXED,
        ),
        (
            {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]},
            chat.TEMPLATE_ERROR,
        ),
        (
            {"messages": [{"role": "user", "content": "a\U0010fff0"}, {"role": "assistant", "content": "y"}]},
            chat.ALIGNMENT_FAILURE,
        ),
    ],
)
def test_rejection_reasons(smollm2, record, reason):
    with pytest.raises(SampleRejected) as err:
        smollm2.encoder.encode(record)
    assert err.value.reason == reason


def test_template_raise_exception_is_a_template_error(tmp_path):
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    )
    loaded = load_chat_encoder(str(write_tokenizer(tmp_path, SMOLLM2, template)))
    with pytest.raises(SampleRejected) as err:
        loaded.encoder.encode(
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                ]
            }
        )
    assert err.value.reason == chat.TEMPLATE_ERROR and "no system role" in err.value.detail


# ------------------------------------------------------------------------------------ pickled for the workers


def test_encoder_survives_pickling(smollm2):
    import pickle

    clone = pickle.loads(pickle.dumps(smollm2.encoder))
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert clone.encode(record) == smollm2.encoder.encode(record)


# ------------------------------------------------------------------ the generation rule, against transformers

REASON_A = "The user greets me.\nI should greet back."
REASON_B = "Two plus two.\nThat is four."


def reference_turns(tok, messages: list[dict], end_tokens: tuple[str, ...], **kwargs) -> list[str]:
    """Per assistant message i: what transformers renders after render(messages[:i], generation prompt),
    up to and including the first end-of-turn token after it. Independent of minitrain's code."""
    full = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    turns = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True, **kwargs)
        assert full.startswith(prompt), "the reference needs the prefix property"
        end = min(full.index(t, len(prompt)) + len(t) for t in end_tokens if t in full[len(prompt) :])
        turns.append(full[len(prompt) : end])
    return turns


def assert_generation_rule(loaded, tok, messages, end_tokens, record_extra=None, **kwargs):
    """ids = transformers' ids; the trained runs decode to exactly the reference turns."""
    sample = loaded.encoder.encode({"messages": messages, **(record_extra or {})})
    assert sample.input_ids == reference_ids(tok, messages, **kwargs)
    runs = [
        tok.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for r in trained_runs(sample)
    ]
    assert runs == reference_turns(tok, messages, end_tokens, **kwargs)
    return sample, runs


@pytest.fixture(scope="module")
def qwen3():
    from transformers import AutoTokenizer

    return load_chat_encoder(str(QWEN3)), AutoTokenizer.from_pretrained(str(QWEN3))


def _ua(*pairs: str) -> list[dict]:
    return [
        {"role": r, "content": c} for r, c in zip(["user", "assistant"] * len(pairs), pairs, strict=False)
    ]


def test_qwen3_one_turn_trains_the_empty_think_block(qwen3):
    loaded, tok = qwen3
    _, runs = assert_generation_rule(loaded, tok, _ua("Hi", "Hello!"), ("<|im_end|>",))
    assert runs == ["<think>\n\n</think>\n\nHello!<|im_end|>"]  # what the model generates


def test_qwen3_system_and_three_turns(qwen3):
    loaded, tok = qwen3
    messages = [{"role": "system", "content": "Be brief."}, *_ua("a", "one", "b", "two", "c", "three")]
    _, runs = assert_generation_rule(loaded, tok, messages, ("<|im_end|>",))
    assert runs == ["one<|im_end|>", "two<|im_end|>", "<think>\n\n</think>\n\nthree<|im_end|>"]
    assert_generation_rule(loaded, tok, messages[:3], ("<|im_end|>",))


def test_qwen3_reasoning_content_on_one_and_on_several_turns(qwen3):
    loaded, tok = qwen3
    one = _ua("Hi", "Hello!")
    one[1]["reasoning_content"] = REASON_A
    sample, runs = assert_generation_rule(loaded, tok, one, ("<|im_end|>",))
    assert runs == [f"<think>\n{REASON_A}\n</think>\n\nHello!<|im_end|>"]
    assert sample.reasoning_dropped_turns == 0
    several = _ua("Hi", "Hello!", "2+2?", "4")
    several[1]["reasoning_content"], several[3]["reasoning_content"] = REASON_A, REASON_B
    sample, runs = assert_generation_rule(loaded, tok, several, ("<|im_end|>",))
    assert runs == ["Hello!<|im_end|>", f"<think>\n{REASON_B}\n</think>\n\n4<|im_end|>"]
    # the template drops the first turn's reasoning (before the last user query): counted
    assert sample.reasoning_dropped_turns == 1
    assert sample.reasoning_dropped_tokens == len(tok(REASON_A, add_special_tokens=False)["input_ids"])
    # the same reasoning under the other field names gives the same sample
    for key in ("reasoning", "thinking"):
        renamed = [{(key if k == "reasoning_content" else k): v for k, v in m.items()} for m in several]
        assert loaded.encoder.encode({"messages": renamed}) == sample


def test_qwen3_inline_think_in_content(qwen3):
    loaded, tok = qwen3
    messages = _ua("Hi", f"<think>\n{REASON_A}\n</think>\n\nHello!")
    _, runs = assert_generation_rule(loaded, tok, messages, ("<|im_end|>",))
    assert runs == [f"<think>\n{REASON_A}\n</think>\n\nHello!<|im_end|>"]
    two = _ua("Hi", f"<think>{REASON_A}</think>Hello!", "2+2?", f"<think>{REASON_B}</think>4")
    sample, runs = assert_generation_rule(loaded, tok, two, ("<|im_end|>",))
    assert runs == ["Hello!<|im_end|>", f"<think>\n{REASON_B}\n</think>\n\n4<|im_end|>"]
    assert sample.reasoning_dropped_turns == 1


def test_reasoning_given_twice_is_rejected_not_half_lost(qwen3):
    loaded, tok = qwen3
    single = _ua("Hi", "Hello!")
    single[1]["reasoning_content"] = REASON_A
    expected = loaded.encoder.encode({"messages": single})
    # two fields that agree: one reasoning, the same sample as one field
    agree = _ua("Hi", "Hello!")
    agree[1].update(reasoning_content=REASON_A, thinking=REASON_A)
    assert loaded.encoder.encode({"messages": agree}) == expected
    # two fields that differ: Qwen3 reads `reasoning_content`, gpt-oss `thinking`; one would be lost
    differ = _ua("Hi", "Hello!")
    differ[1].update(reasoning_content=REASON_A, thinking=REASON_B)
    with pytest.raises(SampleRejected) as err:
        loaded.encoder.encode({"messages": differ})
    assert err.value.reason == chat.REASONING_TWICE
    assert err.value.detail.startswith("message 1: `reasoning_content` and `thinking` differ")
    # a field and inline <think> in the content: Qwen3 renders both blocks in one turn
    for field in (REASON_A, ""):
        both = _ua("Hi", f"<think>\n{REASON_A}\n</think>\n\nHello!")
        both[1]["reasoning"] = field
        text = tok.apply_chat_template(both, tokenize=False)
        assert text.count("</think>") == 2  # what would have been trained
        with pytest.raises(SampleRejected) as err:
            loaded.encoder.encode({"messages": both})
        assert err.value.reason == chat.REASONING_TWICE
        assert "`reasoning` and inline" in err.value.detail
    # the same on a turn of a longer conversation names its message
    later = _ua("Hi", "Hello!", "2+2?", "<think>add</think>4")
    later[3]["reasoning_content"] = REASON_B
    with pytest.raises(SampleRejected, match="message 3: reasoning both in `reasoning_content`"):
        loaded.encoder.encode({"messages": later})


def test_qwen3_non_thinking_mode_masks_the_prompts_empty_think_block(qwen3):
    """enable_thinking=false (--chat-template-kwargs): Qwen3's generation prompt holds the empty
    `<think>\n\n</think>\n\n`, so it is prompt, not trained; reasoning data contradicts it: rejected."""
    _, tok = qwen3
    loaded = load_chat_encoder(str(QWEN3), template_kwargs={"enable_thinking": False})
    off = {"enable_thinking": False}
    one = _ua("Hi", "Hello!")
    sample = loaded.encoder.encode({"messages": one})
    assert sample.input_ids == reference_ids(tok, one, **off)
    assert [tok.decode(r) for r in trained_runs(sample)] == ["Hello!<|im_end|>"]
    prompt = tok.apply_chat_template(one[:1], tokenize=False, add_generation_prompt=True, **off)
    assert prompt.endswith("<think>\n\n</think>\n\n")  # what inference puts before the answer
    # earlier turns: the text has no think block where the prompt has one; each turn starts after the
    # header, as the model generates it (not after a `<` it shares with `<think>`)
    three = _ua("a", "<b>one</b>", "b", "two", "c", "three")
    sample = loaded.encoder.encode({"messages": three})
    assert sample.input_ids == reference_ids(tok, three, **off)
    assert [tok.decode(r) for r in trained_runs(sample)] == [
        "<b>one</b><|im_end|>",
        "two<|im_end|>",
        "three<|im_end|>",
    ]
    reasoning = _ua("Hi", "Hello!")
    reasoning[1]["reasoning_content"] = REASON_A
    with pytest.raises(SampleRejected) as err:
        loaded.encoder.encode({"messages": reasoning})
    assert err.value.reason == chat.PREFIX_MISMATCH
    assert "enable_thinking=false with reasoning data?" in err.value.detail


def test_a_record_s_chat_template_kwargs_reach_its_renders_only(qwen3):
    """`chat_template_kwargs` on a line (hybrid data: thinking and non-thinking samples in one file) is
    rendered with that line alone, over the run's; every shape carries it: messages, ShareGPT, pairs."""
    from minitrain.data.preference import encode_pair
    from minitrain.data.sources import to_chat_record, to_pair_record

    loaded, tok = qwen3
    off = {"enable_thinking": False}
    messages = _ua("Hi", "Hello!")
    plain = loaded.encoder.encode({"messages": messages})
    sample = loaded.encoder.encode({"messages": messages, "chat_template_kwargs": off})
    assert sample.input_ids == reference_ids(tok, messages, **off)
    assert [tok.decode(r) for r in trained_runs(sample)] == ["Hello!<|im_end|>"]
    assert [tok.decode(r) for r in trained_runs(plain)] == ["<think>\n\n</think>\n\nHello!<|im_end|>"]
    assert loaded.encoder.encode({"messages": messages}) == plain  # the encoder itself is unchanged
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    assert loaded.encoder.encode(to_chat_record({**sharegpt, "chat_template_kwargs": off})) == sample
    alpaca = {"instruction": "Hi", "output": "Hello!", "chat_template_kwargs": off}
    assert loaded.encoder.encode(to_chat_record(alpaca)) == sample
    assert loaded.encoder.encode_turns({"messages": messages, "chat_template_kwargs": off}) == [sample]
    pair = to_pair_record(
        {
            "prompt": messages[:1],
            "chosen": messages[1:],
            "rejected": _ua("", "Bye.")[1:],
            "chat_template_kwargs": off,
        }
    )
    chosen = encode_pair(loaded.encoder, pair).chosen
    assert (chosen.input_ids, chosen.labels) == (sample.input_ids, sample.labels)
    # the run's kwargs (--chat-template-kwargs) are the base a line's override
    run_off = load_chat_encoder(str(QWEN3), template_kwargs=off)
    assert run_off.encoder.encode({"messages": messages}) == sample
    on = {"messages": messages, "chat_template_kwargs": {"enable_thinking": True}}
    assert run_off.encoder.encode(on) == plain
    # what a line's view finds about the template (traceable? its added-token pattern) is found for all
    fresh = load_chat_encoder(str(QWEN3)).encoder
    three = {"messages": _ua("a", "one", "b", "<b>two</b>"), "chat_template_kwargs": off}
    fresh.encode(three)
    assert {"traceable", "added_pattern"} <= set(fresh._found)
    assert pickle.loads(pickle.dumps(fresh)).encode(three) == fresh.encode(three)  # as a worker gets it
    for bad, says in (("yes", "must be an object, got str"), ({"messages": []}, "names 'messages'")):
        with pytest.raises(SampleRejected) as err:
            loaded.encoder.encode({"messages": messages, "chat_template_kwargs": bad})
        assert err.value.reason == chat.NO_KNOWN_SHAPE and says in err.value.detail


def test_qwen3_tool_call_tool_and_answer(qwen3):
    loaded, tok = qwen3
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL], "reasoning_content": REASON_A},
        {"role": "tool", "content": "18C", "tool_call_id": "c1"},
        {"role": "assistant", "content": "It is 18C."},
    ]
    _, runs = assert_generation_rule(
        loaded, tok, messages, ("<|im_end|>",), record_extra={"tools": TOOLS}, tools=TOOLS
    )
    assert runs[0].startswith(f"<think>\n{REASON_A}\n</think>\n\n<tool_call>\n") and "get_weather" in runs[0]
    assert runs[1] == "<think>\n\n</think>\n\nIt is 18C.<|im_end|>"


@pytest.mark.parametrize(
    ("path", "eot"), [(SMOLLM2, "<|im_end|>"), (TINYLLAMA, "</s>")], ids=["smollm2", "tinyllama"]
)
def test_generation_rule_on_smollm2_and_tinyllama(path, eot, smollm2, tinyllama, hf_tokenizers):
    loaded, tok = (smollm2 if path == SMOLLM2 else tinyllama), hf_tokenizers[path]
    bos = [tok.bos_token_id] if path == TINYLLAMA else []
    shapes = [
        _ua("Hi", "Hello!"),
        [{"role": "system", "content": "Be brief."}, *_ua("a", "one", "b", "two", "c", "three")],
        _ua("Hi", f"<think>\n{REASON_A}\n</think>\n\nHello!"),
    ]
    for messages in shapes:
        sample = loaded.encoder.encode({"messages": messages})
        assert sample.input_ids == bos + reference_ids(tok, messages)
        runs = [
            tok.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for r in trained_runs(sample)
        ]
        expected = reference_turns(tok, messages, (eot,))
        if path == TINYLLAMA:  # SentencePiece decoding drops the "▁" that opens a run
            expected = [t.lstrip(" ") for t in expected]
        assert runs == expected


# ------------------------------------------------------------------------- --train-on last, --split-turns


def test_train_on_last_trains_the_final_turn_only(qwen3):
    loaded, tok = qwen3
    messages = _ua("a", "one", "b", "two")
    sample = loaded.encoder.encode({"messages": messages}, "last")
    assert sample.input_ids == reference_ids(tok, messages)
    runs = [tok.decode(r, skip_special_tokens=False) for r in trained_runs(sample)]
    assert runs == reference_turns(tok, messages, ("<|im_end|>",))[-1:]


def test_split_turns_keeps_the_reasoning_of_every_turn(qwen3):
    """One sample per turn, each the conversation up to it: Qwen3 renders that turn's reasoning as the
    last."""
    loaded, tok = qwen3
    messages = _ua("Hi", "Hello!", "2+2?", "4", "3+3?", "6")
    for k, reason in ((1, REASON_A), (3, REASON_B), (5, "Three and three.")):
        messages[k]["reasoning_content"] = reason
    samples = loaded.encoder.encode_turns({"messages": messages})
    assert len(samples) == 3
    for sample, i in zip(samples, (1, 3, 5), strict=True):
        upto = messages[: i + 1]
        assert sample.input_ids == reference_ids(tok, upto)
        runs = [tok.decode(r, skip_special_tokens=False) for r in trained_runs(sample)]
        assert runs == reference_turns(tok, upto, ("<|im_end|>",))[-1:]
        assert runs[0].startswith(f"<think>\n{messages[i]['reasoning_content']}\n</think>")
        assert sample.reasoning_dropped_turns == 0  # earlier turns are not trained in this sample
    # `"train": false` turns get no sample; a one-turn conversation is one sample, as without the flag
    messages[3]["train"] = False
    assert len(loaded.encoder.encode_turns({"messages": messages})) == 2
    one = {"messages": _ua("Hi", "Hello!")}
    assert loaded.encoder.encode_turns(one) == [loaded.encoder.encode(one)]


# --------------------------------------------------------------------------- the faster sandbox, same renders


def test_renders_equal_transformers_on_every_fixture_record_and_prefix(qwen3, smollm2, hf_tokenizers):
    """The sandbox's remembered verdicts and direct render give transformers' text, full and per prefix."""
    encoders = [(qwen3[0].encoder, qwen3[1]), (smollm2.encoder, hf_tokenizers[SMOLLM2])]
    records = [orjson.loads(line) for p in MESSAGES_FILES for line in p.read_bytes().splitlines()]
    for encoder, tok in encoders:
        for record in records[::3]:
            messages = record["messages"]
            assert encoder.render(messages) == tok.apply_chat_template(messages, tokenize=False)
            for i in range(1, len(messages)):
                assert encoder.render(messages[:i], add_generation_prompt=True) == tok.apply_chat_template(
                    messages[:i], tokenize=False, add_generation_prompt=True
                )


# ------------------------------------------------------------- where a message begins, from the render itself


def _bounding(messages: list[dict]) -> list[int]:
    """The non-assistant messages that follow an assistant message (each bounds a turn's end)."""
    return [
        j
        for j, m in enumerate(messages)
        if m["role"] != "assistant" and any(a["role"] == "assistant" for a in messages[:j])
    ]


def test_traced_render_is_the_render_and_finds_what_the_markers_find(qwen3, smollm2, tinyllama):
    """One render with traced contents gives the plain render's text and, for each message that bounds a
    turn, the positions the marked render gives: every fixture record and the Qwen3 shapes, three
    templates."""
    from tests.data.test_chat_templates import SHAPES, TOOL_SHAPE, TOOLS

    records = [orjson.loads(line) for p in MESSAGES_FILES for line in p.read_bytes().splitlines()]
    records += [{"messages": m} for m in SHAPES.values()] + [{"messages": TOOL_SHAPE, "tools": TOOLS}]
    for encoder in (qwen3[0].encoder, smollm2.encoder, tinyllama.encoder):
        traced = 0
        for record in records:
            messages, tools = record["messages"], record.get("tools")
            needed = _bounding(messages)
            if not needed:
                continue
            real = [chat._template_message(m, m.get("content")) for m in messages]
            text, opens = encoder._traced_render(real, tools, needed)
            assert text == encoder.render(real, tools)
            assert type(text) is str
            located = encoder._marked_render(messages, tools, text, False, "assistant")
            marked = located[0] if located is not None else {}
            if any(j not in marked for j in needed):  # the template drops it (a tool message on TinyLlama)
                assert opens is None
                continue
            assert opens is not None
            assert {j: opens[j] for j in needed} == {j: marked[j] for j in needed}
            traced += 1
        assert traced > 300


@pytest.mark.parametrize("route", [*COPY_ROUTES, *UNTRACEABLE])
def test_a_content_copied_past_the_trace_falls_back_to_the_marked_render(route, tmp_path):
    from transformers import AutoTokenizer

    folder = write_tokenizer(tmp_path, SMOLLM2, copying_template(route))
    loaded, tok = load_chat_encoder(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    real = [chat._template_message(m, m["content"]) for m in TWO_EXCHANGES]
    text, opens = loaded.encoder._traced_render(real, None, [2])
    assert text == loaded.encoder.render(real)
    assert opens is None
    assert loaded.encoder._traceable() is (route in COPY_ROUTES)
    assert_generation_rule(loaded, tok, TWO_EXCHANGES, ("<|im_end|>",))
