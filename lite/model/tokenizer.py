"""The Qwen2 byte-level BPE tokenizer, loaded from a checkpoint directory through transformers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lite.errors import TokenizerError

if TYPE_CHECKING:  # transformers is imported when a tokenizer is loaded, not by the checks before loading
    from transformers import PreTrainedTokenizerBase

REQUIRED_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def check_tokenizer_files(directory: str | Path) -> None:
    """Refuse a checkpoint without tokenizer files, in a stat call, before any weight is read."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file() and not (
            (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()):
        raise TokenizerError(f"{directory} has no tokenizer (expected vocab.json + merges.txt or tokenizer.json); "
                             f"copy them from the model's repository into that folder")


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """transformers' Qwen2 tokenizer on the checkpoint's vocab.json + merges.txt (or tokenizer.json).

    Not AutoTokenizer: it reads config.json, sees the reference's `auto_map` and stops to ask
    about remote code. And `Qwen2TokenizerFast(vocab_file=..., merges_file=...)` silently builds
    an empty tokenizer (docs/deps.md §2), so the result is checked rather than trusted.
    """
    from transformers import Qwen2Tokenizer  # heavy: imported only when a tokenizer is really loaded

    directory = Path(directory)
    check_tokenizer_files(directory)
    try:
        tok = Qwen2Tokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types here
        raise TokenizerError(f"cannot load the tokenizer in {directory}: {str(exc).splitlines()[0]}") from None
    if len(tok) < 256 or not tok("a b", add_special_tokens=False)["input_ids"]:
        raise TokenizerError(f"the tokenizer in {directory} came out empty ({len(tok)} tokens)")
    vocab = tok.get_vocab()
    missing = [t for t in REQUIRED_TOKENS if t not in vocab]
    if missing:
        raise TokenizerError(f"the tokenizer in {directory} lacks the special tokens {missing}")
    return tok
