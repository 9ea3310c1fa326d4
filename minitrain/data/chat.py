"""One input record -> `input_ids` + `labels`, with a loss mask proven against the rendered chat template.

This module owns the masking rule of the whole project: trained (label = token id) are each assistant
message's content and the end-of-turn token(s) the template puts right after it; masked (-100) is
everything else (system/user/tool turns, role headers, generation prompts, BOS, injected default system
prompts, whitespace after the end-of-turn token). Labels are aligned with `input_ids`, not shifted.

How a mask is computed (no assumption that rendering a prefix of a conversation gives a prefix of text):

    1. render the real conversation once with the template              -> text (what is tokenized)
    2. render it again with every message content wrapped in unique,    -> marked text; strip the markers
       indexed private-use markers (U+10FFF0 i U+10FFF1 ... U+10FFF0 i     and record where they were.
       U+10FFF2)                                                            The stripped text must EQUAL
                                                                            `text`, else the template
                                                                            rewrote something (retry once
                                                                            with markers inside stripped
                                                                            whitespace, for `| trim`)
    3. trained char span of an assistant turn = [content start, content end + len(end-of-turn text)),
       where the end-of-turn text (e.g. `<|im_end|>`, `</s>`, `<|eot_id|>`) is found once per template by a
       probe and must follow each trained content exactly. Turns with `tool_calls` start where the
       generation prompt of the conversation so far ends (verified to be a prefix of `text`) and end at the
       one end-of-turn text before the next message.
    4. encode `text` ONCE with character offsets (a fast tokenizer); a token is trained iff it overlaps a
       trained span. A token that crosses a span boundary is allowed only when the part outside the span
       is spaces before the content (SentencePiece's "▁Hello" after `[/INST] `) or whitespace after the
       end-of-turn token (special tokens that swallow a newline); any other crossing (e.g. a header
       newline merged with a content that starts with a newline), a content not found exactly once, or a turn not followed by its end-of-turn
       tokens rejects the sample with "alignment failure" - a mask is never guessed.

The trade-off: two template renders per sample (cheap next to tokenization) buy exactness on any
template, and the one encode per sample keeps the cost within a small factor of "render + encode".
Records of shape `pretrain` and `prompt`/`generation` need no template: the text is encoded once and the
same span rule applies, with EOS appended and trained.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from minitrain.data.format import IGNORE_INDEX
from minitrain.data.tokenizer import load_tokenizer
from minitrain.errors import UserError

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
BUILTIN_TEMPLATES = ("chatml",)

# Reasons a line is rejected (the rejects file and the summary use these exact strings).
MALFORMED_JSON = "malformed JSON"
NOT_UTF8 = "not UTF-8"
NO_KNOWN_SHAPE = "no known shape"
UNKNOWN_ROLE = "unknown role"
NON_STRING_CONTENT = "non-string content"
EMPTY_ASSISTANT = "empty assistant content"
PRETRAIN_MIXED = "pretrain mixed with roles"
TEMPLATE_ERROR = "template error"
ALIGNMENT_FAILURE = "alignment failure"
REJECT_REASONS = (
    MALFORMED_JSON,
    NOT_UTF8,
    NO_KNOWN_SHAPE,
    UNKNOWN_ROLE,
    NON_STRING_CONTENT,
    EMPTY_ASSISTANT,
    PRETRAIN_MIXED,
    TEMPLATE_ERROR,
    ALIGNMENT_FAILURE,
)
TOO_LONG = "too long"  # the one reason a line is dropped

# Markers: U+10FFF0 <index> U+10FFF1 opens message <index>'s content, U+10FFF0 <index> U+10FFF2 closes it.
_MARK_LEAD, _MARK_OPEN, _MARK_CLOSE = "\U0010fff0", "\U0010fff1", "\U0010fff2"
_MARK_RE = re.compile("\U0010fff0(\\d+)([\U0010fff1\U0010fff2])")
_PROBE_CONTENTS = (
    "minitrain probe one",
    "minitrain probe two",
    "minitrain probe three",
    "minitrain probe four",
)


class SampleRejected(Exception):
    """A record that cannot be turned into a sample; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class EncodedSample:
    """Token ids and aligned labels (-100 where not trained) of one record."""

    input_ids: list[int]
    labels: list[int]


