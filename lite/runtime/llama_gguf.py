"""The checkpoint's LLM as a llama.cpp GGUF file, made once per checkpoint and format, then reused.

The Ovis-U1 LLM is a plain Qwen3 (spec §3.5: q/k RMSNorm before rotate-half RoPE, GQA, causal, tied head), so
llama.cpp's `qwen3` architecture computes it as is. Only the LLM is exported: the prompt reaches llama.cpp as
embeddings our own code computes (text embeddings and visual tokens merged, `merge_multimodal`), so the
GGUF's token table serves as the tied output head only.

Export streams one tensor at a time from the safetensors shards into a GGUF of the stored types (BF16 for
the real checkpoint: no float conversion, no second copy in memory), then `llama_model_quantize` writes the
asked format with llama.cpp's own rules (a Q4_0 model keeps its output matrix at Q6_K, as `llama-quantize`
does), and the source file is removed. Names follow llama.cpp's `convert_hf_to_gguf.py` for Qwen3 (no q/k permutation:
Qwen3's RoPE is the NEOX style).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from lite.errors import CheckpointError, OutputError
from lite.model.shards import TensorEntry, index_checkpoint
from lite.runtime.engine_choice import DEFAULT_FORMAT, FORMATS, check_format

SOURCE_TYPES = ("BF16", "F16", "F32")  # stored types the export reads (its bits kept)
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(name: str) -> str | None:
    """The GGUF name of a checkpoint tensor of the LLM (None: not exported)."""
    if not name.startswith("llm."):
        return None
    rest = name[len("llm."):]
    if rest == "model.embed_tokens.weight":
        return "token_embd.weight"
    if rest == "model.norm.weight":
        return "output_norm.weight"
    if rest == "lm_head.weight":
        return "output.weight"
    parts = rest.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) >= 5:
        inner, kind = ".".join(parts[3:-1]), parts[-1]
        if inner in _LAYER_NAMES:
            return f"blk.{parts[2]}.{_LAYER_NAMES[inner]}.{kind}"
    return None


def _llm_tensors(entries: dict[str, TensorEntry], tied: bool) -> list[tuple[str, TensorEntry]]:
    """(GGUF name, checkpoint entry) of every exported tensor, in a stable order; every one full precision."""
    out = []
    for name, entry in sorted(entries.items()):
        target = gguf_name(name)
        if target is None or (tied and target == "output.weight"):
            continue  # a tied head is the token table (llama.cpp ties when `output.weight` is absent)
        if entry.dtype not in SOURCE_TYPES or not name.endswith(".weight"):
            raise CheckpointError(f"{name} is stored as {entry.dtype}; the llama.cpp engine exports full-precision "
                                  "weights only (a plain Hugging Face checkpoint)")
        out.append((target, entry))
    if not any(t == "token_embd.weight" for t, _ in out):
        raise CheckpointError("the checkpoint has no llm.model.embed_tokens.weight; is it an Ovis-U1 checkpoint?")
    return out


def checkpoint_digest(directory: Path, entries: dict[str, TensorEntry]) -> str:
    """A digest of what the export reads: the LLM config and each shard's name, size and mtime."""
    h = hashlib.sha256((directory / "config.json").read_bytes())
    for shard in sorted({entry.file for entry in entries.values()}):
        st = shard.stat()
        h.update(f"{shard.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """Where converted files are kept: `$OVIS_LITE_CACHE`, else `$XDG_CACHE_HOME/ovis-lite`, else ~/.cache."""
    root = os.environ.get("OVIS_LITE_CACHE")
    if root:
        return Path(root) / "gguf"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ovis-lite" / "gguf"


def gguf_path(directory: Path, entries: dict[str, TensorEntry], fmt: str) -> Path:
    return cache_dir() / f"{directory.name}-{checkpoint_digest(directory, entries)}-llm-{fmt}.gguf"


def _as_array(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's GGUF bytes, its stored bits kept: 1-D norms as F32 (llama.cpp's rule), 2-D weights as stored."""
    if tensor.ndim == 1:
        return tensor.to(torch.float32).numpy()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
    return tensor.contiguous().numpy()


def _tensor_info(shape: tuple[int, ...], dtype: str, gguf: Any) -> tuple[np.dtype, int, Any]:
    """(numpy dtype, bytes, raw GGML type or None) of what `_as_array` writes, from the header only."""
    count = int(np.prod(shape))
    if len(shape) == 1 or dtype == "F32":
        return np.dtype(np.float32), 4 * count, None
    if dtype == "BF16":
        return np.dtype(np.uint16), 2 * count, gguf.GGMLQuantizationType.BF16
    return np.dtype(np.float16), 2 * count, None


def _vocabulary(directory: Path, vocab: int, gguf: Any) -> tuple[list[str], list[Any], list[str]]:
    """Tokens, types and merges from the checkpoint's BPE files (llama.cpp needs a vocabulary to load; the
    engine never tokenizes with it)."""
    ids: dict[str, int] = {}
    for name in ("vocab.json", "added_tokens.json"):
        path = directory / name
        if path.is_file():
            ids.update(json.loads(path.read_text(encoding="utf-8")))
    tokens = [f"[PAD{i}]" for i in range(vocab)]
    types = [gguf.TokenType.UNUSED] * vocab
    for text, i in ids.items():
        if 0 <= i < vocab:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    merges_file = directory / "merges.txt"
    merges = [line for line in merges_file.read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#")] if merges_file.is_file() else []
    return tokens, types, merges


def llm_hparams(config: Any) -> dict[str, Any]:
    """The Qwen3 hyper-parameters of an `OvisU1Config`, with transformers' defaults filled in (`head_dim`...)."""
    d = config.qwen3_config().to_dict()
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"the llama.cpp engine exports plain RoPE only; this LLM has {rope.get('rope_type')!r}")
    d["rope_theta"] = float(d.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    return d


def qwen3_writer(path: Path, llm: dict[str, Any], tokenizer_dir: Path, gguf: Any) -> Any:
    """A GGUFWriter at `path` holding a Qwen3 model's metadata (`llm`: `llm_hparams`) and the BPE vocabulary of
    `tokenizer_dir`; the caller adds the tensors (the engine's export, and the peer benchmark's random GGUF)."""
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_context_length(int(llm.get("max_position_embeddings", 40960)))
    w.add_embedding_length(int(llm["hidden_size"]))
    w.add_block_count(int(llm["num_hidden_layers"]))
    w.add_feed_forward_length(int(llm["intermediate_size"]))
    w.add_head_count(int(llm["num_attention_heads"]))
    w.add_head_count_kv(int(llm["num_key_value_heads"]))
    w.add_key_length(int(llm["head_dim"]))
    w.add_value_length(int(llm["head_dim"]))
    w.add_rope_freq_base(float(llm["rope_theta"]))
    w.add_layer_norm_rms_eps(float(llm["rms_norm_eps"]))
    tokens, types, merges = _vocabulary(tokenizer_dir, int(llm["vocab_size"]), gguf)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    w.add_eos_token_id(int(llm.get("eos_token_id") or 0))
    return w


def write_source_gguf(directory: Path, entries: dict[str, TensorEntry], llm: dict[str, Any], path: Path) -> None:
    """The LLM of the checkpoint in `directory` as a GGUF at `path` in the types it is stored in (the
    quantizer's source), one tensor in memory at a time."""
    import gguf  # optional (the llama.cpp engine's extra): only when a GGUF is written

    exported = _llm_tensors(entries, bool(llm.get("tie_word_embeddings", True)))
    w = qwen3_writer(path, llm, directory, gguf)
    for target, entry in exported:  # headers first: shapes and types from the index, no tensor read
        dtype, nbytes, raw = _tensor_info(entry.shape, entry.dtype, gguf)
        w.add_tensor_info(target, entry.shape, dtype, nbytes, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, entry in exported:  # then the data, one tensor in memory at a time
        with safe_open(entry.file, framework="pt") as fh:
            w.write_tensor_data(_as_array(fh.get_tensor(entry.name)))
    w.close()


def export_llm(directory: Path, config: Any, fmt: str = DEFAULT_FORMAT, notify: Any = None) -> Path:
    """The GGUF of the checkpoint's LLM (`config`: its `OvisU1Config`) in `fmt`, from the cache or written now
    (atomically: a file that exists is complete)."""
    fmt = check_format(fmt)
    llm = llm_hparams(config)
    entries = index_checkpoint(directory)  # headers only, every shard contained in the folder and readable
    out = gguf_path(directory, entries, fmt)
    if out.is_file():
        return out
    if notify is not None:
        notify(f"converting the LLM to a llama.cpp {fmt} GGUF once ({out}) ...")
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    source = out.with_name(f".{out.name}.{os.getpid()}.source")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_source_gguf(directory, entries, llm, source)
        quantize(source, partial, fmt)
        os.replace(partial, out)
    except OSError as exc:  # an unwritable or full cache folder: one line, nothing half-written left
        raise OutputError(f"cannot write the llama.cpp GGUF under {out.parent} ({exc.strerror or exc}); set "
                          "$OVIS_LITE_CACHE to a writable folder with ~2x the LLM's size free") from None
    finally:
        for tmp in (source, partial):
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # the folder itself was never made
                pass
    return out


_LOG_LOCK = threading.Lock()
_QUIET: Any = None  # the C callback that drops llama.cpp's log lines (kept alive for the process)


def quiet_logs(llama_cpp: Any) -> None:
    """llama.cpp's own log lines off (our notices and load report say what matters), its backend ready."""
    global _QUIET
    with _LOG_LOCK:
        if _QUIET is None:
            _QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)
            llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p())
            llama_cpp.llama_backend_init()


def quantize(source: Path, target: Path, fmt: str, threads: int | None = None) -> None:
    """llama.cpp's own quantizer (`llama_model_quantize`), `source` GGUF -> `target` in `fmt`."""
    import llama_cpp  # optional, and it loads a native library: only when a GGUF is quantized

    quiet_logs(llama_cpp)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FORMATS[fmt]
    params.nthread = threads or (os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if rc != 0:
        raise CheckpointError(f"llama.cpp could not quantize the LLM to {fmt} (code {rc}); try another format, "
                              "e.g. --llm-engine llama.cpp:q8_0")
