"""ovis-lite quantization: model-agnostic quantized linears/embeddings, exact byte layouts, checkpoints.

Backends load lazily (bitsandbytes and optimum-quanto are imported on first use), so importing
this package is cheap and works without either installed.
"""

from .apply import LayerReport, QuantReport, quantize
from .errors import QuantBackendError, QuantFormatError
from .int8 import Int8Embedding, Int8Linear, quantize_rows_int8, quantize_tied_embedding
from .layout import embedding_layout_nbytes, layout_nbytes
from .linear import LayerKind, layer_kind, quantize_linear_from_weight, resolve_backend
from .serialize import export_quantized, load_quantized, read_manifest, restore_quantized, save_quantized
from .spec import BACKENDS, FORMATS, QuantSpec, effective_group_size

__all__ = [
    "BACKENDS", "FORMATS", "Int8Embedding", "Int8Linear", "LayerKind", "LayerReport", "QuantBackendError",
    "QuantFormatError", "QuantReport", "QuantSpec", "effective_group_size", "embedding_layout_nbytes",
    "export_quantized", "layer_kind", "layout_nbytes", "load_quantized", "quantize", "quantize_linear_from_weight",
    "quantize_rows_int8", "quantize_tied_embedding", "read_manifest", "resolve_backend", "restore_quantized",
    "save_quantized",
]
