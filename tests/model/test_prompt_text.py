"""A user's text is text: only the prompt builders place image slots (issue 25, class 5).

The expected ids are the tokenizer's own encoding of the plain text, computed independently of
`tokenize_with_images`; the placeholder is the reference's [-301, -300, -302].
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lite.model.processing import (IMAGE_PLACEHOLDER, Turn, generation_prompt, tokenize_with_images,
                                   understanding_prompt)
from lite.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_dir: Path):
    return load_tokenizer(tiny_dir)


def plain(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_a_literal_image_tag_in_a_question_is_plain_text(tok) -> None:
    question = "what does <image> mean in <image><image> markup?"
    ids = tokenize_with_images(tok, understanding_prompt(question, 1)).tolist()
    head = plain(tok, "<|im_start|>user\n")
    tail = plain(tok, "\n" + question + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ids == head + list(IMAGE_PLACEHOLDER) + tail
    assert sum(i < 0 for i in ids) == 3  # one image slot, however many literals the user typed
    literal = plain(tok, "<image>")
    assert all(i >= 0 for i in literal) and len(literal) > 1  # the tokenizer has no <image> token: it is text


def test_a_text_only_question_with_the_tag_has_no_slot(tok) -> None:
    prompt = understanding_prompt("<image>", 0)
    assert prompt.num_images == 0
    ids = tokenize_with_images(tok, prompt).tolist()
    assert ids == plain(tok, "<|im_start|>user\n<image><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_history_and_generation_prompts_keep_user_text_whole(tok) -> None:
    history = [Turn("first <image> question", "an <image> answer", num_images=2)]
    prompt = understanding_prompt("and <image>?", 1, history)
    assert prompt.num_images == 3
    ids = tokenize_with_images(tok, prompt).tolist()
    expected = (plain(tok, "<|im_start|>user\nImage 1: ") + list(IMAGE_PLACEHOLDER) + plain(tok, "\nImage 2: ")
                + list(IMAGE_PLACEHOLDER) + plain(tok, "\nfirst <image> question<|im_end|>\n<|im_start|>assistant\n"
                                                  "<think>\n\n</think>\n\nan <image> answer<|im_end|>\n"
                                                  "<|im_start|>user\n")
                + list(IMAGE_PLACEHOLDER) + plain(tok, "\nand <image>?<|im_end|>\n<|im_start|>assistant\n"
                                                       "<think>\n\n</think>\n\n"))
    assert ids == expected
    gen = tokenize_with_images(tok, generation_prompt("a <image> sign")).tolist()
    assert gen == plain(tok, "<|im_start|>user\n") + list(IMAGE_PLACEHOLDER) + plain(tok, "\na <image> sign<|im_end|>\n")


def test_the_rendered_text_is_the_reference_template() -> None:
    # What the reference's formatter writes (spec §4); the slots render as its <image> tag.
    assert str(understanding_prompt("Hi", 2)) == ("<|im_start|>user\nImage 1: <image>\nImage 2: <image>\nHi<|im_end|>\n"
                                                  "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert str(generation_prompt("x")) == "<|im_start|>user\n<image>\nx<|im_end|>\n"


def test_a_plain_string_is_all_text(tok) -> None:
    assert tokenize_with_images(tok, "a <image> b").tolist() == plain(tok, "a <image> b")
