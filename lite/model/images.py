"""Reading user images: only regular files, only real images, within the pixel limits.

Shared by the CLI, the Python API and the server: an image is untrusted input. The size is checked
from the header before a pixel is decoded (PIL's own decompression-bomb warning and error become
our one-line `InputError`), and anything that is not a regular file (a FIFO, a device, a socket)
is refused before it is opened, so that reading never blocks.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lite.errors import ArgumentTypeError, InputError
from lite.validation import shown

MAX_INPUT_PIXELS = 40_000_000

_FILE_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}


def _kind(mode: int) -> str:
    return _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _too_large(name: str, w: int, h: int) -> InputError:
    return InputError(f"{name} is {w}x{h} ({w * h / 1e6:.1f} MP): over the {MAX_INPUT_PIXELS / 1e6:.0f} MP limit; "
                      f"downscale it first")


def _open_regular(path: Path) -> int:
    """An fd on `path` opened without blocking, after checking (before and after opening) it is a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"image file not found: {path}") from None
    except NotADirectoryError:
        raise InputError(f"image file not found: {path} (a part of the path is a file)") from None
    except PermissionError:
        raise InputError(f"image file is not readable (permission denied): {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror or type(exc).__name__}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path} is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path} is {_kind(st.st_mode)}, not a regular image file")
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO since the stat, opening still returns at once.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise InputError(f"image file is not readable (permission denied): {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror or type(exc).__name__}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputError(f"{path} is {_kind(st.st_mode)}, not a regular image file")
    os.set_blocking(fd, True)
    return fd


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open a user image as RGB (alpha dropped, no EXIF rotation, like the reference)."""
    path = Path(path)
    fd = _open_regular(path)
    with os.fdopen(fd, "rb") as f:
        try:
            with warnings.catch_warnings():
                # A bomb is refused from its header in our own words, never after PIL printed a warning.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as img:
                    w, h = img.size
                    if w < 1 or h < 1:
                        raise InputError(f"image {path} has zero size ({w}x{h})")
                    if w * h > MAX_INPUT_PIXELS:
                        raise _too_large(f"image {path}", w, h)
                    rgb = img.convert("RGB")
                    rgb.load()
        except InputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            size = f" ({int(pixels.group(1)) / 1e6:.0f} MP)" if pixels else ""
            raise InputError(f"image {path} is too large{size}: over the {MAX_INPUT_PIXELS / 1e6:.0f} MP limit "
                             f"(a possible decompression bomb); downscale it first") from None
        except PermissionError:
            raise InputError(f"image file is not readable (permission denied): {path}") from None
        except MemoryError:
            raise InputError(f"image {path} does not fit in memory when decoded; downscale it first") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
            detail = "truncated" if "truncated" in str(exc) else type(exc).__name__
            raise InputError(f"cannot read image {path}: not a valid image file ({detail})") from None
    return validate_image(rgb, str(path))


def validate_image(img: Image.Image, name: str = "image") -> Image.Image:
    """A PIL image with pixels, within the limit, as RGB (decoding a lazy image's pixels if needed)."""
    if not isinstance(img, Image.Image):
        raise ArgumentTypeError(f"{name} must be a PIL.Image.Image, got {type(img).__name__}")
    w, h = img.size
    if w < 1 or h < 1:
        raise InputError(f"{name} has zero size ({w}x{h})")
    if w * h > MAX_INPUT_PIXELS:
        raise _too_large(name, w, h)
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InputError(f"{name} cannot be converted to RGB ({type(exc).__name__}: {str(exc)[:80]})") from None


def as_image(value: object, name: str = "image") -> Image.Image:
    """What the API takes where an image is expected: a path (str / os.PathLike) or a PIL image, as RGB."""
    if isinstance(value, Image.Image):
        return validate_image(value, name)
    if isinstance(value, (str, os.PathLike)):
        if isinstance(value, str) and not value.strip():
            raise InputError(f"{name} is an empty path; give an image file or a PIL.Image.Image")
        return load_image(value)
    raise ArgumentTypeError(f"{name} must be an image file path or a PIL.Image.Image, got {type(value).__name__}"
                            + (f" {shown(value)}" if value is None or isinstance(value, (int, float, bytes)) else ""))


def as_images(value: object, name: str = "images") -> list[Image.Image]:
    """An image, a path, or a list/tuple of them (None: no images) -> RGB images, each checked."""
    if value is None:
        return []
    if isinstance(value, (Image.Image, str, os.PathLike)):
        value = [value]
    elif not isinstance(value, (list, tuple)):
        raise ArgumentTypeError(f"{name} must be an image, a path, or a list of them, got {type(value).__name__}")
    return [as_image(item, f"{name}[{i}]") for i, item in enumerate(value)]
