"""Tests for minitrain/data/preference.py (and the pair shapes of sources.py): each side of a pair against a
reference that renders the template itself with transformers, the three shapes of one pair, every reject."""

from __future__ import annotations

import pytest

from minitrain.data import chat
from minitrain.data.chat import SampleRejected
from minitrain.data.format import IGNORE_INDEX
from minitrain.data.preference import encode_pair
from minitrain.data.probe import load_chat_encoder
from minitrain.data.sources import is_pair_record, to_pair_record
from tests.conftest import QWEN3, SMOLLM2, needs_fixtures

pytestmark = needs_fixtures

EOT = "<|im_end|>"  # both fixture templates end a turn with it


@pytest.fixture(scope="module", params=[SMOLLM2, QWEN3], ids=["smollm2", "qwen3"])
def tokenizers(request):
    from transformers import AutoTokenizer

    return load_chat_encoder(str(request.param)).encoder, AutoTokenizer.from_pretrained(str(request.param))


def reference_side(tok, prompt: list[dict], response: list[dict]) -> tuple[list[int], list[int], int]:
    """(ids, labels, prompt_len) of prompt + response, computed independently of minitrain: transformers
    renders the text; for each response message i the trained text runs from the end of
    render(messages[:i], add_generation_prompt=True) through the next end of turn; each piece (masked or
    trained) is encoded on its own, as inference sees it (the fixture templates have no BOS)."""
    messages = [*prompt, *response]
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i in range(len(prompt), len(messages)):
        gen = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        assert full.startswith(gen), "the reference needs the prefix property"
        spans.append((len(gen), full.index(EOT, len(gen)) + len(EOT)))
    ids: list[int] = []
    labels: list[int] = []
    at = 0
    for start, end in spans:
        for piece, trained in ((full[at:start], False), (full[start:end], True)):
            piece_ids = tok(piece, add_special_tokens=False)["input_ids"] if piece else []
            ids += piece_ids
            labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
        at = end
    rest = tok(full[at:], add_special_tokens=False)["input_ids"] if full[at:] else []
    prompt_len = len(tok(full[: spans[0][0]], add_special_tokens=False)["input_ids"])
    return ids + rest, labels + [IGNORE_INDEX] * len(rest), prompt_len


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _bot(text: str, **extra) -> dict:
    return {"role": "assistant", "content": text, **extra}


PROMPTS = {
    "one turn": [_user("What is the capital of France?")],
    "system": [{"role": "system", "content": "Answer in one word."}, _user("Capital of France?")],
    # the prompt's own assistant turn is context: masked on both sides
    "multi-turn": [_user("Hi"), _bot("Hello! How can I help?"), _user("Capital of France?")],
}
RESPONSES = (
    [_bot("Paris.")],
    [_bot("  It is Lyon, I think.")],  # leading spaces: the straddle case of the generation rule
    [_bot("Paris."), _bot("Anything else?")],  # a response of two assistant messages
)


