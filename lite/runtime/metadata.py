"""What an output image says about itself: the fields it records, their encodings, and reading them back.

Written: PNG tEXt chunks (one per field, the whole set as JSON under `ovis-lite`, and an A1111-style
`parameters` chunk that other tools show: prompt, negative prompt, steps, sampler, CFG, seed, size,
model); JPEG a COM (comment) segment and WebP an XMP packet, both holding the same JSON.
`read_metadata` reads all three back from files anyone may have written (so every limit is checked).
"""

from __future__ import annotations

import html
import json
import os
import re
import unicodedata
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from lite.version import __version__
from lite.errors import InputError
from lite.model.images import _open_regular

METADATA_KEY = "ovis-lite"
PARAMETERS_KEY = "parameters"  # the chunk A1111, ComfyUI and image viewers read
#: JPEG COM payload prefix, so that `read_metadata` knows a comment is ours.
JPEG_COMMENT_PREFIX = b"ovis-lite "
JPEG_COMMENT_MAX = 65533 - len(JPEG_COMMENT_PREFIX)  # one COM segment
XMP_NS = "https://github.com/ovis-lite/ns/1.0/"
MAX_METADATA_BYTES = 1 << 20  # PIL's MAX_TEXT_CHUNK: nothing we write is near it
MAX_METADATA_DEPTH = 32  # nesting levels `read_metadata` accepts (ours has 2)
SAMPLER_NAMES = {"euler": "Euler", "heun": "Heun", "dpmpp_2m": "DPM++ 2M", "unipc": "UniPC"}  # A1111's spellings
SCHEDULE_NAMES = {"linear": "Simple", "karras": "Karras", "logsnr": "LogSNR"}


# ---------------------------------------------------------------------------------------------
# Written.
# ---------------------------------------------------------------------------------------------

def metadata_json(fields: dict[str, Any]) -> str:
    return json.dumps(fields, sort_keys=True, default=str)


def xmp_packet(text: str) -> bytes:
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:ovislite="{XMP_NS}">'
            f'<ovislite:metadata>{html.escape(text, quote=False)}</ovislite:metadata>'
            '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode("utf-8")


def a1111_parameters(fields: dict[str, Any]) -> str:
    """The A1111 `parameters` text: the prompt, `Negative prompt: ...`, then one line of `Key: value` pairs."""
    lines = [str(fields.get("prompt") or "")]
    if fields.get("negative_prompt"):
        lines.append(f"Negative prompt: {fields['negative_prompt']}")
    pairs = [("Steps", fields.get("steps")),
             ("Sampler", SAMPLER_NAMES.get(str(fields.get("solver")), fields.get("solver"))),
             ("Schedule type", SCHEDULE_NAMES.get(str(fields.get("spacing")), fields.get("spacing"))),
             ("CFG scale", fields.get("txt_cfg")), ("Image CFG scale", fields.get("img_cfg")),
             ("Seed", fields.get("seed")),
             ("Size", f"{fields['width']}x{fields['height']}" if fields.get("width") else None),
             ("Model", Path(str(fields["model"])).name if fields.get("model") else None),
             ("Preset", fields.get("preset")), ("Version", f"ovis-lite {__version__}")]
    # A1111 splits the pairs on ", " and ": ": values holding either are quoted, as A1111 does.
    shown = [f"{key}: {json.dumps(str(v)) if (', ' in str(v) or ': ' in str(v)) else v}"
             for key, v in pairs if v is not None]
    lines.append(", ".join(shown))
    return "\n".join(lines)


def image_metadata(model_id: str, stats: Any, task: str, preset: str | None, seed: int,
                   negative_prompt: str | None = None) -> dict[str, Any]:
    """What an output image records (the CLI's and the server's alike): task, model, size, NFE, preset, the
    run's settings and its own seed, so `--config-from-metadata` can rerun it."""
    meta = {"task": task, "model": model_id, "width": stats.width, "height": stats.height, "nfe": stats.nfe,
            "preset": preset, "ovis_lite_version": __version__, **stats.settings, "seed": seed}
    if negative_prompt is not None:
        meta.setdefault("negative_prompt", negative_prompt)
    return meta


# ---------------------------------------------------------------------------------------------
# Reading metadata back (`ovis-lite info`, `--config-from-metadata`): untrusted files.
# ---------------------------------------------------------------------------------------------