def _build_environment() -> Any:
    """A Jinja environment that renders like transformers' `apply_chat_template` (sandboxed, same filters)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag) renders its body unchanged.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _template_message(message: dict[str, Any], content: Any) -> dict[str, Any]:
    """The message as a template sees it: None-valued keys dropped (as transformers does), reasoning aliased."""
    out = {k: v for k, v in message.items() if v is not None and k != "content"}
    if content is not None:
        out["content"] = content
    reasoning = next((out[k] for k in ("reasoning_content", "thinking", "reasoning") if k in out), None)
    if reasoning is not None:
        out.setdefault("thinking", reasoning)
        out.setdefault("reasoning_content", reasoning)
    return out


def _strip_markers(marked: str) -> tuple[str, dict[int, list[int]], dict[int, list[int]]]:
    """Remove the markers; return the plain text and, per message index, where its opens/closes sit in it."""
    pieces: list[str] = []
    opens: dict[int, list[int]] = {}
    closes: dict[int, list[int]] = {}
    last = length = 0
    for match in _MARK_RE.finditer(marked):
        piece = marked[last : match.start()]
        pieces.append(piece)
        length += len(piece)
        last = match.end()
        (opens if match.group(2) == _MARK_OPEN else closes).setdefault(int(match.group(1)), []).append(length)
    pieces.append(marked[last:])
    return "".join(pieces), opens, closes


class ChatEncoder:
    """Encodes records for one tokenizer and chat template; picklable for worker processes.

    Build it with `load_chat_encoder`. It holds only the fast tokenizer backend, the template source and a
    few facts found once (BOS handling, the end-of-turn text and ids), so workers need no transformers.
    """

    def __init__(
        self,
        *,
        backend: Any,
        template_source: str,
        template_kwargs: dict[str, Any],
        bos_text: str | None,
        prefix_ids: list[int],
        eos_id: int,
        eot_text: str,
        eot_ids: list[int],
    ) -> None:
        self.backend = backend  # tokenizers.Tokenizer
        self.template_source = template_source
        # the special tokens a template may read (bos_token, eos_token, ...), as transformers passes them
        self.template_kwargs = template_kwargs
        self.bos_text = bos_text
        self.prefix_ids = prefix_ids  # what the tokenizer puts before a text (BOS), masked
        self.eos_id = eos_id
        self.eot_text = eot_text  # text the template puts right after assistant content, e.g. "<|im_end|>"
        self.eot_ids = eot_ids  # the ids of the added tokens in eot_text, e.g. [2]
        self._template = _build_environment().from_string(template_source)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_template"]  # compiled Jinja is not picklable; recompiled on arrival
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._template = _build_environment().from_string(self.template_source)

    # ---------------------------------------------------------------- rendering
    def render(
        self, messages: list[dict[str, Any]], tools: Any = None, add_generation_prompt: bool = False
    ) -> str:
        """The template's text for `messages` (as `apply_chat_template(..., tokenize=False)` renders it)."""
        kwargs = dict(self.template_kwargs)
        kwargs.update(
            messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt
        )
        return self._template.render(**kwargs)

    def _render_or_reject(
        self, messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool = False
    ) -> str:
        try:
            return self.render(messages, tools, add_generation_prompt)
        # A template may raise anything: raise_exception(...), a TypeError on None + str, ...
        except Exception as err:
            raise SampleRejected(TEMPLATE_ERROR, f"{type(err).__name__}: {err}"[:300]) from None

    # ---------------------------------------------------------------- encoding
    def encode(self, record: Any) -> EncodedSample:
        """One parsed JSON record -> sample; raises SampleRejected with one of REJECT_REASONS."""
        if not isinstance(record, dict):
            raise SampleRejected(NO_KNOWN_SHAPE, f"expected a JSON object, got {type(record).__name__}")
        messages = record.get("messages")
        if messages is not None:
            if (
                not isinstance(messages, list)
                or not messages
                or not all(isinstance(m, dict) for m in messages)
            ):
                raise SampleRejected(NO_KNOWN_SHAPE, "`messages` must be a non-empty list of objects")
            roles = [m.get("role") for m in messages]
            if "pretrain" in roles:
                if any(r != "pretrain" for r in roles):
                    raise SampleRejected(
                        PRETRAIN_MIXED, "a `pretrain` message must be the only role on its line"
                    )
                return self._encode_pretrain(messages)
            return self._encode_chat(messages, record.get("tools"))
        if "prompt" in record and "generation" in record:
            return self._encode_prompt_generation(record["prompt"], record["generation"])
        raise SampleRejected(NO_KNOWN_SHAPE, "expected `messages`, or `prompt` and `generation`")

    def _ids_with_prefix(self, text: str) -> tuple[list[int], list[tuple[int, int]], int]:
        """(ids, char offsets of the text's tokens, number of prefix ids in front) from ONE encode."""
        enc = self.backend.encode(text, add_special_tokens=False)
        ids = enc.ids
        if self.prefix_ids and not (self.bos_text and text.startswith(self.bos_text)):
            return self.prefix_ids + ids, enc.offsets, len(self.prefix_ids)
        return ids, enc.offsets, 0

    def _labels(
        self,
        text: str,
        ids: list[int],
        offsets: list[tuple[int, int]],
        shift: int,
        spans: list[tuple[int, int]],
    ) -> list[int]:
        """Label the tokens overlapping the trained char spans; reject on any token that crosses a boundary."""
        labels = [IGNORE_INDEX] * len(ids)
        prev_hi = 0
        for start, end in spans:
            lo = bisect.bisect_right(offsets, start, key=lambda o: o[1])  # first token ending after `start`
            hi = bisect.bisect_left(offsets, end, key=lambda o: o[0])  # first token starting at/after `end`
            if lo >= hi or lo < prev_hi:
                raise SampleRejected(
                    ALIGNMENT_FAILURE, f"no tokens for the trained text at chars {start}..{end}"
                )
            first, last = offsets[lo], offsets[hi - 1]
            # A word token may carry the space before it ("▁Hello", "ĠHello"): trained. Anything else, e.g. a
            # header newline merged into the content's first token, has no exact mask.
            if first[0] < start and text[first[0] : start].strip(" "):
                raise SampleRejected(
                    ALIGNMENT_FAILURE, f"a token crosses the start of the trained text at char {start}"
                )
            if last[1] > end and not text[end : last[1]].isspace():
                raise SampleRejected(
                    ALIGNMENT_FAILURE, f"a token crosses the end of the trained text at char {end}"
                )
            labels[shift + lo : shift + hi] = ids[shift + lo : shift + hi]
            prev_hi = hi
        return labels

    def _encode_plain(self, text: str, trained_from: int) -> EncodedSample:
        """`text[trained_from:]` + EOS trained, the rest masked (pretrain and prompt/generation records)."""
        ids, offsets, shift = self._ids_with_prefix(text)
        labels = self._labels(text, ids, offsets, shift, [(trained_from, len(text))])
        return EncodedSample(ids + [self.eos_id], labels + [self.eos_id])

    def _encode_pretrain(self, messages: list[dict[str, Any]]) -> EncodedSample:
        """Each `pretrain` content + EOS, all trained; the tokenizer's BOS (if any) once in front, masked."""
        contents = [m.get("content") for m in messages]
        if not all(isinstance(c, str) for c in contents):
            raise SampleRejected(NON_STRING_CONTENT, "`pretrain` content must be a string")
        if not any(c.strip() for c in contents):
            raise SampleRejected(EMPTY_ASSISTANT, "`pretrain` content is empty")
        ids = list(self.prefix_ids)
        for content in contents:
            ids += self.backend.encode(content, add_special_tokens=False).ids
            ids.append(self.eos_id)
        k = len(self.prefix_ids)
        return EncodedSample(ids, [IGNORE_INDEX] * k + ids[k:])

    def _encode_prompt_generation(self, prompt: Any, generation: Any) -> EncodedSample:
        if not isinstance(prompt, str) or not isinstance(generation, str):
            raise SampleRejected(NON_STRING_CONTENT, "`prompt` and `generation` must be strings")
        if not generation.strip():
            raise SampleRejected(EMPTY_ASSISTANT, "`generation` is empty")
        return self._encode_plain(prompt + generation, len(prompt))

    def _check_messages(self, messages: list[dict[str, Any]]) -> None:
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in CHAT_ROLES:
                raise SampleRejected(
                    UNKNOWN_ROLE, f"message {i}: role {role!r} (expected system, user, assistant, tool)"
                )
            if content is not None and not isinstance(content, str):
                raise SampleRejected(NON_STRING_CONTENT, f"message {i}: content is {type(content).__name__}")
            if role == "assistant" and not (content or "").strip() and not message.get("tool_calls"):
                raise SampleRejected(
                    EMPTY_ASSISTANT, f"message {i}: assistant content is empty and there are no tool_calls"
                )
            if not isinstance(message.get("train", True), bool):
                raise SampleRejected(NO_KNOWN_SHAPE, f"message {i}: `train` must be true or false")
            if message.get("tool_calls") is not None and not isinstance(message["tool_calls"], list):
                raise SampleRejected(NO_KNOWN_SHAPE, f"message {i}: `tool_calls` must be a list")

    def _marked_render(
        self, messages: list[dict[str, Any]], tools: Any, text: str, inside_whitespace: bool
    ) -> tuple[dict[int, list[int]], dict[int, list[int]]] | None:
        """Where each content sits in `text`, from a render with markers; None if it does not reproduce `text`."""
        marked = []
        for i, m in enumerate(messages):
            content = m.get("content")
            if isinstance(content, str) and content:
                # inside_whitespace: markers go inside leading/trailing whitespace a template may `| trim`
                if inside_whitespace:
                    core = content.strip()
                    head = content[: len(content) - len(content.lstrip())]
                    tail = content[len(head) + len(core) :]
                    content = f"{head}{_MARK_LEAD}{i}{_MARK_OPEN}{core}{_MARK_LEAD}{i}{_MARK_CLOSE}{tail}"
                else:
                    content = f"{_MARK_LEAD}{i}{_MARK_OPEN}{content}{_MARK_LEAD}{i}{_MARK_CLOSE}"
            marked.append(_template_message(m, content))
        try:
            plain, opens, closes = _strip_markers(self.render(marked, tools))
        except Exception:
            return None
        return (opens, closes) if plain == text else None

    def _encode_chat(self, messages: list[dict[str, Any]], tools: Any) -> EncodedSample:
        self._check_messages(messages)
        real = [_template_message(m, m.get("content")) for m in messages]
        text = self._render_or_reject(real, tools)
        if _MARK_LEAD in text:
            raise SampleRejected(
                ALIGNMENT_FAILURE, "the text contains U+10FFF0, which minitrain uses as a marker"
            )
        located = self._marked_render(messages, tools, text, False) or self._marked_render(
            messages, tools, text, True
        )
        if located is None:
            raise SampleRejected(
                ALIGNMENT_FAILURE, "the template rewrites message contents (marked render differs)"
            )
        opens, closes = located
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or m.get("train", True) is False:
                continue
            if m.get("tool_calls"):
                spans.append(self._tool_call_span(messages, tools, text, i, opens, closes))
            else:
                spans.append(self._content_span(text, i, opens, closes))
        spans.sort()
        ids, offsets, shift = self._ids_with_prefix(text)
        labels = self._labels(text, ids, offsets, shift, spans)
        # Each trained turn must end with the end-of-turn ids (the check that catches a stray tokenizer).
        k = len(self.eot_ids)
        for _, end in spans:
            hi = bisect.bisect_left(offsets, end, key=lambda o: o[0]) + shift
            if ids[hi - k : hi] != self.eot_ids:
                raise SampleRejected(
                    ALIGNMENT_FAILURE,
                    f"the trained text ending at char {end} does not end in {self.eot_text!r}",
                )
        return EncodedSample(ids, labels)

    def _content_span(
        self, text: str, i: int, opens: dict[int, list[int]], closes: dict[int, list[int]]
    ) -> tuple[int, int]:
        starts, ends = opens.get(i, []), closes.get(i, [])
        if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
            raise SampleRejected(
                ALIGNMENT_FAILURE,
                f"message {i}: its content appears {len(starts)} times in the rendered text",
            )
        start, end = starts[0], ends[0]
        if not text.startswith(self.eot_text, end):
            raise SampleRejected(
                ALIGNMENT_FAILURE, f"message {i}: not followed by the end-of-turn text {self.eot_text!r}"
            )
        return start, end + len(self.eot_text)

    def _tool_call_span(
        self,
        messages: list[dict[str, Any]],
        tools: Any,
        text: str,
        i: int,
        opens: dict[int, list[int]],
        closes: dict[int, list[int]],
    ) -> tuple[int, int]:
        """An assistant turn with tool_calls: from the end of its generation prompt to its end-of-turn text."""
        prefix = self._render_or_reject(
            [_template_message(m, m.get("content")) for m in messages[:i]], tools, True
        )
        if not text.startswith(prefix):
            raise SampleRejected(
                ALIGNMENT_FAILURE, f"message {i}: the generation prompt is not a prefix of the rendered text"
            )
        start = len(prefix)
        content_at = opens.get(i, [])
        if len(content_at) == 1 and content_at[0] >= start and not text[start : content_at[0]].strip():
            start = content_at[0]  # whitespace between the header and the content stays masked
        later = [p for j, ps in opens.items() if j > i for p in ps if p >= start]
        bound = min(later, default=len(text))
        search_from = max([start, *closes.get(i, [])])
        if text.count(self.eot_text, search_from, bound) != 1:
            raise SampleRejected(
                ALIGNMENT_FAILURE, f"message {i}: expected one {self.eot_text!r} after its tool calls"
            )
        eot_at = text.index(self.eot_text, search_from, bound)
        content = (messages[i].get("content") or "").strip()
        if len(text[start:eot_at].strip()) <= len(content):
            raise SampleRejected(
                TEMPLATE_ERROR, f"message {i}: the chat template does not render `tool_calls`"
            )
        return start, eot_at + len(self.eot_text)


