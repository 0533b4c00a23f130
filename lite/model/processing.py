"""Images and prompts in, model inputs out, exactly as the reference prepares them (spec §3.1, §3.4, §4).

Everything here is plain data work: PIL, numpy and integer ids. The model is not needed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from lite.model.architecture import OVIS_U1
from lite.model.config import PreprocessorConfig
from lite.errors import InputError
from lite.validation import check_encodable

IMAGE_TOKEN = "<image>"
IMAGE_PLACEHOLDER = OVIS_U1.image_placeholder
MAX_ASPECT = 200  # smart_resize clamps more extreme aspect ratios
#: smart_resize's own defaults (spec §3.1 step 2.6). The reference's first resize of a generation/edit canvas
#: passes neither, so it uses factor 28 whatever the ViT's patch_size x hidden_stride (spec §4).
SMART_RESIZE_FACTOR = 28
SMART_RESIZE_MIN_PIXELS = 56 * 56

T2I_PREFIX = ("Describe the image by detailing the color, shape, size, texture, quantity, text, "
              "and spatial relationships of the objects:")
UNCONDITIONAL_PROMPT = "Generate an image."
THINK_EMPTY = "<think>\n\n</think>\n\n"


# ---------------------------------------------------------------------------------------------
# Sizes.
# ---------------------------------------------------------------------------------------------

def smart_resize(height: int, width: int, factor: int = SMART_RESIZE_FACTOR,
                 min_pixels: int = SMART_RESIZE_MIN_PIXELS, max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """The reference's Qwen2-VL smart_resize, degenerate cases included (spec §3.1 step 2)."""
    if height < factor or width < factor:
        if height < width:
            width, height = round(factor / height * width), factor
        else:
            height, width = round(factor / width * height), factor
    elif max(height, width) / min(height, width) > MAX_ASPECT:
        if height > width:
            height = MAX_ASPECT * width
        else:
            width = MAX_ASPECT * height
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def checked_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """smart_resize that refuses the sizes the reference would silently mangle."""
    if height < 1 or width < 1:
        raise InputError(f"image is {width}x{height}: it has no pixels; use a non-empty image")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise InputError(f"image is {width}x{height}: aspect ratio above {MAX_ASPECT}:1 is not supported; crop it first")
    h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
    if h < factor or w < factor:
        raise InputError(f"image is {width}x{height}: too thin to tokenize; crop or pad it to a squarer shape")
    return h, w


def edit_output_size(width: int, height: int) -> tuple[int, int]:
    """(W, H) of an edit: smart_resize with factor 32, at most ~1 MP (spec §5)."""
    h, w = checked_size(height, width, 32, 3136, 1003520)
    return w, h


def t2i_size(width: int, height: int) -> tuple[int, int]:
    """(W, H) of text-to-image: floored to multiples of 16 (spec §3.8)."""
    return width // 16 * 16, height // 16 * 16


# ---------------------------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------------------------

def white_canvas(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (255, 255, 255))


def to_float_pixels(img: Image.Image) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [0, 1], each value the correctly rounded u8/255."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return (arr.float() / 255.0).permute(2, 0, 1)