def _depth(value: Any) -> int:
    """Nesting depth, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_METADATA_DEPTH:
            return level
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _parse_metadata_json(path: Path, text: str | bytes, where: str) -> dict[str, Any]:
    if len(text) > MAX_METADATA_BYTES:
        raise InputError(f"{path}: the ovis-lite metadata in {where} is {len(text)} bytes, over the "
                         f"{MAX_METADATA_BYTES} byte limit; it was not written by ovis-lite")
    try:
        meta = json.loads(text)
    except RecursionError:
        raise InputError(f"{path}: the ovis-lite metadata in {where} is nested too deeply to be ours") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: the ovis-lite metadata in {where} is not valid JSON "
                         f"({getattr(exc, 'msg', type(exc).__name__)})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: the ovis-lite metadata in {where} is a JSON {type(meta).__name__}, "
                         f"not an object; it was not written by ovis-lite")
    if _depth(meta) > MAX_METADATA_DEPTH:
        raise InputError(f"{path}: the ovis-lite metadata in {where} is nested more than "
                         f"{MAX_METADATA_DEPTH} levels deep; it was not written by ovis-lite")
    return meta


_XMP_FIELD = re.compile(r"<ovislite:metadata>(.*?)</ovislite:metadata>", re.DOTALL)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ovis-lite metadata of an image written by `save_image` (PNG, JPEG or WebP)."""
    path = Path(path)
    fd = _open_regular(path)
    try:
        with os.fdopen(fd, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # no pixel is decoded here
            with Image.open(f) as img:
                fmt = img.format
                text = dict(getattr(img, "text", {}) or {}) if fmt == "PNG" else {}
                comment = img.info.get("comment", b"")
                xmp = img.info.get("xmp", b"")
    except Image.DecompressionBombError:
        raise InputError(f"{path} declares a size over PIL's decompression-bomb limit; "
                         f"it was not written by ovis-lite") from None
    except PermissionError:
        raise InputError(f"image file is not readable (permission denied): {path}") from None
    except (ValueError, MemoryError) as exc:  # PIL: text chunks over MAX_TEXT_CHUNK / MAX_TEXT_MEMORY
        raise InputError(f"{path}: its metadata chunks are too large or malformed "
                         f"({str(exc)[:80] or type(exc).__name__})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as exc:
        raise InputError(f"cannot read image {path}: not a valid image file ({type(exc).__name__})") from None
    if METADATA_KEY in text:
        return _parse_metadata_json(path, text[METADATA_KEY], f"its {METADATA_KEY!r} PNG text chunk")
    if isinstance(comment, bytes) and comment.startswith(JPEG_COMMENT_PREFIX):
        return _parse_metadata_json(path, comment[len(JPEG_COMMENT_PREFIX):], "its JPEG comment")
    if isinstance(xmp, (bytes, str)) and xmp:
        xmp_text = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else xmp
        m = _XMP_FIELD.search(xmp_text[: 2 * MAX_METADATA_BYTES])
        if m:
            return _parse_metadata_json(path, html.unescape(m.group(1)), "its XMP packet")
    if not text:
        raise InputError(f"{path} carries no ovis-lite metadata (it was not written by ovis-lite)")
    return text


# Bidirectional overrides and isolates reorder what the terminal shows ("Trojan source").
_BIDI = set("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def escape_control(text: str) -> str:
    """Control characters (C0, DEL, C1: escape sequences, title changes, screen clears) and bidi
    overrides as visible escapes: \\n, \\t, \\x1b, \\u202e."""
    out = []
    for ch in text:
        if ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif unicodedata.category(ch) == "Cc":
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        elif ch in _BIDI:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def format_metadata(meta: dict[str, Any]) -> str:
    """The `info` text output: one `key: value` line per field, sorted, with control characters escaped.

    Non-string values are shown as JSON. The result never contains a raw control character, so a
    file's metadata cannot move the cursor, clear the screen or retitle the terminal.
    """
    lines = []
    for key in sorted(meta, key=str):
        value = meta[key]
        shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False,
                                                                 default=str)
        lines.append(f"{escape_control(str(key))}: {escape_control(shown)}")
    return "\n".join(lines)