# -------------------------------------------------------------------- loading


def resolve_chat_template(tokenizer: Any, chat_template: str | None) -> tuple[str, str]:
    """(template source, where it came from): the tokenizer's own, a built-in name, or a Jinja file."""
    if chat_template is None:
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):
            source = source.get("default")
        if not source:
            raise UserError(
                "the tokenizer has no chat template; pass --chat-template chatml (built in) or --chat-template PATH.jinja"
            )
        return source, "tokenizer"
    if chat_template in BUILTIN_TEMPLATES:
        return resources.files("minitrain").joinpath(
            f"assets/chat_templates/{chat_template}.jinja"
        ).read_text("utf-8"), chat_template
    path = Path(chat_template)
    if not path.is_file():
        raise UserError(
            f"--chat-template {chat_template}: not a built-in template ({', '.join(BUILTIN_TEMPLATES)}) and no such file"
        )
    return path.read_text("utf-8"), str(path)


def _leading_added_tokens(text: str, pos: int, added: list[str]) -> tuple[str, list[str]]:
    """(whitespace, run of added-token strings) at text[pos:]; longest token first."""
    rest = text[pos:]
    ws = rest[: len(rest) - len(rest.lstrip())]
    cursor = pos + len(ws)
    run: list[str] = []
    while (token := next((t for t in added if text.startswith(t, cursor)), None)) is not None:
        run.append(token)
        cursor += len(token)
    return ws, run


