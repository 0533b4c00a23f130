"""Request parsing and validation for the OpenAI-compatible routes, and OpenAI-style errors.

Everything a client can get wrong is caught here, before a job reaches the device, and turned into
an `ApiError`: a 4xx with `{"error": {"message", "type", "param", "code"}}`. Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from lite.errors import InputError
from lite.model.processing import Turn
from lite.validation import MIN_TEMPERATURE, check_encodable, shown
from lite.server.errors import ApiError
from lite.server.images_in import load_images, open_image, url_bytes


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the `serve` command's --max-* options)."""

    max_body_bytes: int = 25 * 2**20
    max_image_pixels: int = 16 * 2**20  # an uploaded image, W*H
    max_prompt_chars: int = 16_000  # a prompt, or a whole conversation's text
    max_side: int = 2048  # a generated image's width or height
    max_n: int = 4
    max_steps: int = 200
    max_tokens: int = 2048
    max_images: int = 8  # images in one conversation
    max_queue: int = 16


# ---------------------------------------------------------------------------------------------
# Scalars.
# ---------------------------------------------------------------------------------------------

def _number(body: dict[str, Any], name: str, low: float, high: float, default: float | None,
            integer: bool = False) -> Any:
    """A number field (JSON numbers, or the strings a multipart form carries); huge integers are compared
    exactly (never converted to float, which would overflow)."""
    value = body.get(name)
    if value is None or value == "":
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, str):
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            raise ApiError(f"{name} must be {kind}, got {shown(value)}", name) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(f"{name} must be {kind}, got {type(value).__name__}", name)
    if isinstance(value, float) and (not math.isfinite(value) or (integer and not value.is_integer())):
        raise ApiError(f"{name} must be {'an integer' if integer else 'a finite number'}, got {shown(value)}", name)
    if not low <= value <= high:
        raise ApiError(f"{name} must be between {low:g} and {high:g}, got {shown(value)}", name)
    return int(value) if integer else float(value)


def _text(body: dict[str, Any], name: str, limits: Limits, required: bool = True, default: str = "") -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(f"'{name}' is a required field", name)
        return default
    if not isinstance(value, str):
        raise ApiError(f"{name} must be a string, got {type(value).__name__}", name)
    if required and not value.strip():
        raise ApiError(f"{name} is empty; give a non-empty {name}", name)
    if len(value) > limits.max_prompt_chars:
        raise ApiError(f"{name} has {len(value)} characters; at most {limits.max_prompt_chars} are accepted "
                       f"(the server's --max-prompt-chars)", name)
    return valid_text(value, name)


def valid_text(value: str, param: str) -> str:
    """Text that is valid Unicode (a lone surrogate could be neither tokenized nor sent back as JSON)."""
    try:
        return check_encodable(param, value)
    except InputError as exc:
        raise ApiError(str(exc), param) from None


def _choice(body: dict[str, Any], name: str, allowed: tuple[str, ...], default: str | None) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        return default
    if value not in allowed:
        raise ApiError(f"{name} must be one of {', '.join(allowed)}, got {shown(value)}", name)
    return value


# ---------------------------------------------------------------------------------------------
# Chat.
# ---------------------------------------------------------------------------------------------

@dataclass
class ChatRequest:
    """A conversation as the pipeline takes it: all images (earlier turns first), the turns, the question."""

    question: str
    images: list[Image.Image]
    history: list[Turn]
    max_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int
    stream: bool
    include_usage: bool = False
    model: str = ""
    text_chars: int = 0


ImageRef = tuple[Any, str]  # (the image_url value as sent, its param path): not decoded yet


def _message_parts(message: dict[str, Any], i: int) -> tuple[str, list[ImageRef]]:
    content = message.get("content")
    param = f"messages[{i}].content"
    if isinstance(content, str):
        return valid_text(content, param), []
    if content is None:
        return "", []
    if not isinstance(content, list):
        raise ApiError(f"{param} must be a string or a list of parts", param)
    texts: list[str] = []
    refs: list[ImageRef] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise ApiError(f"{where} must be an object with a 'type'", where)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(f"{where}.text must be a string", f"{where}.text")
            texts.append(valid_text(part["text"], f"{where}.text"))
        elif kind == "image_url":
            ref = part.get("image_url")
            refs.append((ref.get("url") if isinstance(ref, dict) else ref, f"{where}.image_url"))
        else:
            raise ApiError(f"{where}.type must be 'text' or 'image_url', got {shown(kind)}", f"{where}.type")
    return "\n".join(texts), refs


def _count_images(messages: list[Any], limits: Limits) -> None:
    """Refuse too many images from the parsed JSON alone, before a single one is decoded."""
    count = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum(isinstance(part, dict) and part.get("type") == "image_url" for part in content)
    if count > limits.max_images:
        raise ApiError(f"the conversation has {count} images; at most {limits.max_images} are accepted "
                       "(nothing was decoded)", "messages")