def patchify(pixels: torch.Tensor, patch: int = 14, stride: int = 2) -> torch.Tensor:
    """[3, H, W] -> [N, 3*patch*patch] rows in 2x2-group order, each patch channel-major."""
    c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(c, gh // stride, stride, patch, gw // stride, stride, patch)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # groups (r, c), in-group (r, c), channel, py, px
    return x.reshape(gh * gw, c * patch * patch)


@dataclass
class VisionInput:
    pixel_values: torch.Tensor  # [N, 588] float32
    grid_thws: torch.Tensor  # [n_images, 3] int64

    @property
    def num_images(self) -> int:
        return int(self.grid_thws.shape[0])


def preprocess_image(img: Image.Image, pp: PreprocessorConfig) -> VisionInput:
    """Understanding-path preprocessing of one image (spec §3.1 steps 3-5)."""
    w, h = img.size
    nh, nw = checked_size(h, w, pp.factor, pp.min_pixels, pp.max_pixels)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    x = to_float_pixels(img)
    mean = torch.tensor(pp.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(pp.image_std, dtype=torch.float32).view(3, 1, 1)
    x = (x - mean) / std
    grid = torch.tensor([[pp.temporal_patch_size, nh // pp.patch_size, nw // pp.patch_size]], dtype=torch.long)
    return VisionInput(patchify(x, pp.patch_size, pp.hidden_stride), grid)


def concat_vision(inputs: list[VisionInput]) -> VisionInput:
    return VisionInput(torch.cat([i.pixel_values for i in inputs]), torch.cat([i.grid_thws for i in inputs]))


def generation_view_size(height: int, width: int, pp: PreprocessorConfig) -> tuple[int, int]:
    """(H, W) of the first resize of a canvas or edit image: smart_resize at its own defaults (factor 28 and
    56² pixels, whatever the ViT's patch size) to at most `min_pixels` (spec §4)."""
    return checked_size(height, width, SMART_RESIZE_FACTOR, SMART_RESIZE_MIN_PIXELS, pp.min_pixels)


def generation_vision_input(img: Image.Image, pp: PreprocessorConfig) -> VisionInput:
    """The ViT view of a canvas or edit image: a first smart_resize to about min_pixels (spec §4), then the
    understanding path's preprocessing at the ViT's own factor."""
    w, h = img.size
    nh, nw = generation_view_size(h, w, pp)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    return preprocess_image(img, pp)


def vae_pixels(img: Image.Image) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1] for the VAE encoder: (u8/255 - 0.5)/0.5."""
    return ((to_float_pixels(img) - 0.5) / 0.5).unsqueeze(0)


def stretch(img: Image.Image, width: int, height: int) -> Image.Image:
    """The edit input is stretched to (W, H) with PIL bicubic, no crop (spec §3.8 step 0)."""
    return img if img.size == (width, height) else img.resize((width, height), Image.Resampling.BICUBIC)


# ---------------------------------------------------------------------------------------------
# Prompts (Qwen3ConversationFormatter, spec §4).
# ---------------------------------------------------------------------------------------------

@dataclass
class Turn:
    """One finished exchange, fed back for multi-turn chat."""

    question: str
    answer: str
    num_images: int = 0


class PromptText(str):
    """A prompt's text (as the reference renders it) that also knows where its image slots are.

    `pieces` alternates text and `None` (one image slot each). Only the builders below place slots;
    a user's text is one text piece whatever it contains, so a literal "<image>" typed by a user is
    tokenized as the plain text it is, never as a placeholder.
    """

    pieces: tuple[str | None, ...]

    def __new__(cls, pieces: list[str | None]) -> "PromptText":
        merged: list[str | None] = []
        for piece in pieces:
            if isinstance(piece, str) and merged and isinstance(merged[-1], str):
                merged[-1] += piece
            elif piece is None or piece:
                merged.append(piece)
        self = super().__new__(cls, "".join(IMAGE_TOKEN if p is None else p for p in merged))
        self.pieces = tuple(merged)
        return self

    @property
    def num_images(self) -> int:
        return sum(p is None for p in self.pieces)


def image_content(question: str, num_images: int) -> list[str | None]:
    """The user turn's content: image slots (numbered when several), then the question."""
    if num_images == 0:
        return [question]
    if num_images == 1:
        return [None, "\n" + question]
    pieces: list[str | None] = []
    for i in range(num_images):
        pieces += [f"Image {i + 1}: ", None, "\n"]
    return pieces + [question]


def user_turn(content: list[str | None]) -> list[str | None]:
    return ["<|im_start|>user\n", *content, "<|im_end|>\n"]


def understanding_prompt(question: str, num_images: int, history: list[Turn] | None = None) -> PromptText:
    """Previous turns, then the question, then an assistant turn with an empty think block.

    As the reference's Qwen3 formatter writes them, earlier answers carry the empty think block too
    (`enable_thinking=False`); `num_images` counts the current question's images only.
    """
    pieces: list[str | None] = []
    for turn in history or []:
        pieces += user_turn(image_content(turn.question, turn.num_images))
        pieces += [f"<|im_start|>assistant\n{THINK_EMPTY}{turn.answer}<|im_end|>\n"]
    return PromptText(pieces + user_turn(image_content(question, num_images)) + ["<|im_start|>assistant\n" + THINK_EMPTY])


def unconditional(negative_prompt: str) -> str:
    """The text of the unconditional guidance branches: the reference's, unless a negative prompt replaces it."""
    if not isinstance(negative_prompt, str):
        raise InputError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
    check_encodable("negative_prompt", negative_prompt)
    return negative_prompt.strip() or UNCONDITIONAL_PROMPT


def generation_prompt(content: str) -> PromptText:
    """A generation condition: the user turn only, one image, no assistant prefix."""
    return PromptText(user_turn([None, "\n" + content]))


def tokenize_with_images(tokenizer, prompt: PromptText) -> torch.Tensor:
    """Text pieces tokenised separately, joined by the [-301, -300, -302] placeholder at each image slot.

    Only a `PromptText` has image slots: a plain string is all text, whatever it contains.
    """
    pieces = prompt.pieces if isinstance(prompt, PromptText) else (prompt,)
    ids: list[int] = []
    for piece in pieces:
        if piece is None:
            ids.extend(IMAGE_PLACEHOLDER)
        elif piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def truncate_left(embeds: torch.Tensor, max_length: int) -> torch.Tensor:
    """Keep the last `max_length` positions, with a warning (spec §3.4 step 5)."""
    if embeds.shape[1] <= max_length:
        return embeds
    warnings.warn(f"prompt is {embeds.shape[1]} tokens, over multimodal_max_length {max_length}: "
                  f"keeping the last {max_length}", stacklevel=2)
    return embeds[:, -max_length:]