def find_end_of_turn(encoder: ChatEncoder, added_tokens: list[str]) -> tuple[str, list[str]]:
    """The text the template puts right after assistant content: optional whitespace + added tokens.

    Probed on a two-exchange conversation (with and without a system message): the common run of added
    tokens after the middle and the final assistant content, e.g. `<|im_end|>` (ChatML), `</s>` (zephyr),
    `<|eot_id|>` (Llama 3) - not the next header that may follow it without a separator.
    """
    added = sorted(added_tokens, key=len, reverse=True)
    u1, a1, u2, a2 = _PROBE_CONTENTS
    probes = [
        [
            {"role": "user", "content": u1},
            {"role": "assistant", "content": a1},
            {"role": "user", "content": u2},
            {"role": "assistant", "content": a2},
        ],
    ]
    probes.append([{"role": "system", "content": "minitrain probe system"}, *probes[0]])
    errors = []
    for messages in probes:
        try:
            text = encoder.render(messages)
        except Exception as err:
            errors.append(f"{type(err).__name__}: {err}")
            continue
        if text.count(a1) != 1 or text.count(a2) != 1:
            errors.append("the template does not render assistant contents verbatim")
            continue
        mid_end, last_end = text.index(a1) + len(a1), text.index(a2) + len(a2)
        (mid_ws, mid), (last_ws, last) = (
            _leading_added_tokens(text, mid_end, added),
            _leading_added_tokens(text, last_end, added),
        )
        common: list[str] = []
        for x, y in zip(mid, last, strict=False):
            if x != y:
                break
            common.append(x)
        if not common or mid_ws != last_ws:
            after = text[last_end : last_end + 20]
            raise UserError(
                f"the chat template puts no special end-of-turn token right after assistant messages (it writes {after!r});"
                " pass --chat-template with a template that ends assistant turns with an added token such as eos_token"
            )
        return last_ws + "".join(common), common
    raise UserError(
        f"the chat template cannot render a plain user/assistant conversation ({'; '.join(errors)[:200]})"
    )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the vocabulary in id order (added tokens included): equal fingerprints mean equal id meanings."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256()
    for token, idx in sorted(vocab.items(), key=lambda item: item[1]):
        digest.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class LoadedTokenizer:
    """What the tokenize stage needs from a tokenizer: the encoder plus facts for the sidecar."""

    encoder: ChatEncoder
    tokenizer_class: str
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int
    pad_token_id: int | None
    fingerprint: str
    template_source: str
    template_origin: str

    @property
    def template_sha256(self) -> str:
        return hashlib.sha256(self.template_source.encode("utf-8")).hexdigest()

    @property
    def end_of_turn_token_ids(self) -> list[int]:
        return list(self.encoder.eot_ids)


