"""Tests for minitrain/data/chat.py on the chat formats of today's model families, written here.

Each template is written in this file from the family's public format (Llama 3.x, Gemma 3, Phi-3,
DeepSeek-V3, DeepSeek-R1, gpt-oss/harmony, GLM-4) onto the Qwen3 fixture vocabulary with the family's
control tokens added: nothing is downloaded. The reference renders the template with transformers and
says, per assistant message i, what the model generates at that point: the text after
render(messages[:i], add_generation_prompt=True) up to and including the token that ends the turn in that
family (its own list, written here, not minitrain's probe). Token ids must equal transformers' one-shot
encode, and each trained run must decode to exactly that text.
"""

from __future__ import annotations

import re

import pytest

from minitrain.data import chat
from minitrain.data.chat import IGNORE_INDEX, SampleRejected
from minitrain.data.probe import load_chat_encoder
from tests.conftest import QWEN3, needs_fixtures

pytestmark = needs_fixtures


LLAMA3 = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + "
    "'<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
GEMMA3 = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' %}"
    "{%- set first = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set first = '' %}"
    "{%- set loop_messages = messages %}{%- endif %}"
    "{%- for m in loop_messages %}{%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + m['content'] | trim + "
    "'<end_of_turn>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
)
PHI3 = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
DEEPSEEK_V3 = (
    "{{ bos_token }}{%- for m in messages if m['role'] == 'system' %}{{ m['content'] }}{%- endfor %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{%- endif %}"
)
# R1 (and its distills): earlier reasoning cut at </think> on every turn; the generation prompt opens <think>
DEEPSEEK_R1 = DEEPSEEK_V3.replace(
    "{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}",
    "{%- set c = m['content'] %}{%- if '</think>' in c %}{%- set c = c.split('</think>')[-1] %}{%- endif %}"
    "{{ '<｜Assistant｜>' + c + '<｜end▁of▁sentence｜>' }}",
).replace("{{ '<｜Assistant｜>' }}{%- endif %}", "{{ '<｜Assistant｜><think>\\n' }}{%- endif %}")
# harmony: analysis (reasoning) only on the final turn and on tool calls after the last user message;
# <|return|> ends the final turn, <|end|> any other message, <|call|> a tool call
GPT_OSS = (
    "{%- set ns = namespace(last_user=-1) %}{%- for m in messages %}{%- if m['role'] == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] in ('system', 'user') %}"
    "{{ '<|start|>' + m['role'] + '<|message|>' + m['content'] + '<|end|>' }}"
    "{%- elif m['role'] == 'assistant' %}"
    "{%- if m.get('thinking') and (loop.last or (m.get('tool_calls') and loop.index0 > ns.last_user)) %}"
    "{{ '<|start|>assistant<|channel|>analysis<|message|>' + m['thinking'] + '<|end|>' }}{%- endif %}"
    "{%- if m.get('tool_calls') %}{%- set call = m['tool_calls'][0]['function'] %}"
    "{{ '<|start|>assistant to=functions.' + call['name'] + '<|channel|>commentary json<|message|>' + "
    "(call['arguments'] | tojson) + '<|call|>' }}"
    "{%- else %}"
    "{{ '<|start|>assistant<|channel|>final<|message|>' + m['content'] + "
    "('<|return|>' if loop.last else '<|end|>') }}{%- endif %}"
    "{%- elif m['role'] == 'tool' %}"
    "{{ '<|start|>functions.tool to=assistant<|channel|>commentary<|message|>' + m['content'] + '<|end|>' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{ '<|start|>assistant' }}{%- endif %}"
)
# GLM-4: no end-of-turn token; the next role token ends a turn (and is a stop token at generation)
GLM4 = (
    "[gMASK]<sop>{%- for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>' }}{%- endif %}"
)

# harmony: a turn ends with the <|end|> or <|return|> that closes its final channel, or with <|call|>
HARMONY_END = re.compile(r"<\|channel\|>final<\|message\|>.*?(<\|end\|>|<\|return\|>)|<\|call\|>", re.S)
RENDERS_TOOL_CALLS = {"gpt-oss"}  # the other templates here are written without tool calls

FAMILIES = {
    # name: (template, added special tokens, bos, eos, tokens that end an assistant turn in this family)
    "llama3": (
        LLAMA3,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        ("<|eot_id|>",),
    ),
    "gemma3": (
        GEMMA3,
        ["<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        "<end_of_turn>",
        ("<end_of_turn>",),
    ),
    "phi3": (
        PHI3,
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        None,
        "<|endoftext|>",
        ("<|end|>",),
    ),
    "deepseek-v3": (
        DEEPSEEK_V3,
        ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        ("<｜end▁of▁sentence｜>",),
    ),
    "deepseek-r1": (
        DEEPSEEK_R1,
        ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        ("<｜end▁of▁sentence｜>",),
    ),
    "gpt-oss": (
        GPT_OSS,
        ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>"],
        None,
        "<|return|>",
        HARMONY_END,  # <|end|> closes analysis inside a turn; the turn goes on to its final channel
    ),
    "glm4": (
        GLM4,
        ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
        None,
        "<|endoftext|>",
        ("<|user|>", "<|observation|>"),
    ),
}

REASON = "The user greets me.\nI greet back."
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def _ua(*contents: str) -> list[dict]:
    return [{"role": ("user", "assistant")[k % 2], "content": c} for k, c in enumerate(contents)]


SHAPES = {
    "one turn": _ua("Hi", "Hello!"),
    "system + turn": [{"role": "system", "content": "Be brief."}, *_ua("Hi", "Hello!")],
    "three turns": _ua("a", "one", "b", "two", "c", "three"),
    "reasoning field": [*_ua("Hi"), {"role": "assistant", "content": "Hello!", "thinking": REASON}],
    "reasoning on several turns": [
        *_ua("Hi"),
        {"role": "assistant", "content": "Hello!", "thinking": REASON},
        *_ua("2+2?"),
        {"role": "assistant", "content": "4", "thinking": "Two and two."},
    ],
    "inline think": _ua("Hi", f"<think>\n{REASON}\n</think>\n\nHello!"),
}
TOOL_SHAPE = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL], "thinking": REASON},
    {"role": "tool", "content": "18C", "tool_call_id": "c1"},
    {"role": "assistant", "content": "It is 18C."},
]


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
    from transformers import AutoTokenizer

    name = request.param
    template, specials, bos, eos, ends = FAMILIES[name]
    tok = AutoTokenizer.from_pretrained(str(QWEN3))
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.bos_token, tok.eos_token = bos, eos
    tok.chat_template = template
    folder = tmp_path_factory.mktemp(name)
    tok.save_pretrained(folder)  # minitrain loads the folder, as a user's; the reference is `tok` itself
    return name, load_chat_encoder(str(folder)), tok, ends


