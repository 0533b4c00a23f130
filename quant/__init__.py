"""ovis-lite quantization: model-agnostic quantized linears/embeddings, exact byte layouts, payloads.

Backends register in `quant.backends` (one file each) and load their libraries lazily
(bitsandbytes and optimum-quanto are imported on first use), so importing this package is cheap
and works without either installed.
"""

from .apply import LayerReport, LayerTotals, QuantReport, quantize
from .backends import REGISTRY, LayerKind, is_plain_linear, layer_kind, resolve
from .errors import QuantBackendError, QuantError, QuantFormatError
from .formats import FORMATS, QUANT_FORMATS, dtype_from_name, dtype_name, effective_group_size
from .int8 import Int8Embedding, Int8Linear, Int8VisualEmbedding, quantize_rows_int8, quantize_tied_embedding
from .layout import embedding_layout_nbytes, layout_nbytes
from .linear import quantize_linear_from_weight
from .serialize import export_quantized, restore_quantized
from .spec import QuantSpec

__all__ = [
    "FORMATS", "Int8Embedding", "Int8Linear", "Int8VisualEmbedding", "LayerKind", "LayerReport", "LayerTotals",
    "QUANT_FORMATS", "QuantBackendError", "QuantError", "QuantFormatError", "QuantReport", "QuantSpec", "REGISTRY",
    "dtype_from_name", "dtype_name", "effective_group_size", "embedding_layout_nbytes", "export_quantized",
    "is_plain_linear", "layer_kind", "layout_nbytes", "quantize", "quantize_linear_from_weight", "quantize_rows_int8",
    "quantize_tied_embedding", "resolve", "restore_quantized",
]
