"""A text's token ids and the character offsets of its tokens, from one encode: the mask's raw material.

`Tokenizer.encode` gives both, but it converts every token's byte offsets into character offsets through
a map it builds for each text (an entry per byte) and hands them to Python as a list of tuples: about a
tenth to a fifth of the encode's CPU with Qwen3's tokenizer on the fixture data, and the encode is most
of tokenize's. For a byte-level BPE vocabulary (GPT-2's alphabet: Qwen, Llama 3, SmolLM, gpt-oss, ...) that
work can be skipped where it provably changes nothing:

- each token id stands for fixed bytes: its vocabulary string read through the ByteLevel alphabet (an added
  token: its content), found once per id and kept for the process (`TokenBytes`);
- `encode_batch_fast` gives the same ids without offsets; when the bytes of those ids, joined, are exactly
  the text's bytes, token k covers the bytes between the sum of the lengths before it and the sum through
  it. Checked for every text: a normalizer or a prefix space that changed the text, an added token that
  strips the spaces around it, a token outside the alphabet, all fail it, and the text takes `encode`;
- bytes to characters: in an ASCII text a byte is a character; otherwise every token must hold whole
  UTF-8 characters (its bytes decode alone: a merge inside a character fails the text), and then each
  boundary between tokens is one between characters, counted as `encode` counts it. Those are the
  offsets `encode` reports unless the tokenizer's post-processor trims them (ByteLevel or RoBERTa
  `trim_offsets`): such a tokenizer always takes `encode`, as does any tokenizer whose decoder is not
  ByteLevel (SentencePiece's `▁`, byte fallback).

The trade-off: per-id tables of bytes and character counts (filled as ids are met: a few MB for a 150k
vocabulary) and a join and a compare per text, for 5-8% less CPU per tokenized line with Qwen3's tokenizer
on the fixture data and 13% with SmolLM2's (tokenize's whole work per line, paired in one process). The batch
call runs on the calling thread only when tokenizers' parallelism is off (TOKENIZERS_PARALLELISM=false,
which `minitrain tokenize` sets): otherwise it would hand each text to a Rayon thread pool, so `encode` is
used. A text whose offsets cannot be derived is encoded a second time, by `encode`; where that happens to
more than one text in eight, the process stops trying (`TokenBytes.worth_trying`). tests/data/test_offsets.py
holds both ways to the same ids and offsets on every fixture tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

Offsets = tuple[Sequence[int], Sequence[int]]  # each token's first character, and the one after its last
_NOT_BYTES = b"\xff"  # a vocabulary string outside the alphabet: never in UTF-8, so the text's check fails
_FAILURES_ALLOWED = 8  # see TokenBytes.worth_trying
_SERIAL = frozenset({"", "off", "false", "f", "no", "n", "0"})  # tokenizers' own reading of its variable


def byte_alphabet() -> dict[str, int]:
    """The ByteLevel alphabet: the character standing for each byte in a byte-level BPE vocabulary (GPT-2's
    table: printable Latin-1 bytes stand for themselves, the other 68 for U+0100 onwards, in byte order)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    alphabet: dict[str, int] = {}
    moved = 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + moved)] = byte
            moved += 1
    return alphabet