def reference_turns(tok, messages: list[dict], ends: tuple[str, ...] | re.Pattern, **kwargs) -> list[str]:
    """Per assistant message i, the text after render(messages[:i], add_generation_prompt=True) up to and
    including the first of the family's end tokens after it (transformers renders; minitrain is not used).
    DeepSeek-R1's generation prompt holds `<think>\\n`, which the rendered text leaves out: the turn then
    starts after the longest part of the prompt that the text repeats (the header)."""
    full = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    turns = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True, **kwargs)
        while not full.startswith(prompt):
            prompt = prompt[:-1]
        rest = full[len(prompt) :]
        if isinstance(ends, re.Pattern):
            found = [m.end() for m in [ends.search(rest)] if m]
        else:
            found = [rest.index(t) + len(t) for t in ends if t in rest]
        turns.append(rest[: min(found)] if found else rest.rstrip())
    return turns


def trained_texts(tok, sample) -> list[str]:
    runs, previous = [], False
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return [tok.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]


ALL = list(FAMILIES)


@pytest.mark.parametrize("family", ALL, indirect=True)
@pytest.mark.parametrize("shape", [*SHAPES, "tool call + tool + answer"])
def test_every_family_every_shape_is_exact(family, shape):
    name, loaded, tok, ends = family
    messages, extra = (TOOL_SHAPE, {"tools": TOOLS}) if shape.startswith("tool") else (SHAPES[shape], {})
    record = {"messages": messages, **extra}
    if shape.startswith("tool") and name not in RENDERS_TOOL_CALLS:
        with pytest.raises(SampleRejected) as err:  # tool calls the template drops are never trained as empty
            loaded.encoder.encode(record)
        assert err.value.reason == chat.TEMPLATE_ERROR
        return
    sample = loaded.encoder.encode(record)
    expected_ids = list(tok.apply_chat_template(messages, tokenize=True, return_dict=False, **extra))
    if tok.bos_token_id is not None and loaded.encoder.prefix_ids and expected_ids[:1] != [tok.bos_token_id]:
        expected_ids = [tok.bos_token_id, *expected_ids]
    expected = reference_turns(tok, messages, ends, **extra)
    if name == "glm4":  # the last turn is left open by the template; the model ends it with <|user|>
        expected_ids.append(tok.convert_tokens_to_ids("<|user|>"))
        expected[-1] += "<|user|>"
    assert sample.input_ids == expected_ids
    assert trained_texts(tok, sample) == expected


@pytest.mark.parametrize("family", ["deepseek-r1"], indirect=True)
def test_r1_turn_that_begins_like_the_opener_starts_after_the_header(family):
    """R1's prompt ends `<｜Assistant｜><think>\n`, the text `<｜Assistant｜><html>`: they share `<`, but the
    turn starts after the header, where the added token `<think>` would be; the whole answer is trained."""
    _, loaded, tok, _ = family
    messages = _ua("Write a page.", "<html>ok</html>", "And a tag?", "<t>x</t>")
    sample = loaded.encoder.encode({"messages": messages})
    assert sample.input_ids == list(tok.apply_chat_template(messages, tokenize=True, return_dict=False))
    assert trained_texts(tok, sample) == [
        "<html>ok</html><｜end▁of▁sentence｜>",
        "<t>x</t><｜end▁of▁sentence｜>",
    ]


# TRL-style training template: {% generation %} marks what the assistant generates; transformers turns it
# into an assistant mask, a second opinion that owes nothing to minitrain's rule.
GENERATION_MARKED = (
    "{%- for m in messages %}{%- if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}"
    "{%- if m.get('reasoning_content') %}{{ '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_generation_markers_agree_with_the_rule(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(QWEN3))
    tok.chat_template = GENERATION_MARKED
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    loaded = load_chat_encoder(str(tmp_path))
    shapes = [*SHAPES.values()]
    shapes[3] = [*_ua("Hi"), {"role": "assistant", "content": "Hello!", "reasoning_content": REASON}]
    for messages in shapes:
        sample = loaded.encoder.encode({"messages": messages})
        marked = tok.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert sample.input_ids == list(marked["input_ids"])
        assert [int(lab != IGNORE_INDEX) for lab in sample.labels] == list(marked["assistant_masks"])
        assert any(marked["assistant_masks"])
