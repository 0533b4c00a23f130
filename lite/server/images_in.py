"""Images that clients send: sized from their headers first, decoded only once every limit holds.

A request's images are opened in two passes: `open_image` reads the container header (PIL opens
lazily: no pixel is decoded) and refuses an oversized image; `load_images` decodes the pixels of
all of them afterwards. Callers run both off the event loop (the handlers use a thread).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

from PIL import Image, UnidentifiedImageError

from lite.server.errors import ApiError

DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def open_image(data: bytes, max_pixels: int, param: str) -> Image.Image:
    """Bytes of an image file -> a lazily opened PIL image whose header says it has <= max_pixels."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
    except Image.DecompressionBombError as exc:  # PIL's own ceiling, far above ours: the header is absurd
        raise ApiError(f"image is too large ({str(exc).split(',')[0]}); at most {max_pixels} pixels are accepted "
                       f"(the server's --max-image-pixels); downscale it first", param) from None
    except UNREADABLE as exc:
        raise ApiError(f"cannot read the image: not a valid image file ({type(exc).__name__})", param) from None
    if w * h > max_pixels:
        raise ApiError(f"image is {w}x{h} = {w * h} pixels; at most {max_pixels} are accepted "
                       f"(the server's --max-image-pixels); downscale it first", param)
    img.info["ovis_lite_param"] = param
    return img


def url_bytes(url: Any, param: str) -> bytes:
    """A `data:image/...;base64,...` URI -> its bytes. The server fetches nothing, so URLs are refused."""
    if not isinstance(url, str):
        raise ApiError(f"{param} must be a string data URI, got {type(url).__name__}", param)
    if re.match(r"^\s*(https?|ftp|file):", url, re.I):
        raise ApiError("image URLs are not fetched (the server reaches nothing outside); send the image inline "
                       "as a data URI: data:image/png;base64,...", param)
    m = DATA_URI.match(url)
    if not m or not m.group("b64"):
        raise ApiError("image_url must be a base64 data URI such as data:image/png;base64,...", param)
    if m.group("mime") and not m.group("mime").lower().startswith("image/"):
        raise ApiError(f"image_url has media type {m.group('mime')}; it must be an image/* data URI", param)
    try:
        return base64.b64decode(url[m.end():], validate=False)
    except (binascii.Error, ValueError):
        raise ApiError("image_url's base64 payload is not valid base64", param) from None


def load_images(images: list[Image.Image]) -> list[Image.Image]:
    """Decode the pixels of images that `open_image` accepted -> RGB images."""
    out: list[Image.Image] = []
    for img in images:
        param = img.info.get("ovis_lite_param")
        try:
            img.load()
            out.append(img.convert("RGB"))
        except UNREADABLE as exc:
            raise ApiError(f"cannot read the image: not a valid image file ({type(exc).__name__})", param) from None
    return out


def decode_image_bytes(data: bytes, max_pixels: int, param: str) -> Image.Image:
    """One image file's bytes -> RGB, size checked before its pixels are decoded."""
    return load_images([open_image(data, max_pixels, param)])[0]
