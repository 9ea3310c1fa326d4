"""A tokenizer loaded for chat encoding, and what its chat template does, probed once per load.

`load_chat_encoder` loads a fast tokenizer (`tokenizer.load_tokenizer`), takes its chat template (its own,
the built-in `chatml` or a Jinja file: `resolve_chat_template`) and builds a `chat.ChatEncoder`. The masking
rule of chat.py needs a few facts about the template that no file states, so they are found here by
rendering short conversations of fixed probe contents, once per tokenizer, not once per sample:

    end of turn          `find_end_of_turn`: the added tokens right after a middle and a final assistant
                         content (`<|im_end|>`, `<|eot_id|>`, gpt-oss's `<|end|>`/`<|return|>`, GLM's next
                         role token): the last of them before the next message ends a trained turn. Also
                         the end-of-turn text for templates without a generation prompt, and whether the
                         last turn is left open (GLM-4: closed with the turn-ending token, trained).
    tool-call enders     `tool_call_enders`: the added token right after a tool call's arguments
                         (gpt-oss's `<|call|>`), which ends a turn too.
    generation prompt    `has_generation_prompt`: whether add_generation_prompt=True adds text; without it
                         turns are found by their contents (the older rule, chat.py).
    the model's voice    `voice_token_ids`: added tokens the rule trains inside a turn (`<think>`,
                         `<|channel|>` ...), found on probes with reasoning and a tool call; written to the
                         sidecar (`turn_token_ids`) so that `inspect --audit` accepts them as trained.

A template that cannot render a plain user/assistant conversation, or does not compile, is refused here
with a UserError; a template where no token ends a turn is not: each line is then rejected with its reason.

The fingerprint (`tokenizer_fingerprint`): sha256 of one `"{id}\t{token}\n"` line per vocabulary entry
(added tokens included), in id order, written "sha256:<hex>". Equal fingerprints mean equal id meanings.
`tokenize` writes it to the sidecar and `train` (train/preflight.py) recomputes it on the model's tokenizer
and refuses data whose fingerprint differs; so its definition is a contract: a change would refuse every
dataset tokenized before it (tests/data/test_probe.py holds the fixture tokenizers' values).

`LoadedTokenizer` carries the encoder and the facts the sidecar records. The two costly ones are computed
when first read and then cached: the fingerprint (0.4 s for a 151k vocabulary) and the voice token ids;
the tokenize stage reads them while its workers encode, off the path to the first encoded line.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from minitrain.config import TEMPLATE_OWN_NAMES
from minitrain.data.chat import ChatEncoder, SampleRejected
from minitrain.data.template import names_set
from minitrain.data.tokenizer import load_tokenizer
from minitrain.errors import UserError

BUILTIN_TEMPLATES = ("chatml",)
_PROBE_CONTENTS = (
    "minitrain probe one",
    "minitrain probe two",
    "minitrain probe three",
    "minitrain probe four",
)


def resolve_chat_template(tokenizer: Any, chat_template: str | None) -> tuple[str, str]:
    """(template source, where it came from): the tokenizer's own, a built-in name, or a Jinja file."""
    if chat_template is None:
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):
            source = source.get("default")
        if not source:
            raise UserError(
                "the tokenizer has no chat template; pass --chat-template chatml (built in) or "
                "--chat-template PATH.jinja"
            )
        return source, "tokenizer"
    if chat_template in BUILTIN_TEMPLATES:
        return resources.files("minitrain").joinpath(
            f"assets/chat_templates/{chat_template}.jinja"
        ).read_text("utf-8"), chat_template
    path = Path(chat_template)
    if not path.is_file():
        raise UserError(
            f"--chat-template {chat_template}: not a built-in template ({', '.join(BUILTIN_TEMPLATES)}) "
            "and no such file"
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


def find_end_of_turn(encoder: ChatEncoder, added_tokens: list[str]) -> tuple[str, list[str], list[str], bool]:
    """(end-of-turn text, its added tokens, every token that ends a turn, last turn left open), probed.

    Probed on a two-exchange conversation (with and without a system message). The end-of-turn text is the
    common run of added tokens right after the middle and the final assistant content, e.g. `<|im_end|>`
    (ChatML), `</s>` (zephyr), `<|eot_id|>` (Llama 3) - not the next header that may follow it without a
    separator; it is used only by templates without a generation prompt. The tokens that end a turn are the
    first added token after each of the two contents: one token for most templates, two for gpt-oss
    (`<|end|>` mid-conversation, `<|return|>` at the end), GLM's next role token (nothing ends its last turn).
    A template where no token follows any content is not refused here: each line is rejected with its reason.
    "Last turn left open": a token follows the middle content but nothing follows the final one (GLM-4).
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
        enders = list(dict.fromkeys(run[0] for run in (mid, last) if run))
        # GLM: the next role token ends a turn, so nothing follows the last one
        open_final = bool(mid) and not last and not text[last_end:].strip()
        if not common or mid_ws != last_ws:
            return "", [], enders, open_final
        return last_ws + "".join(common), common, enders, open_final
    raise UserError(
        f"the chat template cannot render a plain user/assistant conversation ({'; '.join(errors)[:200]})"
    )


def tool_call_enders(encoder: ChatEncoder, added_tokens: list[str]) -> list[str]:
    """The added token right after a tool call's arguments, when one is (gpt-oss's `<|call|>`); else none."""
    call = {
        "type": "function",
        "function": {"name": "minitrain_probe", "arguments": {"p": "minitrain probe"}},
    }
    messages = [
        {"role": "user", "content": _PROBE_CONTENTS[0]},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": _PROBE_CONTENTS[1]},
    ]
    try:
        text = encoder.render(messages)
    except Exception:
        return []
    at = text.find('"minitrain probe"}')
    if at < 0:
        return []
    after = at + len('"minitrain probe"}')
    return [t for t in sorted(added_tokens, key=len, reverse=True) if text.startswith(t, after)][:1]


def voice_token_ids(encoder: ChatEncoder) -> list[int]:
    """Ids of added tokens that the generation rule trains inside a turn (not its end), found on probes
    with reasoning and with a tool call; `inspect --audit` accepts these as trained special tokens."""
    call = {"type": "function", "function": {"name": "minitrain_probe", "arguments": {"p": "probe"}}}
    user = {"role": "user", "content": _PROBE_CONTENTS[0]}
    probes = [
        [user, {"role": "assistant", "content": _PROBE_CONTENTS[1], "reasoning_content": _PROBE_CONTENTS[2]}],
        [user, {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "x"}],
    ]
    added = set(encoder.backend.get_added_tokens_decoder())
    found: set[int] = set()
    for messages in probes:
        try:
            sample = encoder.encode({"messages": messages})
        except SampleRejected:
            continue
        found.update(label for label in sample.labels if label in added)
    return sorted(found - set(encoder.eot_ids))


def has_generation_prompt(encoder: ChatEncoder) -> bool:
    """True when add_generation_prompt=True adds text after a user message (the assistant header)."""
    messages = [{"role": "user", "content": _PROBE_CONTENTS[0]}]
    try:
        return encoder.render(messages, add_generation_prompt=True) != encoder.render(messages)
    except Exception:
        return False


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the vocabulary in id order (added tokens included): equal fingerprints mean equal id
    meanings.

    The hashed text is one `"{id}\t{token}\n"` line per entry of `get_vocab()`, sorted by id (a stable
    sort: tokens sharing an id keep the dict's order). Where the ids are exactly 0..n-1, each token is read
    at its id instead of sorting (the same text, 0.4 s instead of 0.6 s for Qwen3's 151k entries).
    """
    vocab = tokenizer.get_vocab()
    by_id = {idx: token for token, idx in vocab.items()}
    if len(by_id) == len(vocab) and min(by_id, default=0) == 0 and max(by_id, default=-1) == len(by_id) - 1:
        lines = (f"{idx}\t{by_id[idx]}\n" for idx in range(len(by_id)))  # ids exactly 0..n-1, each once
    else:  # holes, shared or negative ids: the sort
        lines = (f"{idx}\t{token}\n" for token, idx in sorted(vocab.items(), key=lambda item: item[1]))
    text = "".join(lines)
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class LoadedTokenizer:
    """What the tokenize stage needs from a tokenizer: the encoder plus facts for the sidecar.

    The fingerprint is computed when first read (0.4 s for a 151k vocabulary): the tokenize stage reads
    it once its workers are busy, so it is not on the path to the first encoded line.
    """

    encoder: ChatEncoder
    tokenizer: Any  # the transformers tokenizer (this process only; workers get the encoder)
    tokenizer_class: str
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int
    pad_token_id: int | None
    template_source: str
    template_origin: str

    @cached_property
    def fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)

    @property
    def template_sha256(self) -> str:
        return hashlib.sha256(self.template_source.encode("utf-8")).hexdigest()

    @property
    def end_of_turn_token_ids(self) -> list[int]:
        return list(self.encoder.eot_ids)

    @cached_property
    def turn_token_ids(self) -> list[int]:
        """Added tokens the template writes in the model's voice (`<think>`, `<|channel|>` ...): trained."""
        return voice_token_ids(self.encoder)


