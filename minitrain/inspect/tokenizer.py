"""The tokenizer `minitrain inspect` decodes with, and the token classes its view and audit use.

The audit trusts the sidecar's `tokenizer.end_of_turn_token_ids` (plus EOS); without a sidecar it takes
EOS and whichever of `KNOWN_END_OF_TURN` the vocabulary has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minitrain.data.format import sidecar_path
from minitrain.data.tokenizer import load_tokenizer as load_named_tokenizer
from minitrain.errors import UserError

KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "<|eot|>")


def load_tokenizer(path: Path, meta: dict[str, Any] | None, override: str | None) -> Any:
    """The tokenizer named by `--model-name-or-path`, else the one recorded in the sidecar; one-line
    errors."""
    if override is None:
        recorded = ((meta or {}).get("tokenizer") or {}).get("path")
        if not recorded:
            where = sidecar_path(path)
            raise UserError(
                f"{path}: no tokenizer recorded ({where.name} missing); pass --model-name-or-path"
            )
        name = str(recorded)
        candidate = Path(name)
        # A relative path recorded by tokenize is relative to where it ran; also try beside the sidecar.
        if (
            not candidate.exists()
            and not candidate.is_absolute()
            and (Path(path).parent / candidate).exists()
        ):
            name = str(Path(path).parent / candidate)
        elif not candidate.exists() and name.startswith((".", "/", "~")):  # a path, not a hub id
            raise UserError(
                f"tokenizer {name!r} recorded in {sidecar_path(path).name} does not exist from here"
                f"{' (a path relative to where tokenize ran)' if not candidate.is_absolute() else ''}; "
                "pass --model-name-or-path"
            )
        return load_named_tokenizer(name, f"the tokenizer recorded in {sidecar_path(path).name},")
    return load_named_tokenizer(override)


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of every special token: the named ones (BOS, EOS, PAD ...) and added tokens marked special."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return frozenset(int(i) for i in ids if i is not None)


def end_of_turn_ids(tokenizer: Any, meta: dict[str, Any] | None) -> frozenset[int]:
    """End-of-turn ids: the sidecar's list (+ EOS), else EOS and the usual end-of-turn tokens in the
    vocabulary."""
    ids: set[int] = set()
    recorded = ((meta or {}).get("tokenizer") or {}).get("end_of_turn_token_ids")
    if recorded:
        ids.update(int(i) for i in recorded)
    else:
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in KNOWN_END_OF_TURN if t in vocab)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
