"""The safetensors shards of a checkpoint: index, headers, validation, and reading one tensor at a time.

A checkpoint is untrusted input: everything is checked from the headers before a byte of tensor
data is read, and nothing is ever unpickled. Checked before loading: every shard the index names
stays inside the checkpoint folder (`contained_file`: no absolute path, no `..`, no symlink out),
the index has the structure safetensors writes, every file is a readable regular file with a
valid header, no tensor is stored twice, and every tensor's name, shape and stored dtype kind fit
the model. Checked while streaming: every floating tensor is finite (the first NaN/Inf is named).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lite.errors import CheckpointError
from lite.model.config_fields import read_json_file
from lite.model.architecture import OVIS_U1

INDEX_FILE = "model.safetensors.index.json"

#: Stored dtypes (safetensors names) a tensor may have, by the kind of the model's own tensor.
#: Floating weights are cast on load, so any IEEE float works; 8-bit floats carry no scales here
#: (pre-quantized checkpoints have their own loader) and integers or bools cannot be a weight.
FLOAT_STORED = ("F32", "F16", "BF16", "F64")
INT_STORED = ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")
BOOL_STORED = ("BOOL",)
#: Elements per block of the exact finiteness scan (bounds its temporary bool buffer to 16 MB).
FINITE_BLOCK = 1 << 24


@dataclass
class TensorEntry:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str


def _allowed_roots(directory: Path) -> list[Path]:
    """The checkpoint folder, and for a Hugging Face cache snapshot its repo's `blobs/` (where its links go)."""
    root = directory.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append(root.parent.parent / "blobs")
    return roots


def contained_file(directory: Path, name: str, what: str) -> Path:
    """`directory / name`, resolved, refused unless it stays inside `directory`.

    `name` comes from an untrusted file (an index, a manifest): an absolute path, a `..`
    component, or a symlink (anywhere on the way) that resolves outside the folder is refused
    with one line naming `what` and the name. The one exception is a Hugging Face cache snapshot,
    whose files are symlinks into the same repo's `blobs/` folder.
    """
    directory = Path(directory)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{what} {name!r} in {directory} is not a valid file name")
    pure = Path(name)
    if pure.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise CheckpointError(f"{what} {name!r} in {directory} is an absolute path; a checkpoint may only name "
                              f"files inside its own folder")
    if ".." in pure.parts or ".." in name.replace("\\", "/").split("/"):
        raise CheckpointError(f"{what} {name!r} in {directory} leaves the checkpoint folder ('..'); a checkpoint "
                              f"may only name files inside its own folder")
    try:
        resolved = (directory / pure).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise CheckpointError(f"{what} {name!r} in {directory} cannot be resolved ({exc})") from None
    if not any(resolved == root or resolved.is_relative_to(root) for root in _allowed_roots(directory)):
        raise CheckpointError(f"{what} {name!r} in {directory} is a symlink to {resolved}, outside the checkpoint "
                              f"folder; copy the file into the folder instead")
    return resolved


def _check_readable(file: Path, label: str) -> None:
    """A regular file we may read (a FIFO would block safetensors' open; a directory is no shard)."""
    try:
        st = os.stat(file)
    except FileNotFoundError:
        raise CheckpointError(f"{label} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"{label} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{label} is not a regular file")
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    except PermissionError:
        raise CheckpointError(f"{label} is not readable (permission denied)") from None
    except OSError as exc:
        raise CheckpointError(f"{label} cannot be read ({exc.strerror or type(exc).__name__})") from None
    os.close(fd)


def _weight_map(index: Path) -> dict[str, str]:
    data = read_json_file(index, CheckpointError, "safetensors index")
    if not isinstance(data, dict):
        raise CheckpointError(f"{index}: the top level must be a JSON object with a 'weight_map', "
                              f"got a JSON {type(data).__name__}")
    if "weight_map" not in data:
        raise CheckpointError(f"{index}: key 'weight_map' is missing: this is not a safetensors index")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: key 'weight_map' must be an object of tensor name -> shard file, "
                              f"got a JSON {type(weight_map).__name__}")
    for key, value in weight_map.items():
        if not isinstance(value, str) or not value:
            raise CheckpointError(f"{index}: key 'weight_map.{key}' must be a shard file name (a string), "
                                  f"got {value!r:.60}")
    return weight_map