def _unread_names_error(encoder: ChatEncoder, unread: list[str], origin: str, specials: dict) -> str:
    """--chat-template-kwargs names the template never reads: the message, with the names it does read."""
    # the names worth suggesting: not the render's own, not ones the template also sets itself (`content`)
    own = {*TEMPLATE_OWN_NAMES, *specials, *names_set(encoder.syntax())}
    reads = sorted(name for name in encoder.names_read() if name not in own)
    return (
        f"--chat-template-kwargs: the chat template ({origin}) never reads "
        f"{', '.join(map(repr, unread))}, so the render would be the same without it; "
        + (f"the names it reads: {', '.join(reads)}" if reads else "it reads no names besides the messages")
    )


def load_chat_encoder(
    model_name_or_path: str,
    chat_template: str | None = None,
    *,
    trust_remote_code: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> LoadedTokenizer:
    """Load a (fast) tokenizer, resolve its chat template and probe it; user mistakes raise UserError.

    `template_kwargs`: extra names every render sees (`{"enable_thinking": False}`), after the special
    tokens, as `apply_chat_template(**kwargs)` passes them; the probes render with them too.
    """
    tokenizer = load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            f"{model_name_or_path}: the tokenizer has no fast (tokenizer.json) backend, "
            "which tokenize needs for character offsets"
        )
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"{model_name_or_path}: the tokenizer has no EOS token; set eos_token in tokenizer_config.json"
        )
    source, origin = resolve_chat_template(tokenizer, chat_template)
    with_specials = backend.encode("a", add_special_tokens=True).ids
    plain = backend.encode("a", add_special_tokens=False).ids
    # What the tokenizer puts in front of a text (BOS for Llama-style tokenizers); anything it appends is
    # ignored.
    at = next((j for j in range(len(with_specials)) if with_specials[j : j + len(plain)] == plain), 0)
    added = [t.content for t in tokenizer.added_tokens_decoder.values()]
    try:
        encoder = ChatEncoder(
            backend=backend,
            template_source=source,
            template_kwargs={**tokenizer.special_tokens_map, **(template_kwargs or {})},
            bos_text=tokenizer.bos_token,
            prefix_ids=list(with_specials[:at]),
            eos_id=tokenizer.eos_token_id,
            eot_text="",
            eot_ids=[],
            added_tokens=tuple(added),
        )
    except Exception as err:
        raise UserError(f"the chat template ({origin}) does not compile: {str(err)[:200]}") from None
    unread = encoder.unread_names(template_kwargs or {})
    if unread:
        raise UserError(_unread_names_error(encoder, unread, origin, tokenizer.special_tokens_map))
    eot_text, _, enders, open_final = find_end_of_turn(encoder, added)
    enders = list(dict.fromkeys([*enders, *tool_call_enders(encoder, added)]))
    encoder.eot_text = eot_text
    encoder.eot_tokens = tuple(enders)
    encoder.eot_ids = [tokenizer.convert_tokens_to_ids(t) for t in enders]
    if open_final and len(enders) >= 1:
        encoder.final_turn_ender = enders[0]
    encoder.has_generation_prompt = has_generation_prompt(encoder)
    return LoadedTokenizer(
        encoder=encoder,
        tokenizer=tokenizer,
        tokenizer_class=type(tokenizer).__name__,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        template_source=source,
        template_origin=origin,
    )
