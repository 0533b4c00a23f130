"""Find and stream-load an Ovis-U1 checkpoint in the Hugging Face layout.

The module is built on `meta`, the checkpoint is validated from the safetensors headers alone
(names, shapes), and then tensors are read one at a time from the memory-mapped shards, cast and
placed. Nothing is unpickled, and host RAM never holds two copies of the model.
"""

from __future__ import annotations

import enum
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from offload.accounting import module_nbytes

from lite.errors import CheckpointError
from lite.memory import release_file_pages, rss_anon_bytes, tensor_span, trim_host_heap
from lite.model.architecture import OVIS_U1
from lite.model.config import OvisU1Config, load_config
from lite.model.modeling_ovis_u1 import OvisU1
from lite.model.shards import index_checkpoint, iter_checkpoint_tensors, list_names, validate_checkpoint
from lite.progress import progress_bar

HF_REPO_IDS = ("AIDC-AI/Ovis-U1-3B", "ATH-MaaS/Ovis-U1-3B")
#: The manifest `lite.model.prequantized_save` writes last: its presence makes a folder pre-quantized.
MANIFEST_FILE = "ovis_lite_quant.json"
MODEL_ENV = "OVIS_LITE_MODEL"
#: The loader drops the mapped pages it read after about this many bytes (bounds the load's mapped RSS).
RELEASE_EVERY_BYTES = 512 << 20
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    """An existing local snapshot of `repo_id` in the HF cache; never downloads."""
    try:
        from huggingface_hub import snapshot_download  # heavy (httpx and more): only when no folder is given

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
        f"(e.g. `hf download {HF_REPO_IDS[0]}`) and pass --model DIR, or set ${MODEL_ENV}")


class CheckpointKind(enum.Enum):
    """What a checkpoint folder holds, decided once (`checkpoint_kind`) and handed down to the loader."""

    PLAIN = "plain"  # the HF layout: full-precision tensors, cast or quantized while they stream in
    PREQUANTIZED = "prequantized"  # written by `save_quantized_checkpoint`: payloads restored as stored


def checkpoint_kind(directory: str | os.PathLike[str]) -> CheckpointKind:
    """PREQUANTIZED for a folder holding the manifest (`MANIFEST_FILE`), else PLAIN."""
    return CheckpointKind.PREQUANTIZED if (Path(directory) / MANIFEST_FILE).is_file() else CheckpointKind.PLAIN


def model_id_of(directory: Path) -> str:
    """The model's id for metadata: the HF repo id of a cache snapshot, else the folder's name."""
    parts = directory.resolve().parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    return directory.name


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
    """The LM head reads the token embedding's weight (`OvisU1.architecture.tied_weights_keys`)."""
    model.get_submodule(OVIS_U1.head_module).weight = model.get_submodule(OVIS_U1.embed_module).weight


DTypeFor = Callable[[str], torch.dtype]


class Placer(Protocol):
    """Takes over tensors as they stream in (quantizing them, or restoring pre-quantized payloads)."""

    def __call__(self, model: OvisU1, name: str, tensor: torch.Tensor) -> bool:
        """True when it placed `tensor` itself; False lets the loader cast and place it."""

    def finish(self, model: OvisU1) -> None:
        """After the stream: build what is still pending, tie what must be tied, refuse what is left over."""


