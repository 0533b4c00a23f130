"""The spec's prompt formulas (docs/ovis_u1_spec.md §4), written out independently of lite's processing code so
tests can build the expected ids themselves."""

from __future__ import annotations

#: what `<image>` becomes in the ids: start, atom, end (spec §3.4)
PLACEHOLDER = [-301, -300, -302]
#: the empty think block of an assistant turn (`enable_thinking=False`)
THINK = "<think>\n\n</think>\n\n"


def spec_ids(tok, text: str) -> list[int]:
    """Chunks between `<image>` tokenised separately (no special tokens), joined by the placeholder."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split("<image>")):
        if i:
            ids += PLACEHOLDER
        if chunk:
            ids += tok(chunk, add_special_tokens=False)["input_ids"]
    return ids


def user(content: str) -> str:
    """A user turn of the Qwen3 formatter."""
    return f"<|im_start|>user\n{content}<|im_end|>\n"


def condition_text(content: str) -> str:
    """A generation condition: the user turn only, with one image (no assistant prefix)."""
    return user(f"<image>\n{content}")
