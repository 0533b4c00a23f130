"""Writing results safely: nothing partial, nothing of the user's lost.

Before any model loads, `check_output_path` proves the output can be written: a known format, a
name that fits the filesystem, a folder that exists or can be created and that really accepts a
new file (a read-only mount or an immutable folder is caught by creating and removing a probe
file), and, without overwrite, a name that does not exist yet (a dangling symlink counts, as in cp).

At the write the image is encoded in memory, written to a temp file in the same folder and
fsynced; then, without overwrite, it is hard-linked to the final name (link fails if the name
exists, so of two concurrent writers exactly one wins), with `O_EXCL` creation where a filesystem
has no hard links; with overwrite, it is renamed over the old file. Any failure (a full disk
included) leaves no partial or temp file and the user's existing file untouched. New files get
the mode the user's umask gives any new file.

What an image records, and reading it back, is `lite.runtime.metadata`'s.
"""

from __future__ import annotations

import errno
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from lite.version import __version__
from lite.errors import ArgumentTypeError, OutputError
from lite.runtime.metadata import (
    JPEG_COMMENT_MAX,
    JPEG_COMMENT_PREFIX,
    METADATA_KEY,
    PARAMETERS_KEY,
    a1111_parameters,
    metadata_json,
    xmp_packet,
)

IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


# ---------------------------------------------------------------------------------------------
# Before the run.
# ---------------------------------------------------------------------------------------------

def _limit(folder: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(folder, name))
    except (OSError, ValueError):
        return default


def _nearest_existing(folder: Path) -> Path:
    """The folder itself or its nearest ancestor that exists (refusing a file on the way)."""
    probe = folder
    while not os.path.lexists(probe):
        if probe.parent == probe:
            break
        probe = probe.parent
    if os.path.lexists(probe) and not probe.is_dir():
        raise OutputError(f"cannot create the output folder {folder}: {probe} is a file, not a folder")
    return probe


def _os_reason(exc: OSError) -> str:
    reasons = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted (immutable or protected folder?)",
               errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.ENAMETOOLONG: "file name too long"}
    return reasons.get(exc.errno or 0, exc.strerror or type(exc).__name__)


def _probe_writable(folder: Path, what: str) -> None:
    """Really create and remove a file in `folder` (permission bits do not stop root; a ro mount does)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".ovis-lite-probe-", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write {what}: the folder {folder} is not writable ({_os_reason(exc)}); "
                          f"choose another folder") from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


def check_output_path(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse before any work is done anything that would fail or lose a file at the write."""
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"output path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise OutputError(f"output {path} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    if os.path.isdir(path):
        raise OutputError(f"output {path} is a directory; give a file name such as {path / 'out.png'}")
    folder = path.parent
    existing = _nearest_existing(folder)
    name_max = _limit(existing, "PC_NAME_MAX", 255)
    path_max = _limit(existing, "PC_PATH_MAX", 4096)
    # Our temp names add about 20 bytes to the output name: the final name must leave room for them.
    if len(os.fsencode(path.name)) + 20 > name_max:
        raise OutputError(f"output file name is too long ({len(os.fsencode(path.name))} bytes; this filesystem "
                          f"allows {name_max}, less 20 for the temp file): choose a shorter name")
    if len(os.fsencode(os.path.abspath(path))) + 20 >= path_max:
        raise OutputError(f"output path is too long ({len(os.fsencode(os.path.abspath(path)))} bytes; "
                          f"the limit is {path_max}): choose a shorter path")
    if os.path.lexists(path) and not overwrite:
        link = f" (a symlink to {os.readlink(path)})" if os.path.islink(path) else ""
        raise OutputError(f"output {path} already exists{link}; pass --overwrite to replace it or choose another name")
    _probe_writable(existing, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# The write.
# ---------------------------------------------------------------------------------------------

def new_file_mode() -> int:
    """0o666 less the process umask: the mode `open()` gives a new file (mkstemp alone makes 0600)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no way to read it without setting it elsewhere
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _already_exists(path: Path) -> OutputError:
    return OutputError(f"output {path} already exists (written by another run meanwhile?); "
                       f"pass --overwrite to replace it or choose another name")


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    """The fallback where hard links are not supported: O_EXCL creation of the final name itself."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    except FileExistsError:
        raise _already_exists(path) from None
    try:
        _write_all(fd, data)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)  # ours: created exclusively above
        raise
    os.close(fd)


def write_bytes(path: Path, data: bytes, overwrite: bool) -> None:
    """Put `data` at `path` completely or not at all; without `overwrite` the name is created exclusively."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {path.parent}: {_os_reason(exc)}") from None
    mode = new_file_mode()
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, mode)
            _write_all(fd, data)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
            tmp = None
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise _already_exists(path) from None
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                _create_exclusive(path, data, mode)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {_os_reason(exc)}; nothing was written"
                          + (" and the existing file is unchanged" if os.path.lexists(path) else "")) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def atomic_write(path: Path, write: Any, overwrite: bool = True) -> None:
    """Write what `write(file)` produces through an in-memory buffer and `write_bytes`."""
    buffer = io.BytesIO()
    write(buffer)
    write_bytes(path, buffer.getvalue(), overwrite)


def encode_image(image: Image.Image, fmt: str, metadata: dict[str, Any] | None) -> tuple[bytes, str | None]:
    """The file's bytes, and a notice when the format could not carry the metadata."""
    kwargs: dict[str, Any] = {}
    notice = None
    if metadata:
        fields = {"software": f"ovis-lite {__version__}", **metadata}
        text = metadata_json(fields)
        if fmt == "PNG":
            info = PngImagePlugin.PngInfo()
            for key, value in fields.items():
                if value is not None:
                    info.add_text(key, value if isinstance(value, str) else json.dumps(value, default=str))
            info.add_text(METADATA_KEY, text)
            if metadata.get("task") in ("t2i", "edit"):
                info.add_text(PARAMETERS_KEY, a1111_parameters(fields))
            kwargs["pnginfo"] = info
        elif fmt == "JPEG":
            payload = text.encode("utf-8")
            if len(payload) <= JPEG_COMMENT_MAX:
                kwargs["comment"] = JPEG_COMMENT_PREFIX + payload
            else:
                notice = (f"ovis-lite: notice: the metadata ({len(payload)} bytes) does not fit a JPEG comment; "
                          f"the image was written without it (write .png to keep it)")
        elif fmt == "WEBP":
            kwargs["xmp"] = xmp_packet(text)
    if fmt == "JPEG":
        kwargs.setdefault("quality", 95)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt, **kwargs)
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot encode the image as {fmt} ({str(exc)[:100]}); write .png instead") from None
    return buffer.getvalue(), notice


def save_image(image: Image.Image, path: str | os.PathLike[str], overwrite: bool = False,
               metadata: dict[str, Any] | None = None) -> Path:
    """Save with metadata (PNG text chunks, JPEG comment, WebP XMP); exclusive unless `overwrite`."""
    if not isinstance(image, Image.Image):
        raise ArgumentTypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    path = check_output_path(path, overwrite)
    data, notice = encode_image(image, IMAGE_SUFFIXES[path.suffix.lower()], metadata)
    write_bytes(path, data, overwrite)
    if notice:
        print(notice, file=sys.stderr)
    return path
