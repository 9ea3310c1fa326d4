"""Build minitrain/assets/demo/: the demo's tiny tokenizer (with a ChatML chat template) and tiny model
config.

Run from the repository root after changing the demo dataset: `python scripts/build_demo_assets.py`. The
output is committed as data, so `minitrain demo` needs neither this script nor a network at run time.

The tokenizer is a byte-level BPE trained with the `tokenizers` library on the demo's own conversations
rendered through the chat template, with digits split one per token (so numbers are sequences of digits a
small model can learn) and three special tokens: <|endoftext|> (pad), <|im_start|>, <|im_end|> (EOS and end
of turn). The model config is a 2-layer Llama of width 64 whose vocabulary is exactly the tokenizer's.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minitrain.demo import arithmetic_conversations  # noqa: E402

VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def corpus(num: int = 20000) -> list[str]:
    """The texts the BPE merges are learned from: conversations rendered as the template renders them."""
    texts = []
    for record in arithmetic_conversations(num, seed=12345):
        texts.append("".join(f"{m['role']}\n{m['content']}\n" for m in record["messages"]))
    return texts


def build_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return len(fast)


def build_config(out: Path, vocab_size: int) -> None:
    from transformers import GenerationConfig, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=2,  # <|im_end|>
        pad_token_id=0,  # <|endoftext|>
    )
    config.save_pretrained(out)
    GenerationConfig(eos_token_id=2, pad_token_id=0, max_new_tokens=32).save_pretrained(out)
    for name in ("config.json", "generation_config.json"):
        _drop_version(out / name)


def _drop_version(path: Path) -> None:
    """Remove the `transformers_version` that save_pretrained stamps: the assets are data, not a version
    claim.

    Without it the committed files are the same whichever transformers built them, so the test that rebuilds
    them compares bytes and never a library's version string. The layout is save_pretrained's own.
    """
    content = json.loads(path.read_text())
    content.pop("transformers_version", None)
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def main(out: Path = REPO / "minitrain" / "assets" / "demo") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        vocab = build_tokenizer(Path(tmp))
        build_config(Path(tmp), vocab)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(tmp, out)
        out.chmod(0o755)
    print(f"wrote {out}: tokenizer of {vocab} tokens with a chat template, and a tiny Llama config")


if __name__ == "__main__":
    main()
