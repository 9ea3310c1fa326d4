"""One input record -> `input_ids` + `labels`, with a loss mask proven against the rendered chat template.

This module owns the masking rule of the whole project, the generation rule: for each assistant message i,
trained (label = token id) is exactly what the model generates at that point - the text the template
renders after `render(messages[:i], add_generation_prompt=True)`, up to and including the token that ends
the turn (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`, `</s>`, gpt-oss's `<|return|>`/`<|call|>`,
GLM's next role token). That covers reasoning blocks with their tags, tool calls with their wrappers and
anything else the template writes in the model's voice. Masked (-100) is everything else (system/user/tool
turns, role headers, generation prompts, BOS, whitespace after the end of turn). Labels are aligned with
`input_ids`, not shifted. `train_on="last"` trains only the last assistant message; `encode_turns` makes
one sample per turn (the conversation up to it, trained on it alone: `--split-turns`).

How a mask is computed, every step checked (a mask is never guessed):

    1. text = render(messages): what is tokenized.
    2. prefix property: prompt_i = render(messages[:i], add_generation_prompt=True) must be a prefix of
       text; the turn starts at len(prompt_i). The one exact alternative: a prompt whose tail the text does
       not repeat (DeepSeek-R1 opens `<think>\n` in the prompt only, Qwen3 with enable_thinking=false
       closes an empty block there) - the turn then starts where that tail's first added token (`<think>`)
       starts, after the header, unless the text goes on with that very token (it repeats the tail in
       part: no exact start). Else: "generation prompt not a prefix".
    3. end of turn: the last turn-ending token (probed once per template, minitrain/data/probe.py: the first
       added token after a middle and a final assistant content, and right after a tool call's arguments)
       before the next message begins. Where the next message begins is known from the render of `text`
       itself, its contents traced (`Traced`, minitrain/data/template.py: equal in value, followed through
       `+`; any other way of making text out of them gives the trace up), else from one more render with the
       contents of system/user/tool messages wrapped in private-use markers (U+10FFF0 j U+10FFF1 ... U+10FFF2;
       the stripped render must equal `text`, retried with markers inside `| trim`med whitespace). "Last", not
       "first": gpt-oss closes its analysis channel with `<|end|>` inside the turn. No token: "no end of turn"
       - except the last turn of a template that leaves it open (GLM-4), which is closed with the token that
       ends its other turns (the model's stop token), appended and trained.
    4. contents: the turn's answer, its tool calls' names and its reasoning (a `reasoning_content`,
       `reasoning` or `thinking` field, or inline `<think>...</think>`) must lie in the trained text, else
       "content outside its turn" / "template error" (tool calls not rendered). Reasoning that the template
       does not render at all (Qwen3 before the last user query, DeepSeek-R1, gpt-oss) is the template's
       meaning: not an error, counted per sample (turns and tokens) for the summary, sidecar and --stats.
    5. encode `text` ONCE with character offsets (minitrain/data/offsets.py); a token is trained iff it
       overlaps a trained span. The last trained token of a turn must be a turn-ending id.

Leading whitespace (a token straddling the start of a turn): decided as inference sees it. At inference the
prompt is tokenized alone and the model generates from a fresh token, so when a token holds text on both
sides of a turn's start (ChatML `assistant\n` + a content starting with spaces tokenizes `\n ` as one
token), the text is encoded in pieces cut at that start: the prompt exactly as inference tokenizes it, the
turn as the model would generate it. Such a sample's ids then differ from a one-shot encode of the text at
that boundary only. A piece that does not decode back to itself (SentencePiece adds a `▁` to a text it
starts) is rejected ("token crosses a turn edge"). Spaces before the start are not a straddle: SentencePiece's
`▁Hello` after `[/INST] ` carries the template's space and is trained, as before.

Templates without a generation prompt (add_generation_prompt adds nothing) have no rule to follow: each
turn is then found by its content (all contents marked) and trained from it through the end-of-turn text
probed after it - the rule minitrain used before, kept for such templates.

The trade-off: per sample, one render of the text (traced where a later message bounds a turn; a marked
render more when the trace is given up) and one prefix render per assistant turn (cheap next to
tokenization for a few turns; multi-turn samples cost more) buy exactness on any template; the one encode
per sample keeps the cost within a small factor of "render + encode".
Records of shape `pretrain` and `prompt`/`generation` need no template: the text is encoded once and the
same span rule applies, with EOS appended and trained.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from minitrain.config import own_template_name
from minitrain.data.format import IGNORE_INDEX
from minitrain.data.offsets import Offsets, TokenBytes, encode_with_offsets
from minitrain.data.template import Traced, build_environment, names_read, traceable

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})

# Reasons a line is rejected (the rejects file and the summary use these exact strings).
MALFORMED_JSON = "malformed JSON"
NOT_UTF8 = "not UTF-8"
NO_KNOWN_SHAPE = "no known shape"
UNKNOWN_ROLE = "unknown role"
NON_STRING_CONTENT = "non-string content"
EMPTY_ASSISTANT = "empty assistant content"
REASONING_TWICE = "reasoning given twice"  # two differing reasoning fields, or a field and inline <think>
PRETRAIN_MIXED = "pretrain mixed with roles"
TEMPLATE_ERROR = "template error"
ALIGNMENT_FAILURE = "alignment failure"  # the text holds minitrain's marker, or a trained span has no tokens
# One reason per check of the generation rule (see the module docstring), so a rejection says which failed.
PREFIX_MISMATCH = "generation prompt not a prefix"
NO_END_OF_TURN = "no end of turn"
OUTSIDE_TURN = "content outside its turn"
TOKEN_STRADDLE = "token crosses a turn edge"
CONTENTS_REWRITTEN = "template rewrites contents"
# Preference pairs (minitrain/data/preference.py) and files mixing pairs with SFT records.
MISSING_SIDE = "missing side"
EMPTY_RESPONSE = "empty response"
NON_ASSISTANT_RESPONSE = "non-assistant response"
PROMPT_TOKENS_DIFFER = "prompt tokens differ"
MIXED_KINDS = "mixed kinds"
REJECT_REASONS = (
    MALFORMED_JSON,
    NOT_UTF8,
    NO_KNOWN_SHAPE,
    UNKNOWN_ROLE,
    NON_STRING_CONTENT,
    EMPTY_ASSISTANT,
    REASONING_TWICE,
    PRETRAIN_MIXED,
    TEMPLATE_ERROR,
    ALIGNMENT_FAILURE,
    PREFIX_MISMATCH,
    NO_END_OF_TURN,
    OUTSIDE_TURN,
    TOKEN_STRADDLE,
    CONTENTS_REWRITTEN,
    MISSING_SIDE,
    EMPTY_RESPONSE,
    NON_ASSISTANT_RESPONSE,
    PROMPT_TOKENS_DIFFER,
    MIXED_KINDS,
)
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")  # assistant fields that hold reasoning
TOO_LONG = "too long"  # the one reason a line is dropped

# Markers: U+10FFF0 <index> U+10FFF1 opens message <index>'s content, U+10FFF0 <index> U+10FFF2 closes it.
_MARK_LEAD, _MARK_OPEN, _MARK_CLOSE = "\U0010fff0", "\U0010fff1", "\U0010fff2"
_MARK_RE = re.compile("\U0010fff0(\\d+)([\U0010fff1\U0010fff2])")


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
    reasoning_dropped_turns: int = 0  # assistant turns whose reasoning the template does not render
    reasoning_dropped_tokens: int = 0  # tokens of that reasoning (encoded alone)


@dataclass(frozen=True)
class PlannedSample:
    """A chat record rendered and its trained spans located and checked: all of `encode` but the encode
    itself and the labels, which `ChatEncoder.finish` adds."""

    text: str
    spans: list[tuple[int, int]]  # trained character spans of `text`
    append: bool  # the last turn is left open by the template (GLM-4): its ending token is appended
    reasoning_dropped_turns: int = 0
    reasoning_dropped_tokens: int = 0


def _template_message(message: dict[str, Any], content: Any) -> dict[str, Any]:
    """The message as a template sees it: None-valued keys dropped (as transformers does), reasoning
    aliased."""
    out = {k: v for k, v in message.items() if v is not None and k != "content"}
    if content is not None:
        out["content"] = content
    for key in REASONING_KEYS:
        if key in out:
            out.setdefault("thinking", out[key])
            out.setdefault("reasoning_content", out[key])
            break
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

    Build it with `probe.load_chat_encoder`. It holds only the fast tokenizer backend, the template source
    and a few facts found once (BOS handling, the end-of-turn text and ids), so workers need no transformers.
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
        eot_tokens: tuple[str, ...] = (),
        has_generation_prompt: bool = True,
        final_turn_ender: str | None = None,
        added_tokens: tuple[str, ...] = (),
    ) -> None:
        self.backend = backend  # tokenizers.Tokenizer
        self.template_source = template_source
        # the special tokens a template may read (bos_token, eos_token, ...), as transformers passes them
        self.template_kwargs = template_kwargs
        self.bos_text = bos_text
        self.prefix_ids = prefix_ids  # what the tokenizer puts before a text (BOS), masked
        self.eos_id = eos_id
        self.eot_text = eot_text  # text the template puts right after assistant content, e.g. "<|im_end|>"
        self.eot_ids = eot_ids  # the ids of the tokens that end a turn, e.g. [2]
        # the tokens that end a turn (gpt-oss has three, GLM's is the next role token), e.g. ("<|im_end|>",)
        self.eot_tokens = eot_tokens
        # False: add_generation_prompt adds nothing, so turns are located by their content (the fallback)
        self.has_generation_prompt = has_generation_prompt
        # GLM-4: the template ends a turn with the next role token, so the last turn ends with nothing; the
        # model generates this token there (it is a stop token), so it is appended and trained
        self.final_turn_ender = final_turn_ender
        # the tokenizer's added tokens (`<think>`, role tokens): where a generation prompt's opener may start
        self.added_tokens = added_tokens
        self._compile()

    def _compile(self) -> None:
        self._template = build_environment().from_string(self.template_source)
        self._globals = dict(self._template.globals)  # a ChainMap in Jinja: merged once, not per render
        # facts about the template found when first needed, one dict shared with `_with_kwargs` views
        self._found: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_template"], state["_globals"], state["_found"]  # Jinja code is not picklable: compiled
        return state  # again on arrival

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._compile()

    # ---------------------------------------------------------------- rendering
    def render(
        self, messages: list[dict[str, Any]], tools: Any = None, add_generation_prompt: bool = False
    ) -> str:
        """The template's text for `messages` (as `apply_chat_template(..., tokenize=False)` renders it)."""
        context = self._context(messages, tools, add_generation_prompt)
        try:
            return "".join(self._template.root_render_func(context))
        except Exception:
            return self._template.environment.handle_exception()  # Jinja's traceback rewrite; re-raises

    def _context(self, messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool) -> Any:
        """The Jinja context of one render: what Template.render builds (globals, then the special tokens,
        then the call's names), with the globals merged once per encoder instead of through a ChainMap on
        every call, and the Context built directly (Template.new_context would turn that ChainMap into a
        set each time): several renders per sample."""
        variables = {**self._globals, **self.template_kwargs}
        variables.update(
            messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt
        )
        template = self._template
        environment = template.environment
        return environment.context_class(
            environment, variables, template.name, template.blocks, self._globals
        )

    def _traced_render(
        self, real: list[dict[str, Any]], tools: Any, traced: list[int]
    ) -> tuple[str, dict[int, list[int]] | None]:
        """(text, where each traced message's content starts in it), from ONE render: the render itself.

        The contents of messages `traced` are passed as `Traced` strings (equal in value, so the text is
        exactly `render(real)`), and each output piece tells where they landed. The positions are None (not
        known; the caller falls back to a marked render) when a traced content was made into text by anything
        but `+` (a str method, `%`, a call that takes it, `tojson`: flagged as they happen), or did not reach
        the text. What cannot be flagged as it happens (`~`, `join`, macros and blocks, which copy text in C)
        is refused up front: such a template is not traced at all (see _traceable, template.py).
        """
        if not self._traceable():
            return self._render_or_reject(real, tools), None
        lost = [False]
        messages = list(real)
        for j in traced:
            content = Traced(real[j]["content"])
            content.lost, content.spans = lost, ((0, j),)
            messages[j] = {**real[j], "content": content}
        context = self._context(messages, tools, add_generation_prompt=False)
        environment = self._template.environment
        pieces: list[str] = []
        opens: dict[int, list[int]] = {}
        length = 0
        environment.tracing = True
        try:
            for piece in self._template.root_render_func(context):
                if type(piece) is Traced:
                    for at, j in piece.spans:
                        opens.setdefault(j, []).append(length + at)
                    piece = str.__str__(piece)  # a plain str: nothing traced leaves this function
                pieces.append(piece)
                length += len(piece)
        except Exception:
            environment.tracing = False
            return self._render_or_reject(real, tools), None  # the plain render raises it (or not) as itself
        finally:
            environment.tracing = False
        text = "".join(pieces)
        if lost[0] or any(j not in opens for j in traced):
            return text, None
        return text, opens

    def _added_tokens_in(self, text: str) -> Iterator[tuple[int, str]]:
        """(index, token) of each added token in `text`, left to right, longest first where they overlap (as
        the tokenizer splits them out); one pattern of them all, compiled once per process."""
        pattern = self._fact("added_pattern", self._added_pattern)
        return ((match.start(), match.group()) for match in pattern.finditer(text))

    def _added_pattern(self) -> re.Pattern[str]:
        tokens = sorted(self.added_tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, tokens)) if tokens else "(?!)")

    def _fact(self, key: str, find: Callable[[], Any]) -> Any:
        """A fact about the template, found by `find` the first time it is asked for in this process and
        kept in `_found` (shared with the `_with_kwargs` views)."""
        if key not in self._found:
            self._found[key] = find()
        return self._found[key]

    def syntax(self) -> Any:
        """The template's Jinja syntax tree, parsed once per process (the facts below are read from it)."""
        return self._fact("syntax", lambda: self._template.environment.parse(self.template_source))

    def _traceable(self) -> bool:
        """template.traceable of this template (decided once per template, from its syntax tree)."""
        return self._fact("traceable", lambda: traceable(self.syntax()))

    def names_read(self) -> frozenset[str]:
        """The names this template reads from its render's context (template.names_read, once per
        template)."""
        return self._fact("reads", lambda: names_read(self.syntax()))

    def unread_names(self, kwargs: dict[str, Any]) -> list[str]:
        """The names of `kwargs` (chat_template_kwargs) this template never reads: passing them changes
        nothing."""
        reads = self.names_read()
        return [name for name in kwargs if name not in reads]

    def _render_or_reject(
        self, messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool = False
    ) -> str:
        try:
            return self.render(messages, tools, add_generation_prompt)
        # A template may raise anything: raise_exception(...), a TypeError on None + str, ...
        except Exception as err:
            raise SampleRejected(TEMPLATE_ERROR, f"{type(err).__name__}: {err}"[:300]) from None

    # ---------------------------------------------------------------- encoding
    def encode(self, record: Any, train_on: str = "all") -> EncodedSample:
        """One parsed JSON record -> sample; raises SampleRejected with one of REJECT_REASONS.

        `train_on`: "all" trains every assistant turn (except `"train": false` ones), "last" only the last
        assistant message of the conversation.
        """
        return self.finish(self.plan(record, train_on))

    def finish(self, planned: PlannedSample | EncodedSample) -> EncodedSample:
        """A planned sample encoded and labelled (one encoded already, as it is); raises SampleRejected."""
        if isinstance(planned, EncodedSample):
            return planned
        sample = self._encode_spans(planned.text, planned.spans, planned.append)
        return EncodedSample(
            sample.input_ids,
            sample.labels,
            planned.reasoning_dropped_turns,
            planned.reasoning_dropped_tokens,
        )

    def plan(self, record: Any, train_on: str = "all") -> PlannedSample | EncodedSample:
        """`encode` up to the encode: a chat record rendered, its turns located and checked (the rejections
        of these steps raised here); `finish` encodes and labels it. Records that need no template, and
        templates without a generation prompt, come back encoded.

        The split lets `pipeline.encode_lines` run a chunk's encodes together, after all its renders:
        interleaved with the renders, the same encodes took 6-11% of the floor's CPU more (the tokenizer's
        tables no longer hot in the CPU caches; the aside row of benchmarks/bench_tokenize.py --steps).
        """
        if not isinstance(record, dict):
            raise SampleRejected(NO_KNOWN_SHAPE, f"expected a JSON object, got {type(record).__name__}")
        if record.get("chat_template_kwargs") is not None:
            rest = {k: v for k, v in record.items() if k != "chat_template_kwargs"}
            return self._with_kwargs(record["chat_template_kwargs"]).plan(rest, train_on)
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
            return self._plan_chat(messages, record.get("tools"), train_on)
        if "prompt" in record and "generation" in record:
            return self._encode_prompt_generation(record["prompt"], record["generation"])
        raise SampleRejected(NO_KNOWN_SHAPE, "expected `messages`, or `prompt` and `generation`")

    def _with_kwargs(self, kwargs: Any) -> ChatEncoder:
        """This encoder with a record's `chat_template_kwargs` over the run's (--chat-template-kwargs): the
        same compiled template and facts, its renders given those names too. The probes ran without them."""
        if not isinstance(kwargs, dict):
            raise SampleRejected(
                NO_KNOWN_SHAPE, f"`chat_template_kwargs` must be an object, got {type(kwargs).__name__}"
            )
        taken = own_template_name(kwargs)
        if taken:
            raise SampleRejected(
                NO_KNOWN_SHAPE, f"`chat_template_kwargs` names {taken!r}, which tokenize sets itself"
            )
        # not copy.copy: __setstate__ would compile the template again; the view shares the compiled template
        # and `_found`, so what one line's view finds about the template is found once for all
        view = object.__new__(ChatEncoder)
        view.__dict__.update(self.__dict__)
        view.template_kwargs = {**self.template_kwargs, **kwargs}
        return view

    def encode_turns(self, record: Any) -> list[EncodedSample]:
        """One sample per trained assistant turn (`--split-turns`): the conversation up to and including
        that turn, rendered as the model sees it there (its reasoning is the last turn's, so templates that
        drop earlier reasoning keep it), trained on that turn only. Other records: one sample, as `encode`.
        """
        return [self.finish(planned) for planned in self.plan_turns(record)]

    def plan_turns(self, record: Any) -> list[PlannedSample | EncodedSample]:
        """`encode_turns` up to the encodes (as `plan` is to `encode`)."""
        messages = record.get("messages") if isinstance(record, dict) else None
        roles = [m.get("role") for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
        if not roles or "pretrain" in roles or len(roles) != len(messages):
            return [self.plan(record)]
        self._check_messages(messages)
        turns = [
            i
            for i, m in enumerate(messages)
            if m["role"] == "assistant" and m.get("train", True) is not False
        ]
        if len(turns) <= 1:
            return [self.plan(record)]
        return [self.plan({**record, "messages": messages[: i + 1]}, "last") for i in turns]

    def _ids_with_prefix(self, text: str) -> tuple[list[int], Offsets, int]:
        """(ids, char offsets of the text's tokens, number of prefix ids in front) from ONE encode."""
        tokens = self._fact("token_bytes", lambda: TokenBytes.of(self.backend))
        ids, offsets = encode_with_offsets(self.backend, text, tokens)
        if self.prefix_ids and not (self.bos_text and text.startswith(self.bos_text)):
            return self.prefix_ids + ids, offsets, len(self.prefix_ids)
        return ids, offsets, 0

    def _labels(
        self,
        text: str,
        ids: list[int],
        offsets: Offsets,
        shift: int,
        spans: list[tuple[int, int]],
    ) -> list[int]:
        """Label the tokens overlapping the trained char spans; reject on any token that crosses a
        boundary."""
        labels = [IGNORE_INDEX] * len(ids)
        starts, ends = offsets
        prev_hi = 0
        for start, end in spans:
            lo = bisect.bisect_right(ends, start)  # first token ending after `start`
            hi = bisect.bisect_left(starts, end)  # first token starting at/after `end`
            if lo >= hi or lo < prev_hi:
                raise SampleRejected(
                    ALIGNMENT_FAILURE, f"no tokens for the trained text at chars {start}..{end}"
                )
            first, last = starts[lo], ends[hi - 1]
            # A word token may carry the space before it ("▁Hello", "ĠHello"): trained. Anything else, e.g. a
            # header newline merged into the content's first token, has no exact mask.
            if first < start and text[first:start].strip(" "):
                raise SampleRejected(
                    TOKEN_STRADDLE, f"a token crosses the start of the trained text at char {start}"
                )
            if last > end and not text[end:last].isspace():
                raise SampleRejected(
                    TOKEN_STRADDLE, f"a token crosses the end of the trained text at char {end}"
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
            if (
                role == "assistant"
                and not (content or "").strip()
                and not message.get("tool_calls")
                and not any(isinstance(message.get(k), str) and message[k].strip() for k in REASONING_KEYS)
            ):
                raise SampleRejected(
                    EMPTY_ASSISTANT,
                    f"message {i}: assistant content is empty and there are no tool_calls and no reasoning",
                )
            if role == "assistant":
                _check_reasoning(i, message, content)
            if not isinstance(message.get("train", True), bool):
                raise SampleRejected(NO_KNOWN_SHAPE, f"message {i}: `train` must be true or false")
            if message.get("tool_calls") is not None and not isinstance(message["tool_calls"], list):
                raise SampleRejected(NO_KNOWN_SHAPE, f"message {i}: `tool_calls` must be a list")

    def _marked_render(
        self,
        messages: list[dict[str, Any]],
        tools: Any,
        text: str,
        inside_whitespace: bool,
        skip_role: str | None = None,
    ) -> tuple[dict[int, list[int]], dict[int, list[int]]] | None:
        """Where each content sits in `text`, from a render with markers; None if it does not reproduce
        `text`.

        `skip_role`: messages of that role are not marked (assistant contents a template may split or
        rewrite).
        """
        marked = []
        for i, m in enumerate(messages):
            content = m.get("content")
            if isinstance(content, str) and content and m.get("role") != skip_role:
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

    def _plan_chat(
        self, messages: list[dict[str, Any]], tools: Any, train_on: str = "all"
    ) -> PlannedSample | EncodedSample:
        self._check_messages(messages)
        real = [_template_message(m, m.get("content")) for m in messages]
        trained = [
            i
            for i, m in enumerate(messages)
            if m["role"] == "assistant" and m.get("train", True) is not False
        ]
        if train_on == "last":
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant") if trained else -1
            trained = [i for i in trained if i == last]
        # Where each non-assistant message's content sits: a later message bounds a turn's search for its end.
        # Only needed when such a message follows a trained turn (not for one-turn conversations). Found by
        # the render itself when its contents can be traced, else by one more render with markers.
        follower: dict[int, int] = {}  # message index -> the first non-assistant message after it
        later = None
        for j in range(len(messages) - 1, -1, -1):
            if later is not None:
                follower[j] = later
            if messages[j]["role"] != "assistant":
                later = j
        needed = sorted({follower[i] for i in trained if i in follower})
        opens = None
        if needed and self.has_generation_prompt and all(real[j].get("content") for j in needed):
            text, opens = self._traced_render(real, tools, needed)
        else:
            text = self._render_or_reject(real, tools)
        if _MARK_LEAD in text:
            raise SampleRejected(
                ALIGNMENT_FAILURE, "the text contains U+10FFF0, which minitrain uses as a marker"
            )
        if not self.has_generation_prompt:
            return self._encode_by_content(messages, tools, text, trained)
        if needed and opens is None:
            located = self._marked_render(messages, tools, text, False, "assistant") or self._marked_render(
                messages, tools, text, True, "assistant"
            )
            opens = located[0] if located is not None else None
        # Where each assistant turn starts (its generation prompt proven a prefix): the trained turns', and
        # the later turns' that bound them. A turn before every trained one cannot change the mask, so its
        # prompt is not rendered (`--train-on last`, `--split-turns`: one prompt render per sample, not one
        # per turn).
        first = min(trained, default=0)
        prompt_ends = {
            i: self._turn_start(real, tools, text, i)
            for i, m in enumerate(messages)
            if m["role"] == "assistant" and i >= first
        }
        spans = []
        dropped_turns = dropped_tokens = 0
        append = False
        for i in trained:
            start = prompt_ends[i]
            for call in messages[i].get("tool_calls") or []:
                name = (call.get("function") or call).get("name") if isinstance(call, dict) else None
                if not isinstance(name, str) or name not in text:
                    raise SampleRejected(
                        TEMPLATE_ERROR, f"message {i}: the chat template does not render `tool_calls`"
                    )
            bound = min((e for j, e in prompt_ends.items() if j > i), default=len(text))
            j = follower.get(i)
            if j is not None:
                at = (opens or {}).get(j)
                if not at:
                    raise SampleRejected(
                        CONTENTS_REWRITTEN,
                        f"message {j}: its content cannot be located in the rendered text, "
                        f"so the end of turn {i} is unknown",
                    )
                bound = min(bound, at[0])
            if (
                bound == len(text)
                and self.final_turn_ender
                and not text[start:].rstrip().endswith(self.eot_tokens)
            ):
                append = True  # the last turn of a template that leaves it open (GLM-4)
                end = len(text.rstrip())
            else:
                end = self._turn_end(text, i, start, bound)
            dropped = self._check_turn(messages[i], text, i, start, end)
            if dropped:
                dropped_turns += 1
                dropped_tokens += len(self.backend.encode(dropped, add_special_tokens=False).ids)
            spans.append((start, end))
        return PlannedSample(text, spans, append, dropped_turns, dropped_tokens)

    def _turn_start(self, real: list[dict[str, Any]], tools: Any, text: str, i: int) -> int:
        """Where assistant message i's generated text starts: the end of its generation prompt in `text`.

        The prefix property: render(messages[:i], add_generation_prompt=True) must be a prefix of `text`.
        The one exact alternative: a generation prompt whose tail the full render does not repeat (DeepSeek-R1
        opens `<think>\n` in the prompt only); the turn then starts where that tail starts, after the header.
        """
        prompt = self._render_or_reject(real[:i], tools, True)
        if text.startswith(prompt):
            return len(prompt)
        before = self._render_or_reject(real[:i], tools, False)
        if text.startswith(before) and prompt.startswith(before):
            header, rest = prompt[len(before) :], text[len(before) :]
            common = next((k for k, (a, b) in enumerate(zip(header, rest, strict=False)) if a != b), 0)
            # The opener the text leaves out starts with an added token (`<think>`); the turn starts where
            # that token starts, not after characters the turn happens to share with it (`<html>` after
            # `<think>` shares `<`). A text that goes on with that token itself repeats the opener in part
            # (reasoning rendered where the prompt closed it: Qwen3 with enable_thinking=false): no exact
            # start, rejected.
            opener = max(
                ((at, token) for at, token in self._added_tokens_in(header) if 0 < at <= common), default=None
            )
            if opener is not None and not rest.startswith(opener[1], opener[0]):
                return len(before) + opener[0]
            if opener is not None:
                raise SampleRejected(
                    PREFIX_MISMATCH,
                    f"message {i}: the generation prompt ends with {header[opener[0] :]!r}, and the turn "
                    f"renders {opener[1]} otherwise (reasoning where the prompt closes it: "
                    "enable_thinking=false with reasoning data?)",
                )
        raise SampleRejected(
            PREFIX_MISMATCH,
            f"message {i}: render(messages[:{i}], add_generation_prompt=True) is not a prefix of the "
            "rendered text",
        )

    def _turn_end(self, text: str, i: int, start: int, bound: int) -> int:
        """The end of the last end-of-turn token in text[start:bound] (gpt-oss: `<|end|>` inside,
        `<|return|>` last)."""
        best = -1
        for token in self.eot_tokens:
            at = text.rfind(token, start, bound)
            if at >= 0:
                best = max(best, at + len(token))
        if best < 0:
            raise SampleRejected(
                NO_END_OF_TURN,
                f"message {i}: no end-of-turn token ({', '.join(self.eot_tokens) or 'none found'}) "
                "after its text",
            )
        return best

    def _check_turn(self, message: dict[str, Any], text: str, i: int, start: int, end: int) -> str:
        """The turn's answer, reasoning and tool calls lie in text[start:end]; returns reasoning the
        template dropped."""
        answer, reasoning = assistant_parts(message)
        turn = text[start:end]
        if answer.strip() and answer.strip() not in turn:
            raise SampleRejected(OUTSIDE_TURN, f"message {i}: its content is not inside its trained text")
        for call in message.get("tool_calls") or []:
            name = (call.get("function") or call).get("name") if isinstance(call, dict) else None
            if not isinstance(name, str) or name not in turn:
                where = "is not inside its trained text" if isinstance(name, str) and name in text else ""
                if where:
                    raise SampleRejected(OUTSIDE_TURN, f"message {i}: tool call {name!r} {where}")
                raise SampleRejected(
                    TEMPLATE_ERROR, f"message {i}: the chat template does not render `tool_calls`"
                )
        reasoning = reasoning.strip()
        if not reasoning or reasoning in turn:
            return ""
        return reasoning  # the template does not render it (Qwen3 before the last user query, DeepSeek-R1)

    def _encode_spans(self, text: str, spans: list[tuple[int, int]], append: bool = False) -> EncodedSample:
        """Encode `text` once and label `spans`; a token that straddles a turn's start splits the encode
        there.

        A straddling token ("\n " from a header newline and a content that opens with a space) does not exist
        at inference: the prompt is tokenized alone and the model generates from a fresh token. So the text is
        encoded in pieces cut at such starts, the prompt exactly as inference tokenizes it.
        """
        ids, offsets, shift = self._ids_with_prefix(text)
        cuts = [s for s, _ in spans if _straddles(text, offsets, s)]
        if cuts:
            ids, offsets, shift = self._ids_in_pieces(text, cuts)
        labels = self._labels(text, ids, offsets, shift, spans)
        eot_ids = set(self.eot_ids)
        if append:  # the open last turn (GLM-4) ends with the token the model stops on
            ender = self.eot_ids[self.eot_tokens.index(self.final_turn_ender)]
            ids, labels = [*ids, ender], [*labels, ender]
            spans = spans[:-1]
        for _, end in spans:
            hi = bisect.bisect_left(offsets[0], end) + shift
            if ids[hi - 1] not in eot_ids:
                raise SampleRejected(
                    NO_END_OF_TURN,
                    f"the trained text ending at char {end} does not end in an end-of-turn token",
                )
        return EncodedSample(ids, labels)

    def _ids_in_pieces(self, text: str, cuts: list[int]) -> tuple[list[int], Offsets, int]:
        """`_ids_with_prefix`, but text[a:b] encoded alone between cuts; each later piece must decode to
        itself."""
        bounds = [0, *sorted(set(cuts)), len(text)]
        ids, (starts, ends), shift = self._ids_with_prefix(text[: bounds[1]])
        for a, b in zip(bounds[1:-1], bounds[2:], strict=True):
            enc = self.backend.encode(text[a:b], add_special_tokens=False)
            if self.backend.decode(enc.ids, skip_special_tokens=False) != text[a:b]:
                raise SampleRejected(
                    TOKEN_STRADDLE,
                    f"a token crosses the start of the trained text at char {a}, and the text from there does"
                    " not encode alone to itself",
                )
            ids = ids + enc.ids
            starts = [*starts, *(x + a for x, _ in enc.offsets)]
            ends = [*ends, *(y + a for _, y in enc.offsets)]
        return ids, (starts, ends), shift

    def _encode_by_content(
        self, messages: list[dict[str, Any]], tools: Any, text: str, trained: list[int]
    ) -> EncodedSample:
        """Templates without a generation prompt: trained = each content + the end-of-turn text after it."""
        located = self._marked_render(messages, tools, text, False) or self._marked_render(
            messages, tools, text, True
        )
        if located is None:
            raise SampleRejected(
                CONTENTS_REWRITTEN, "the template rewrites message contents (marked render differs)"
            )
        opens, closes = located
        spans = []
        for i in trained:
            starts, ends = opens.get(i, []), closes.get(i, [])
            if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
                raise SampleRejected(
                    CONTENTS_REWRITTEN,
                    f"message {i}: its content appears {len(starts)} times in the rendered text",
                )
            if not self.eot_text or not text.startswith(self.eot_text, ends[0]):
                raise SampleRejected(
                    NO_END_OF_TURN, f"message {i}: not followed by the end-of-turn text {self.eot_text!r}"
                )
            spans.append((starts[0], ends[0] + len(self.eot_text)))
        ids, offsets, shift = self._ids_with_prefix(text)
        for start, _ in spans:
            if _straddles(text, offsets, start):
                raise SampleRejected(
                    TOKEN_STRADDLE, f"a token crosses the start of the trained text at char {start}"
                )
        labels = self._labels(text, ids, offsets, shift, spans)
        return EncodedSample(ids, labels)


def _check_reasoning(i: int, message: dict[str, Any], content: str | None) -> None:
    """One source of reasoning per assistant message, or the line is rejected (REASONING_TWICE).

    Two reasoning fields that differ: templates read different ones (Qwen3 `reasoning_content`, gpt-oss
    `thinking`), so one would be lost without a word. A field (even empty) and an inline
    `<think>...</think>` in the content: a template that reads the field renders the content whole, and the
    model would learn two reasoning blocks in one turn (Qwen3: `<think>..</think>` then the inline one).
    """
    fields = [key for key in REASONING_KEYS if isinstance(message.get(key), str)]
    if len({message[key] for key in fields}) > 1:
        named = " and ".join(f"`{key}`" for key in fields)
        raise SampleRejected(REASONING_TWICE, f"message {i}: {named} differ; keep one reasoning field")
    if fields and content and "</think>" in content:
        raise SampleRejected(
            REASONING_TWICE,
            f"message {i}: reasoning both in `{fields[0]}` and inline (<think>...</think>) in content;"
            " keep one (an empty field counts: templates then render the content whole)",
        )


def assistant_parts(message: dict[str, Any]) -> tuple[str, str]:
    """(answer, reasoning) of an assistant message: reasoning from a field, else an inline <think>...</think>.

    As Qwen3's template reads them: a reasoning field leaves `content` whole; without one, `content` is split
    at its last `</think>`, the reasoning being what follows the `<think>` before it.
    """
    content = message.get("content") if isinstance(message.get("content"), str) else ""
    reasoning = next((message[k] for k in REASONING_KEYS if isinstance(message.get(k), str)), None)
    if reasoning is not None or "</think>" not in content:
        return content, reasoning or ""
    head, _, answer = content.rpartition("</think>")
    return answer, head.split("<think>")[-1]


def _straddles(text: str, offsets: Offsets, start: int) -> bool:
    """True when one token holds text on both sides of `start`, the outside part not only spaces.

    Spaces before the start are allowed (SentencePiece's "▁Hello" after `[/INST] ` carries the template's
    space): the token is the one the model generates there too.
    """
    starts, ends = offsets
    k = bisect.bisect_right(ends, start)
    if k >= len(ends):
        return False
    lo, hi = starts[k], ends[k]
    return lo < start < hi and bool(text[lo:start].strip(" "))