class TensorSource(Protocol):
    """Where the loop reads from: the HF shards, or a pre-quantized checkpoint's shards."""

    def validate(self, model: OvisU1) -> None:
        """Refuse a checkpoint that cannot fill `model`, from headers alone, before any data is read."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]: ...


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
    policy: str = ""
    kind: CheckpointKind = CheckpointKind.PLAIN
    quant: Any = None  # lite.model.quantize.ModelQuantReport when anything was quantized
    bytes_read: int = 0  # bytes of every tensor read from the checkpoint
    largest_tensor_bytes: int = 0
    names_read: list[str] = field(default_factory=list)
    released_bytes: int = 0  # mapped shard pages dropped once read (`release_file_pages`)

    @property
    def prequantized(self) -> bool:
        return self.kind is CheckpointKind.PREQUANTIZED


class ShardSource:
    """The checkpoint's own safetensors shards, validated against the model from their headers."""

    def __init__(self, directory: Path) -> None:
        self.entries = index_checkpoint(directory)

    def validate(self, model: OvisU1) -> None:
        validate_checkpoint(model, self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter_checkpoint_tensors(self.entries)


PlacerFactory = Callable[[OvisU1], Placer]


def stream_into_model(directory: Path, source: TensorSource, device: torch.device, dtype_for: DTypeFor,
                      make_placer: PlacerFactory | None, progress: bool,
                      report: LoadReport, config: OvisU1Config | None = None) -> tuple[OvisU1, LoadReport]:
    """The one load loop: meta model, header validation, then one tensor at a time -> placer or cast+place.

    Host RAM holds the model being built plus one tensor (and whatever the placer keeps pending). The mapped
    shard pages each tensor's read touched are dropped every `RELEASE_EVERY_BYTES` (`release_file_pages`):
    a converted tensor's never come back, a kept one's come back from the file when a phase uses them.
    """
    config = config if config is not None else load_config(directory)
    trim_host_heap()
    report.rss_anon_before = rss_anon_bytes()
    start = time.perf_counter()
    with torch.device("meta"):
        model = OvisU1(config)
    source.validate(model)
    placer = make_placer(model) if make_placer is not None else None
    if placer is not None and getattr(placer, "report", None) is not None:
        report.quant = placer.report
    peak = report.rss_anon_before
    read: list[tuple[int, int]] = []  # spans of host tensors read since the last release
    with progress_bar(len(source), "loading", progress, unit="tensor") as bar:
        for name, tensor in source:
            if tensor.device.type == "cpu":
                read.append(tensor_span(tensor))
            report.stored_dtypes[str(tensor.dtype)] = report.stored_dtypes.get(str(tensor.dtype), 0) + 1
            report.bytes_read += tensor.nbytes
            report.largest_tensor_bytes = max(report.largest_tensor_bytes, tensor.nbytes)
            report.names_read.append(name)
            if name not in OVIS_U1.tied_weights_keys and (placer is None or not placer(model, name, tensor)):
                set_tensor(model, name, tensor.to(device=device, dtype=dtype_for(name)))
            del tensor
            report.tensors += 1
            if report.tensors % 8 == 0:
                peak = max(peak, rss_anon_bytes())
            if sum(n for _, n in read) >= RELEASE_EVERY_BYTES:
                report.released_bytes += release_file_pages(read)
                read.clear()
            bar.update(1)
    report.released_bytes += release_file_pages(read)
    if placer is None:
        tie_weights(model)  # the head never held a second copy
    else:
        placer.finish(model)
    init_non_persistent_buffers(model, device)
    leftover = [n for n, t in named_tensors(model) if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{len(leftover)} tensor(s) were not loaded: {list_names(leftover)}")
    model.eval().requires_grad_(False)
    report.seconds = time.perf_counter() - start
    report.peak_rss_anon_bytes = max(peak, rss_anon_bytes())
    report.component_bytes = {c: module_nbytes(model.get_submodule(p)) for c, p in OVIS_U1.components.items()}
    if report.quant is not None:
        report.quant.component_bytes = dict(report.component_bytes)
    trim_host_heap()
    report.rss_anon_after = rss_anon_bytes()
    return model, report


def named_tensors(model: nn.Module, skip: set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and persistent buffer, tied ones once, without `state_dict()`
    (which makes quanto unpack every TinyGemm weight); modules named in `skip` are left out whole."""
    seen: set[int] = set()
    for mname, m in model.named_modules():
        if mname in skip or any(mname.startswith(q + ".") for q in skip):
            continue
        prefix = f"{mname}." if mname else ""
        items = list(m._parameters.items()) + [(k, b) for k, b in m._buffers.items()
                                                if k not in m._non_persistent_buffers_set]
        for leaf, t in items:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            yield prefix + leaf, t


def resolved_directory(path: str | os.PathLike[str] | None, config: OvisU1Config | None) -> Path:
    """The checkpoint directory: `path` as given when the caller resolved it already (it passes the config it
    read there, `lite.runtime.resolve`), else looked up."""
    return Path(path) if config is not None and path is not None else find_checkpoint(path)


def load_model(
    path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | DTypeFor = torch.bfloat16,
    placer: Placer | None = None,
    progress: bool = True,
    config: OvisU1Config | None = None,
) -> tuple[OvisU1, LoadReport]:
    """Build on meta, validate from headers, then stream tensors into `dtype` on `device`.

    `dtype` is one dtype, or a function of the tensor name (per-component precision). A `placer`
    may take over a tensor (e.g. quantize it as it streams in); it returns True when it did.
    """
    directory = resolved_directory(path, config)
    dtype_for: DTypeFor = dtype if callable(dtype) else (lambda _name, _d=dtype: _d)
    make = (lambda _model: placer) if placer is not None else None
    return stream_into_model(directory, ShardSource(directory), torch.device(device), dtype_for, make, progress,
                             LoadReport(path=directory), config)
