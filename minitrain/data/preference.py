"""One preference pair -> two samples (chosen, rejected) that share their prompt tokens exactly.

A pair (shapes: `sources.to_pair_record`) is a prompt and two responses. Each side is the prompt followed by
that side's response, encoded by `ChatEncoder.encode` under the generation rule of `minitrain.data.chat`:

    side = encode({"messages": prompt (its assistant turns marked train=false) + response, "tools"})
    plain strings: encode({"prompt": prompt, "generation": response})    (response + EOS trained)

so what a side trains is exactly what the template renders after render(prompt, add_generation_prompt=True)
through the end of each response turn; the prompt's own assistant turns are context, masked. A response is
one or more assistant messages (anything else: "non-assistant response").

The pair's checks, each with its reject reason:

    prompt_len = index of the first trained label, on each side
    chosen.input_ids[:prompt_len] == rejected.input_ids[:prompt_len]      else "prompt tokens differ"

The check is what makes a pair usable for DPO: the two sequences are the same context followed by two
continuations, so their log-probabilities differ only in the response. It fails when the response changes
how the prompt is tokenized or rendered (a template that renders earlier turns depending on the last one,
a plain-text prompt whose last characters merge with the response's first ones differently per side).
The trade-off: each side is rendered and encoded on its own (the prompt twice), which keeps one code path,
the SFT one, for every token decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minitrain.data.chat import (
    EMPTY_RESPONSE,
    NO_KNOWN_SHAPE,
    NON_ASSISTANT_RESPONSE,
    PROMPT_TOKENS_DIFFER,
    ChatEncoder,
    EncodedSample,
    SampleRejected,
)
from minitrain.data.format import IGNORE_INDEX


@dataclass(frozen=True)
class EncodedPair:
    """The two sides of a pair and the number of leading ids they share (all masked)."""

    chosen: EncodedSample
    rejected: EncodedSample
    prompt_len: int


def encode_pair(encoder: ChatEncoder, pair: dict[str, Any]) -> EncodedPair:
    """A pair from `sources.to_pair_record` -> EncodedPair; SampleRejected with its reason."""
    prompt = pair["prompt"]
    if isinstance(prompt, str):
        sides = [
            encoder.encode({"prompt": prompt, "generation": pair[key]}) for key in ("chosen", "rejected")
        ]
    else:
        context = [{**m, "train": False} if m["role"] == "assistant" else m for m in prompt]
        sides = []
        for key in ("chosen", "rejected"):
            for i, message in enumerate(pair[key]):
                if message["role"] != "assistant":
                    raise SampleRejected(
                        NON_ASSISTANT_RESPONSE,
                        f"`{key}` message {i} has role {message['role']!r}; "
                        "a response is assistant messages only",
                    )
                if message.get("train", True) is not True:
                    raise SampleRejected(
                        NO_KNOWN_SHAPE,
                        f"`{key}` message {i} has `train`: {message['train']!r}; "
                        "a pair trains its whole response",
                    )
            record = {
                "messages": [*context, *pair[key]],
                "tools": pair.get("tools"),
                "chat_template_kwargs": pair.get("chat_template_kwargs"),
            }
            sides.append(encoder.encode(record))
    chosen, rejected = sides
    starts = [_first_trained(side.labels) for side in sides]
    for key, start in zip(("chosen", "rejected"), starts, strict=True):
        if start is None:
            raise SampleRejected(EMPTY_RESPONSE, f"`{key}`: no token of the response is trained")
    if starts[0] != starts[1] or chosen.input_ids[: starts[0]] != rejected.input_ids[: starts[1]]:
        at = next(
            (k for k, (a, b) in enumerate(zip(chosen.input_ids, rejected.input_ids, strict=False)) if a != b),
            min(starts),
        )
        raise SampleRejected(
            PROMPT_TOKENS_DIFFER,
            f"the sides' prompts are {starts[0]} and {starts[1]} ids and first differ at id {at}",
        )
    return EncodedPair(chosen, rejected, starts[0])


def _first_trained(labels: list[int]) -> int | None:
    return next((k for k, label in enumerate(labels) if label != IGNORE_INDEX), None)