def index_checkpoint(directory: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint with its file, shape and stored dtype, read from headers only.

    Each file is checked with `contained_file` first; entries keep the name the checkpoint uses
    (`directory / name`, not a cache blob's hash) so that messages show what the user sees.
    """
    directory = Path(directory)
    index = directory / INDEX_FILE
    label_for: dict[Path, str] = {}
    if os.path.lexists(index):
        weight_map = _weight_map(index)
        for fname in sorted(set(weight_map.values())):
            contained_file(directory, fname, f"shard named in {INDEX_FILE}")
            label_for[directory / fname] = f"shard {fname} named in {INDEX_FILE}"
    else:
        weight_map = {}
        for file in sorted(directory.glob("*.safetensors")):
            contained_file(directory, file.name, "shard")
            label_for[file] = f"shard {file.name}"
    if not label_for:
        raise CheckpointError(f"{directory} holds no *.safetensors files")
    entries: dict[str, TensorEntry] = {}
    for file, label in label_for.items():
        _check_readable(file, f"{label} ({directory})")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if key in entries:
                        raise CheckpointError(f"tensor {key} is stored twice, in {entries[key].file.name} and "
                                              f"{file.name}: the checkpoint is inconsistent")
                    sl = f.get_slice(key)
                    entries[key] = TensorEntry(key, file, tuple(sl.get_shape()), sl.get_dtype())
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
            raise CheckpointError(f"{label} is corrupt or truncated ({str(exc).splitlines()[0][:120]})") from None
    for key, fname in weight_map.items():
        if key not in entries:
            raise CheckpointError(f"{INDEX_FILE} puts {key} in {fname} but no shard holds it")
        if entries[key].file != directory / fname:
            raise CheckpointError(f"{INDEX_FILE} puts {key} in {fname} but it is stored in {entries[key].file.name}")
    return entries


def list_names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def allowed_stored(expected: torch.dtype) -> tuple[str, ...]:
    """The stored dtypes a tensor may have when the model holds it as `expected`."""
    if expected.is_floating_point:
        return FLOAT_STORED
    if expected == torch.bool:
        return BOOL_STORED
    if expected.is_complex:
        return ("C64",)
    return INT_STORED


def _kind(expected: torch.dtype) -> str:
    if expected.is_floating_point:
        return "floating"
    return "bool" if expected == torch.bool else "integer"


def validate_checkpoint(model: nn.Module, entries: dict[str, TensorEntry]) -> None:
    """Names, shapes and stored dtype kinds must fit the module's; the tied LM head may be present or absent."""
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(k for k in expected if k not in entries and k not in OVIS_U1.tied_weights_keys)
    unexpected = sorted(k for k in entries if k not in expected)
    misshaped = [f"{k} {list(entries[k].shape)} (expected {list(expected[k])})"
                 for k in sorted(expected) if k in entries and entries[k].shape != expected[k]]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {list_names(missing)}")
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s): {list_names(unexpected)}")
    if misshaped:
        raise CheckpointError(f"checkpoint has {len(misshaped)} mis-shaped tensor(s): {list_names(misshaped, 3)}")
    for key in sorted(entries):
        want = state[key].dtype
        if entries[key].dtype not in allowed_stored(want):
            raise CheckpointError(
                f"tensor {key} in {entries[key].file.name} is stored as {entries[key].dtype}, but it is a "
                f"{_kind(want)} tensor ({', '.join(allowed_stored(want))}): the checkpoint is corrupt or "
                f"was converted wrongly")


def first_non_finite(tensor: torch.Tensor) -> int | None:
    """The flat index of the first NaN/Inf of a floating tensor, or None when every value is finite.

    Fast path: one `aminmax` reduction (bandwidth-bound, no temporary tensor; NaN propagates to
    both results, +-Inf shows in the max or the min), exact with no false positive; only a tensor
    that really holds a NaN/Inf pays for the block-by-block scan that finds the first one.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    low, high = torch.aminmax(tensor)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return None
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), FINITE_BLOCK):
        bad = (~torch.isfinite(flat[start:start + FINITE_BLOCK])).nonzero()
        if bad.numel():
            return start + int(bad[0])
    return None


def check_finite_tensor(name: str, tensor: torch.Tensor, file: Path | None = None) -> None:
    """Refuse a tensor holding NaN or Inf (it would turn every image black, silently)."""
    where = first_non_finite(tensor)
    if where is not None:
        value = tensor.reshape(-1)[where].item()
        shard = f" in {file.name}" if file is not None else ""
        raise CheckpointError(f"tensor {name}{shard} holds a non-finite value ({value} at flat index {where}): "
                              f"the checkpoint is corrupt; download it again")


def iter_checkpoint_tensors(entries: dict[str, TensorEntry], check_finite: bool = True
                            ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, file by file, from memory-mapped shards, each checked finite."""
    by_file: dict[Path, list[str]] = {}
    for e in entries.values():
        by_file.setdefault(e.file, []).append(e.name)
    for file, names in by_file.items():
        _check_readable(file, f"shard {file.name}")
        try:
            with safe_open(file, framework="pt") as f:
                for name in names:
                    tensor = f.get_tensor(name)
                    if check_finite:
                        check_finite_tensor(name, tensor, file)
                    yield name, tensor
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"shard {file} could not be read ({str(exc).splitlines()[0][:120]})") from None