def parse_chat(body: dict[str, Any], limits: Limits) -> ChatRequest:
    """OpenAI chat messages -> the reference's multi-turn template (system messages are not part of it).

    Order matters: fields and image count first, then every image's header (its size), and only then
    are pixels decoded. Run it off the event loop: decoding takes time.
    """
    messages = body.get("messages")
    if messages is None:
        raise ApiError("'messages' is a required field", "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list of {role, content} objects", "messages")
    _count_images(messages, limits)
    if body.get("n") not in (None, 1):
        raise ApiError(f"n must be 1 (one answer per request), got {shown(body.get('n'))}", "n")
    max_tokens = _number(body, "max_completion_tokens", 1, limits.max_tokens, None, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, limits.max_tokens, min(512, limits.max_tokens), integer=True)
    temperature = _number(body, "temperature", 0, 2, None)
    top_p = _number(body, "top_p", 0, 1, None)
    if top_p == 0:
        raise ApiError("top_p must be > 0", "top_p")
    seed = _number(body, "seed", 0, 2**63 - 1, 42, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False

    # Collapse consecutive user messages; pair each user message with the assistant answer after it.
    turns: list[tuple[str, list[ImageRef], str | None]] = []
    total_chars = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(f"messages[{i}].role must be user, assistant or system, got {shown(role)}",
                           f"messages[{i}].role")
        text, refs = _message_parts(message, i)
        total_chars += len(text)
        if role in ("system", "developer"):
            continue  # the reference's template has no system turn
        if role == "assistant":
            if refs:
                raise ApiError("assistant messages cannot carry images", f"messages[{i}].content")
            if not turns or turns[-1][2] is not None:
                raise ApiError(f"messages[{i}] is an assistant message without a user message before it",
                               f"messages[{i}]")
            turns[-1] = (turns[-1][0], turns[-1][1], text)
        elif turns and turns[-1][2] is None:
            prev_text, prev_refs, _ = turns[-1]
            turns[-1] = ("\n".join(t for t in (prev_text, text) if t), prev_refs + refs, None)
        else:
            turns.append((text, refs, None))
    if total_chars > limits.max_prompt_chars:
        raise ApiError(f"the conversation has {total_chars} characters of text; at most {limits.max_prompt_chars} "
                       "are accepted (the server's --max-prompt-chars)", "messages")
    if not turns or turns[-1][2] is not None:
        raise ApiError("the last message must be a user message (the question)", "messages")
    question, current_refs, _ = turns[-1]
    if not question.strip():
        raise ApiError("the last user message has no text; ask a question", "messages")
    history = [Turn(q, a or "", len(refs)) for q, refs, a in turns[:-1]]
    refs = [ref for _, earlier, _ in turns[:-1] for ref in earlier] + current_refs
    opened = [open_image(url_bytes(url, param), limits.max_image_pixels, param) for url, param in refs]
    images = load_images(opened)
    do_sample = temperature is not None and temperature >= MIN_TEMPERATURE  # below it: greedy (it would overflow)
    if temperature is None and top_p is not None and top_p < 1:
        do_sample, temperature = True, 1.0
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    return ChatRequest(question, images, history, max_tokens, do_sample, temperature or 1.0,
                       top_p if top_p is not None else 1.0, seed, stream, include_usage, model, total_chars)


# ---------------------------------------------------------------------------------------------
# Images out.
# ---------------------------------------------------------------------------------------------

@dataclass
class ImageRequest:
    """text-to-image or edit: the pipeline's arguments, resolved but for the preset's defaults (None)."""

    task: str  # "t2i" | "edit"
    prompt: str
    width: int | None
    height: int | None
    n: int
    seed: int
    steps: int | None
    negative_prompt: str
    txt_cfg: float | None
    img_cfg: float | None
    solver: str | None
    spacing: str | None
    image: Image.Image | None = None
    options: dict[str, Any] = field(default_factory=dict)


SOLVER_NAMES = ("euler", "heun", "dpmpp_2m", "unipc")
SPACING_NAMES = ("linear", "logsnr", "karras")


def parse_size(value: Any, limits: Limits, default: tuple[int, int] | None) -> tuple[int, int] | None:
    if value is None or value == "" or value == "auto":
        return default
    m = re.fullmatch(r"\s*([0-9]{1,6})\s*[xX]\s*([0-9]{1,6})\s*", value) if isinstance(value, str) else None
    if not m:
        raise ApiError(f"size must be 'WIDTHxHEIGHT' such as '1024x1024', got {shown(value)}", "size")
    w, h = int(m.group(1)), int(m.group(2))
    for side in (w, h):
        if not 16 <= side <= limits.max_side:
            raise ApiError(f"size {w}x{h}: each side must be between 16 and {limits.max_side} px "
                           f"(the server's --max-side)", "size")
    return w, h


def parse_image_request(body: dict[str, Any], limits: Limits, task: str,
                        image: Image.Image | None = None) -> ImageRequest:
    """`/v1/images/generations` (JSON) or `/v1/images/edits` (form fields as strings)."""
    prompt = _text(body, "prompt", limits)
    fmt = body.get("response_format")
    if fmt not in (None, "", "b64_json"):
        raise ApiError(f"response_format must be 'b64_json' (the server keeps no files to link to), got {shown(fmt)}",
                       "response_format")
    out_fmt = body.get("output_format")
    if out_fmt not in (None, "", "png"):
        raise ApiError(f"output_format must be 'png' (it carries the run's metadata), got {shown(out_fmt)}", "output_format")
    if body.get("mask") not in (None, ""):
        raise ApiError("masks are not supported: Ovis-U1 edits from an instruction alone", "mask")
    size = parse_size(body.get("size"), limits, (1024, 1024) if task == "t2i" else None)
    n = _number(body, "n", 1, limits.max_n, 1, integer=True)
    return ImageRequest(
        task=task, prompt=prompt, width=size[0] if size else None, height=size[1] if size else None, n=n,
        seed=_number(body, "seed", 0, 2**62, 42, integer=True),
        steps=_number(body, "steps", 1, limits.max_steps, None, integer=True),
        negative_prompt=_text(body, "negative_prompt", limits, required=False),
        txt_cfg=_number(body, "txt_cfg", 0, 50, None),
        img_cfg=_number(body, "img_cfg", 0, 50, None) if task == "edit" else None,
        solver=_choice(body, "solver", SOLVER_NAMES, None),
        spacing=_choice(body, "spacing", SPACING_NAMES, None),
        image=image)