@pytest.mark.parametrize("prompt_name", list(PROMPTS))
def test_each_side_equals_the_reference_render(tokenizers, prompt_name):
    encoder, tok = tokenizers
    prompt = PROMPTS[prompt_name]
    cases = [(RESPONSES[0], RESPONSES[1]), (RESPONSES[2], RESPONSES[0])]
    if "qwen3" in tok.name_or_path:
        # Qwen3 renders an assistant turn followed by another without its empty think block, so the second
        # message's generation prompt is not a prefix: the SFT rule rejects it, and so does the pair
        record = {"prompt": prompt, "chosen": RESPONSES[2], "rejected": RESPONSES[0]}
        assert _reason(record, encoder) == chat.PREFIX_MISMATCH
        cases = cases[:1]
    for chosen, rejected in cases:
        pair = encode_pair(
            encoder, to_pair_record({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        )
        for side, response in ((pair.chosen, chosen), (pair.rejected, rejected)):
            ids, labels, prompt_len = reference_side(tok, prompt, response)
            assert (side.input_ids, side.labels) == (ids, labels)
            assert pair.prompt_len == prompt_len
        assert pair.chosen.input_ids[: pair.prompt_len] == pair.rejected.input_ids[: pair.prompt_len]
        for side in (pair.chosen, pair.rejected):
            assert set(side.labels[: pair.prompt_len]) == {IGNORE_INDEX}
            assert side.labels[pair.prompt_len] != IGNORE_INDEX


def test_qwen3_reasoning_in_a_response_is_trained():
    from transformers import AutoTokenizer

    encoder, tok = load_chat_encoder(str(QWEN3)).encoder, AutoTokenizer.from_pretrained(str(QWEN3))
    prompt = [_user("Hi"), _bot("Hello!", reasoning_content="Greet back."), _user("2+2?")]
    chosen = [_bot("4", reasoning_content="Two plus two.\nThat is four.")]
    rejected = [_bot("5")]
    pair = encode_pair(encoder, to_pair_record({"prompt": prompt, "chosen": chosen, "rejected": rejected}))
    for side, response in ((pair.chosen, chosen), (pair.rejected, rejected)):
        assert (side.input_ids, side.labels) == reference_side(tok, prompt, response)[:2]
    trained = [t for t in pair.chosen.labels if t != IGNORE_INDEX]
    assert tok.decode(trained) == "<think>\nTwo plus two.\nThat is four.\n</think>\n\n4<|im_end|>"
    trained = [t for t in pair.rejected.labels if t != IGNORE_INDEX]
    assert tok.decode(trained) == "<think>\n\n</think>\n\n5<|im_end|>"
    # the prompt's reasoning (before the last user query) is not rendered by Qwen3; as for any masked turn of
    # SFT, it is not counted as dropped (only trained turns are)
    assert "Greet back" not in tok.decode(pair.chosen.input_ids)
    assert pair.chosen.reasoning_dropped_turns == pair.rejected.reasoning_dropped_turns == 0


def test_plain_strings_mask_the_prompt_and_train_response_plus_eos(tokenizers):
    encoder, tok = tokenizers
    prompt, chosen, rejected = "Question: capital of France?\nAnswer:", " Paris", " Lyon, I think"
    pair = encode_pair(encoder, to_pair_record({"prompt": prompt, "chosen": chosen, "rejected": rejected}))
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert pair.prompt_len == len(prompt_ids)
    for side, response in ((pair.chosen, chosen), (pair.rejected, rejected)):
        response_ids = tok(response, add_special_tokens=False)["input_ids"]
        assert tok(prompt + response, add_special_tokens=False)["input_ids"] == prompt_ids + response_ids
        assert side.input_ids == prompt_ids + response_ids + [tok.eos_token_id]
        assert side.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tok.eos_token_id]


def test_the_three_shapes_of_one_pair(tokenizers):
    """prompt + responses == shared-prefix conversations; ShareGPT spelling and a `system` key too."""
    encoder, _ = tokenizers
    prompt = PROMPTS["multi-turn"]
    chosen, rejected = RESPONSES[0], RESPONSES[1]
    split = encode_pair(encoder, to_pair_record({"prompt": prompt, "chosen": chosen, "rejected": rejected}))
    whole = encode_pair(encoder, to_pair_record({"chosen": prompt + chosen, "rejected": prompt + rejected}))
    assert split == whole
    # shared prefix: the first differing message starts the response, even when only the last one differs
    context = [*prompt, _bot("Paris."), _user("And Italy?")]
    longer = {"chosen": [*context, _bot("Rome.")], "rejected": [*context, _bot("Milan.")]}
    record = to_pair_record(longer)
    assert record["prompt"] == context and record["chosen"] == [_bot("Rome.")]
    tail = encode_pair(encoder, record)
    assert tail == encode_pair(
        encoder, to_pair_record({"prompt": context, "chosen": [_bot("Rome.")], "rejected": [_bot("Milan.")]})
    )
    assert tail.chosen.labels.count(IGNORE_INDEX) > split.chosen.labels.count(IGNORE_INDEX)
    sharegpt = {
        "system": "Answer in one word.",
        "prompt": [{"from": "human", "value": "Capital of France?"}],
        "chosen": [{"from": "gpt", "value": "Paris."}],
        "rejected": [{"from": "gpt", "value": "  It is Lyon, I think."}],
    }
    plain = {"prompt": PROMPTS["system"], "chosen": RESPONSES[0], "rejected": RESPONSES[1]}
    assert encode_pair(encoder, to_pair_record(sharegpt)) == encode_pair(encoder, to_pair_record(plain))


def _reason(record: dict, encoder) -> str:
    with pytest.raises(SampleRejected) as err:
        encode_pair(encoder, to_pair_record(record))
    return err.value.reason


def test_rejects_name_their_reason():
    encoder = load_chat_encoder(str(SMOLLM2)).encoder
    prompt = PROMPTS["one turn"]
    cases = [
        ({"prompt": prompt, "chosen": [_bot("a")]}, chat.MISSING_SIDE),
        ({"prompt": prompt, "rejected": [_bot("a")], "chosen": None}, chat.MISSING_SIDE),
        ({"prompt": prompt, "chosen": [], "rejected": [_bot("a")]}, chat.EMPTY_RESPONSE),
        ({"prompt": "q", "chosen": "a", "rejected": "  "}, chat.EMPTY_RESPONSE),
        ({"chosen": prompt + [_bot("a")], "rejected": prompt + [_bot("a")]}, chat.EMPTY_RESPONSE),
        ({"chosen": prompt + [_bot("a")], "rejected": prompt}, chat.EMPTY_RESPONSE),
        ({"prompt": prompt, "chosen": [_bot("a")], "rejected": [_bot("")]}, chat.EMPTY_ASSISTANT),
        ({"prompt": prompt, "chosen": [_user("a")], "rejected": [_bot("b")]}, chat.NON_ASSISTANT_RESPONSE),
        (
            {"chosen": [_user("x"), _bot("a")], "rejected": [_user("y"), _bot("a")]},
            chat.NON_ASSISTANT_RESPONSE,
        ),
        (
            {"prompt": prompt, "chosen": [_bot("a", train=False)], "rejected": [_bot("b")]},
            chat.NO_KNOWN_SHAPE,
        ),
        ({"prompt": "q", "chosen": [_bot("a")], "rejected": [_bot("b")]}, chat.NO_KNOWN_SHAPE),
        ({"prompt": prompt, "chosen": "a", "rejected": "b"}, chat.NO_KNOWN_SHAPE),
        (
            {"prompt": prompt, "chosen": [{"role": "robot", "content": "a"}], "rejected": [_bot("b")]},
            chat.UNKNOWN_ROLE,
        ),
        # a trailing space merges into the chosen response's first token but not into the rejected one's
        ({"prompt": "Answer: ", "chosen": "Yes", "rejected": "\nNo"}, chat.PROMPT_TOKENS_DIFFER),
    ]
    assert [_reason(record, encoder) for record, _ in cases] == [reason for _, reason in cases]


def test_which_lines_are_pairs():
    from minitrain.data.sources import FieldMapping

    assert is_pair_record({"prompt": "q", "chosen": "a", "rejected": "b"})
    assert is_pair_record({"prompt": "q", "chosen": "a"})  # a pair with a missing side, rejected as such
    assert not is_pair_record({"messages": []}) and not is_pair_record(["chosen"])
    # --messages-field chosen: SFT on the chosen conversations, no line is a pair
    assert not is_pair_record({"chosen": [], "rejected": []}, FieldMapping(messages_field="chosen"))
