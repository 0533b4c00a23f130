"""Loading a checkpoint in a precision: quantized while it streams in, or restored from a pre-quantized folder.

It sits above both ways of placing tensors (`lite.model.quantize`, `lite.model.prequantized`) and picks one by
the checkpoint's kind, which the caller decided once (`lite.model.checkpoint.checkpoint_kind`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lite.model.checkpoint import (CheckpointKind, LoadReport, ShardSource, checkpoint_kind, resolved_directory,
                                   stream_into_model)
from lite.model.config import OvisU1Config
from lite.model.modeling_ovis_u1 import OvisU1
from lite.model.precision import as_policy
from lite.model.prequantized import PrequantizedSource
from lite.model.quantize import StreamingQuantizer


def load_quantized_model(path: str | os.PathLike[str] | None, policy: Any = None,
                         device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                         progress: bool = True, kind: CheckpointKind | None = None,
                         config: OvisU1Config | None = None) -> tuple[OvisU1, LoadReport]:
    """Load an Ovis-U1 checkpoint quantized by `policy` (a QuantPolicy or a Precision), streaming.

    A PREQUANTIZED folder (written by `save_quantized_checkpoint`) is restored from its payloads: no
    full-precision weight is read and `policy` is ignored (the checkpoint's formats win; the report
    names its policy). A PLAIN one is read tensor by tensor from the mmapped shards, cast, quantized and
    placed before the next one is read, so peak host RAM is about the quantized model plus the
    largest tensor's transients. `dtype` overrides the policy's compute/storage dtype. `kind` is the
    caller's decision (`checkpoint_kind`); without one it is decided here, once. With the `config` the caller
    read from `path` (`lite.runtime.resolve`), the folder is not looked up again nor its config re-read.
    """
    directory = resolved_directory(path, config)
    device = torch.device(device)
    kind = checkpoint_kind(directory) if kind is None else kind
    if kind is CheckpointKind.PREQUANTIZED:
        source = PrequantizedSource(directory, device)
        report = LoadReport(path=directory, policy=source.policy_name, kind=kind)
        return stream_into_model(directory, source, device, source.dtype_for, source.make_placer, progress, report,
                                 config)
    resolved = as_policy(policy, device.type)
    if dtype is not None:
        resolved = resolved.with_dtype(dtype)
    report = LoadReport(path=directory, policy=resolved.name, kind=kind)
    return stream_into_model(directory, ShardSource(directory), device, resolved.dtype_for,
                             lambda model: StreamingQuantizer(model, resolved, device), progress, report, config)