def load_chat_encoder(model_name_or_path: str, chat_template: str | None = None) -> LoadedTokenizer:
    """Load a (fast) tokenizer, resolve its chat template and probe it; user mistakes raise UserError."""
    tokenizer = load_tokenizer(model_name_or_path)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            f"{model_name_or_path}: the tokenizer has no fast (tokenizer.json) backend, which tokenize needs for character offsets"
        )
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"{model_name_or_path}: the tokenizer has no EOS token; set eos_token in tokenizer_config.json"
        )
    source, origin = resolve_chat_template(tokenizer, chat_template)
    with_specials = backend.encode("a", add_special_tokens=True).ids
    plain = backend.encode("a", add_special_tokens=False).ids
    # What the tokenizer puts in front of a text (BOS for Llama-style tokenizers); anything it appends is ignored.
    at = next((j for j in range(len(with_specials)) if with_specials[j : j + len(plain)] == plain), 0)
    try:
        encoder = ChatEncoder(
            backend=backend,
            template_source=source,
            template_kwargs=dict(tokenizer.special_tokens_map),
            bos_text=tokenizer.bos_token,
            prefix_ids=list(with_specials[:at]),
            eos_id=tokenizer.eos_token_id,
            eot_text="",
            eot_ids=[],
        )
    except Exception as err:
        raise UserError(f"the chat template ({origin}) does not compile: {str(err)[:200]}") from None
    added = [t.content for t in tokenizer.added_tokens_decoder.values()]
    eot_text, eot_tokens = find_end_of_turn(encoder, added)
    encoder.eot_text = eot_text
    encoder.eot_ids = [tokenizer.convert_tokens_to_ids(t) for t in eot_tokens]
    return LoadedTokenizer(
        encoder=encoder,
        tokenizer_class=type(tokenizer).__name__,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        fingerprint=tokenizer_fingerprint(tokenizer),
        template_source=source,
        template_origin=origin,
    )
