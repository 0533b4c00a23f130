"""Writing results safely: atomic writes, no silent overwrite, PNG text metadata that tools can read."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from lite import __version__
from lite.errors import InputError, OutputError

IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
METADATA_KEY = "ovis-lite"


def check_output_path(path: str | Path, overwrite: bool) -> Path:
    """Refuse before any work is done: an unknown format, a directory, or an existing file."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise OutputError(f"output {path} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    if path.is_dir():
        raise OutputError(f"output {path} is a directory; give a file name such as {path / 'out.png'}")
    if path.exists() and not overwrite:
        raise OutputError(f"output {path} already exists; pass --overwrite to replace it or choose another name")
    return path


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temp file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_image(image: Image.Image, path: str | Path, overwrite: bool = False,
               metadata: dict[str, Any] | None = None) -> Path:
    """Save with metadata in PNG tEXt chunks (one per field, plus the whole set as JSON)."""
    path = check_output_path(path, overwrite)
    fmt = IMAGE_SUFFIXES[path.suffix.lower()]
    kwargs: dict[str, Any] = {}
    if fmt == "PNG" and metadata:
        info = PngImagePlugin.PngInfo()
        fields = {"software": f"ovis-lite {__version__}", **metadata}
        for key, value in fields.items():
            if value is not None:
                info.add_text(key, value if isinstance(value, str) else json.dumps(value))
        info.add_text(METADATA_KEY, json.dumps(fields, sort_keys=True))
        kwargs["pnginfo"] = info
    atomic_write(path, lambda f: image.save(f, format=fmt, **kwargs))
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ovis-lite metadata of an image written by `save_image`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            text = dict(getattr(img, "text", {}) or {})
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {path}: not a valid image file ({type(exc).__name__})") from None
    if METADATA_KEY in text:
        return json.loads(text[METADATA_KEY])
    if not text:
        raise InputError(f"{path} carries no ovis-lite metadata (it was not written by ovis-lite, or not as PNG)")
    return text
