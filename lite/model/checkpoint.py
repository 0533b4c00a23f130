"""Find and stream-load an Ovis-U1 checkpoint in the Hugging Face layout.

The module is built on `meta`, the checkpoint is validated from the safetensors headers alone
(names, shapes), and then tensors are read one at a time from the memory-mapped shards, cast and
placed. Nothing is unpickled, and host RAM never holds two copies of the model.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from lite.model.config import load_config
from lite.errors import CheckpointError
from lite.memory import rss_anon_bytes, trim_host_heap
from lite.model.modeling_ovis_u1 import TIED_KEYS, OvisU1, component_of

HF_REPO_IDS = ("AIDC-AI/Ovis-U1-3B", "ATH-MaaS/Ovis-U1-3B")
MODEL_ENV = "OVIS_LITE_MODEL"
INDEX_FILE = "model.safetensors.index.json"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    """An existing local snapshot of `repo_id` in the HF cache; never downloads."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not in the cache"
        return None
    return path if (path / "config.json").exists() else None


def find_checkpoint(model: str | os.PathLike[str] | None = None) -> Path:
    """Resolve `--model`: a directory, an HF repo id in the local cache, $OVIS_LITE_MODEL, or the cache."""
    looked: list[str] = []
    candidates: list[str] = [str(model)] if model else []
    if not model and os.environ.get(MODEL_ENV):
        candidates.append(os.environ[MODEL_ENV])
    if not candidates:
        candidates.extend(HF_REPO_IDS)
    for cand in candidates:
        path = Path(cand).expanduser()
        if path.is_dir():
            if (path / "config.json").exists():
                return path
            looked.append(f"{path} (no config.json)")
            continue
        if _REPO_ID.fullmatch(cand) and not path.exists():
            snap = _hf_cache_snapshot(cand)
            if snap is not None:
                return snap
            looked.append(f"HF cache for {cand}")
        else:
            looked.append(f"{path} (not found)" if not path.exists() else f"{path} (not a directory)")
    raise CheckpointError(
        f"no Ovis-U1 checkpoint found (looked in: {', '.join(looked)}); download {HF_REPO_IDS[0]} "
        f"(e.g. `huggingface-cli download {HF_REPO_IDS[0]}`) and pass --model DIR, or set ${MODEL_ENV}")


@dataclass
class TensorEntry:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str


def index_checkpoint(directory: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint with its file, shape and stored dtype, read from headers only."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
        files = sorted({directory / f for f in weight_map.values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
        weight_map = {}
    if not files:
        raise CheckpointError(f"{directory} holds no *.safetensors files")
    entries: dict[str, TensorEntry] = {}
    for file in files:
        if not file.exists():
            raise CheckpointError(f"shard {file.name} named in {INDEX_FILE} is missing from {directory}")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    entries[key] = TensorEntry(key, file, tuple(sl.get_shape()), sl.get_dtype())
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
            raise CheckpointError(f"shard {file} is corrupt or truncated ({str(exc).splitlines()[0]})") from None
    for key, fname in weight_map.items():
        if key in entries and entries[key].file.name != Path(fname).name:
            raise CheckpointError(f"{INDEX_FILE} puts {key} in {fname} but it is stored in {entries[key].file.name}")
    return entries


def _list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def validate_checkpoint(model: nn.Module, entries: dict[str, TensorEntry]) -> None:
    """Names and shapes must equal the module's; the tied LM head may be present or absent."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(k for k in expected if k not in entries and k not in TIED_KEYS)
    unexpected = sorted(k for k in entries if k not in expected)
    misshaped = [f"{k} {list(entries[k].shape)} (expected {list(expected[k])})"
                 for k in sorted(expected) if k in entries and entries[k].shape != expected[k]]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {_list(missing)}")
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s): {_list(unexpected)}")
    if misshaped:
        raise CheckpointError(f"checkpoint has {len(misshaped)} mis-shaped tensor(s): {_list(misshaped, 3)}")


def set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer in place (the module was built on `meta`)."""
    module_path, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_path) if module_path else root
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise KeyError(name)


def init_non_persistent_buffers(model: OvisU1, device: torch.device) -> None:
    """Recompute buffers the checkpoint does not hold (Qwen3's RoPE inv_freq)."""
    rotary_cls = type(model.llm.model.rotary_emb)
    with torch.device(device):
        model.llm.model.rotary_emb = rotary_cls(model.llm.config)


def tie_weights(model: OvisU1) -> None:
    model.llm.lm_head.weight = model.llm.model.embed_tokens.weight


DTypeFor = Callable[[str], torch.dtype]
Placer = Callable[[OvisU1, str, torch.Tensor], bool]


@dataclass
class LoadReport:
    """What the loader did, for the memory breakdown printed at load."""

    path: Path
    seconds: float = 0.0
    tensors: int = 0
    stored_dtypes: dict[str, int] = field(default_factory=dict)
    component_bytes: dict[str, int] = field(default_factory=dict)
    peak_rss_anon_bytes: int = 0
    rss_anon_before: int = 0
    rss_anon_after: int = 0


def iter_checkpoint_tensors(entries: dict[str, TensorEntry]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, file by file, from memory-mapped shards."""
    by_file: dict[Path, list[str]] = {}
    for e in entries.values():
        by_file.setdefault(e.file, []).append(e.name)
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                for name in names:
                    yield name, f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"shard {file} could not be read ({str(exc).splitlines()[0]})") from None


def load_model(
    path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | DTypeFor = torch.bfloat16,
    placer: Placer | None = None,
    progress: bool = True,
) -> tuple[OvisU1, LoadReport]:
    """Build on meta, validate from headers, then stream tensors into `dtype` on `device`.

    `dtype` is one dtype, or a function of the tensor name (per-component precision). A `placer`
    may take over a tensor (e.g. quantize it as it streams in); it returns True when it did.
    """
    directory = find_checkpoint(path)
    config = load_config(directory)
    device = torch.device(device)
    dtype_for: DTypeFor = dtype if callable(dtype) else (lambda _name, _d=dtype: _d)
    trim_host_heap()
    report = LoadReport(path=directory, rss_anon_before=rss_anon_bytes())
    start = time.perf_counter()
    with torch.device("meta"):
        model = OvisU1(config)
    entries = index_checkpoint(directory)
    validate_checkpoint(model, entries)
    peak = report.rss_anon_before
    bar = tqdm(total=len(entries), desc="loading", unit="tensor", disable=not progress, leave=False)
    for name, tensor in iter_checkpoint_tensors(entries):
        report.stored_dtypes[str(tensor.dtype)] = report.stored_dtypes.get(str(tensor.dtype), 0) + 1
        if name in TIED_KEYS:
            pass  # tied to embed_tokens below: never hold a second copy
        elif placer is None or not placer(model, name, tensor):
            value = tensor.to(device=device, dtype=dtype_for(name))
            set_tensor(model, name, value)
            comp = component_of(name)
            report.component_bytes[comp] = report.component_bytes.get(comp, 0) + value.numel() * value.element_size()
        del tensor
        report.tensors += 1
        if report.tensors % 64 == 0:
            peak = max(peak, rss_anon_bytes())
        bar.update(1)
    bar.close()
    tie_weights(model)
    init_non_persistent_buffers(model, device)
    leftover = [n for n, t in model.state_dict().items() if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{len(leftover)} tensor(s) were not loaded: {_list(leftover)}")
    model.eval().requires_grad_(False)
    report.seconds = time.perf_counter() - start
    report.peak_rss_anon_bytes = max(peak, rss_anon_bytes())
    trim_host_heap()
    report.rss_anon_after = rss_anon_bytes()
    return model, report