class TokenBytes:
    """id -> the bytes the token stands for, for one byte-level BPE tokenizer; filled as ids are met."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.added = {i: t.content.encode("utf-8") for i, t in backend.get_added_tokens_decoder().items()}
        size = max(backend.get_vocab_size(with_added_tokens=True), max(self.added, default=-1) + 1)
        self.table: list[bytes | None] = [None] * size
        self.chars: list[int] = [-1] * size  # characters in those bytes, -1: not whole UTF-8 characters
        self.alphabet = byte_alphabet()
        self.tried = self.failed = 0  # texts `offsets` was asked for, and those it could not derive

    @classmethod
    def of(cls, backend: Any) -> TokenBytes | None:
        """The table for `backend`, or None when its offsets cannot be derived this way (see the module
        docstring): not a BPE model with a ByteLevel decoder, or a post-processor that trims offsets."""
        from tokenizers import decoders, models, processors

        post = backend.post_processor
        trims = post is not None and not isinstance(post, processors.TemplateProcessing)
        if isinstance(post, processors.ByteLevel):
            trims = post.trim_offsets
        if trims or not isinstance(backend.model, models.BPE):
            return None
        return cls(backend) if isinstance(backend.decoder, decoders.ByteLevel) else None

    def _fill(self, ids: list[int]) -> None:
        if max(ids) >= len(self.table):  # an id past the vocabulary's count (ids with gaps)
            self.table += [None] * (max(ids) + 1 - len(self.table))
            self.chars += [-1] * (len(self.table) - len(self.chars))
        for i in ids:
            if self.table[i] is None:
                data = self.table[i] = self._bytes_of(i)
                try:
                    self.chars[i] = len(data.decode("utf-8"))
                except UnicodeDecodeError:  # part of a character (a byte-level merge inside one)
                    self.chars[i] = -1

    def _bytes_of(self, i: int) -> bytes:
        if i in self.added:
            return self.added[i]
        token = self.backend.id_to_token(i)
        if token is None or not all(c in self.alphabet for c in token):
            return _NOT_BYTES
        return bytes(self.alphabet[c] for c in token)

    def worth_trying(self) -> bool:
        """False once the derived offsets have failed on more than one text in eight (after eight failures):
        each failure costs the text a second encode. SmolLM2's vocabulary splits most CJK and Cyrillic
        characters into several tokens, so on such data every text would be encoded twice (1.8x the
        encode's CPU); a prefix-space pre-tokenizer fails every text."""
        return self.failed < _FAILURES_ALLOWED or self.failed * _FAILURES_ALLOWED < self.tried

    def offsets(self, text: str, ids: list[int]) -> Offsets | None:
        """The character offsets of `ids`' tokens in `text`, or None when their bytes, joined, are not
        exactly the text's, or a token holds part of a character (counted for `worth_trying`)."""
        offsets = self._derive(text, ids)
        self.tried += 1
        self.failed += offsets is None
        return offsets

    def _derive(self, text: str, ids: list[int]) -> Offsets | None:
        table = self.table
        try:
            parts = [table[i] for i in ids]
            joined = b"".join(parts)  # type: ignore[arg-type]
        except (TypeError, IndexError):  # an id met for the first time
            self._fill(ids)
            parts = [self.table[i] for i in ids]
            joined = b"".join(parts)  # type: ignore[arg-type]
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no bytes to compare with
            return None
        if joined != data:
            return None
        if len(data) == len(text):  # ASCII: a byte is a character
            lengths: Any = map(len, parts)  # type: ignore[arg-type]
        else:  # each token whole characters, so a byte boundary is a character boundary
            lengths = [self.chars[i] for i in ids]
            if -1 in lengths:
                return None
        ends = list(accumulate(lengths))
        starts = [0, *ends]
        starts.pop()  # each token starts where the one before it ends
        return starts, ends


def serial() -> bool:
    """True when tokenizers' batch calls run on the calling thread (TOKENIZERS_PARALLELISM off)."""
    return os.environ.get("TOKENIZERS_PARALLELISM", "true").lower() in _SERIAL


def encode_with_offsets(backend: Any, text: str, tokens: TokenBytes | None) -> tuple[list[int], Offsets]:
    """(ids, (starts, ends)) of `text`'s tokens in characters, special tokens not added: the tokenizer's own
    `encode`, or the same from `encode_batch_fast` and `tokens` where that is proven for this text."""
    if tokens is not None and tokens.worth_trying() and serial():
        ids = backend.encode_batch_fast([text], add_special_tokens=False)[0].ids
        offsets = tokens.offsets(text, ids)
        if offsets is not None:
            return ids, offsets
    enc = backend.encode(text, add_special_tokens=False)
    starts, ends = zip(*enc.offsets, strict=True) if enc.ids else ((), ())
    return enc.ids, (starts, ends)
