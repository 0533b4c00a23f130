"""The LLM of understanding run by llama.cpp (optional: `--llm-engine llama.cpp`), fed our own embeddings.

Why: on a CPU, decode is a chain of matrix-vector products over ~1 GB of 4-bit weights per token, and
llama.cpp's fused quantized dot products (int8 activations, VNNI/AVX-512/AVX2 kernels picked at run time,
its own thread pool) read them about twice as fast as torch 2.13's int4 kernel on the same cores
(`scripts/bench_llm_peer.py`, docs/BENCHMARKS.md). Everything else stays ours: the prompt's embeddings,
visual tokens included, come from our ViT, visual head and `merge_multimodal` (as llama.cpp's own
multimodal tool feeds its projector's output), and every token the answer feeds back is embedded by our
embedding table, so the GGUF's token table only serves as the tied output head. The choice of tokens
(`lite.runtime.decode.Sampling`), the stop, the streaming and the stats are the torch path's.

The prefix cache is llama.cpp's KV of one sequence: the positions it holds are remembered by identity
(token id, or image digest and index: `lite.runtime.kv_cache.PositionKey`), a call keeps the longest
common prefix (`llama_memory_seq_rm` drops the rest) and prefills only what follows.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lite.errors import CheckpointError, InputError
from lite.runtime.engine_choice import MISSING
from lite.runtime.kv_cache import common_prefix
from lite.runtime.llama_gguf import export_llm, quiet_logs

CHUNK = 512  # positions per llama_decode call in a prefill (llama.cpp's default micro-batch)


@dataclass
class LlamaCppLLM:
    """One llama.cpp model and context over one sequence, with the identity of the positions its KV holds."""

    path: Path
    gguf_format: str
    n_embd: int
    n_vocab: int
    _lib: Any = field(repr=False)
    _model: Any = field(repr=False)
    _ctx: Any = field(default=None, repr=False)
    kv_bytes_per_position: int = 0  # f16 K and V of every layer (llama.cpp's default cache type)
    n_ctx: int = 0
    held: list = field(default_factory=list)  # the identity of each position in the KV, in order
    threads: tuple[int, int] = (0, 0)  # (decode, prefill) threads the context was last given

    @classmethod
    def open(cls, directory: Path, config: Any, gguf_format: str, notify: Any = None) -> LlamaCppLLM:
        """Export the LLM once (cached by checkpoint digest and format), then load it (memory-mapped)."""
        try:
            import llama_cpp  # optional, and it loads a native library: only when the engine is chosen
        except ImportError as exc:
            raise InputError(MISSING) from exc
        quiet_logs(llama_cpp)
        path = export_llm(directory, config, gguf_format, notify)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise CheckpointError(f"llama.cpp could not load {path}; delete it to convert the LLM again")
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        llm = config.qwen3_config()
        per_position = 2 * llm.num_hidden_layers * llm.num_key_value_heads * llm.head_dim * 2
        return cls(path, gguf_format, llama_cpp.llama_model_n_embd(model), n_vocab, llama_cpp, model,
                   kv_bytes_per_position=per_position)

    # -- context and KV ---------------------------------------------------------------------------

    def _ensure_context(self, positions: int) -> None:
        """A context with room for `positions` (a larger one is made anew, its KV empty)."""
        if self._ctx is not None and positions <= self.n_ctx:
            return
        lib = self._lib
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
            self.held.clear()
        params = lib.llama_context_default_params()
        params.n_ctx = max(2048, -(-positions // 1024) * 1024)
        params.n_batch = params.n_ubatch = CHUNK
        params.n_seq_max = 1
        params.no_perf = True
        if self.threads != (0, 0):  # the threads last asked for (llama.cpp's default is 4, whatever the cores)
            params.n_threads, params.n_threads_batch = self.threads
        ctx = lib.llama_init_from_model(self._model, params)
        if not ctx:
            raise CheckpointError(f"llama.cpp could not make a context of {params.n_ctx} positions")
        self._ctx, self.n_ctx = ctx, params.n_ctx

    def kv_bytes(self) -> int:
        """Host bytes of the context's KV, allocated whole when the context is made."""
        return self.n_ctx * self.kv_bytes_per_position if self._ctx is not None else 0

    def forget(self) -> None:
        """Empty the KV (the cache switched off or cleared)."""
        if self._ctx is not None:
            self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)
        self.held.clear()

    def set_threads(self, decode: int, prefill: int) -> None:
        """llama.cpp's threads for one-position calls (`decode`) and for batches (`prefill`), kept for a
        context made later."""
        if (decode, prefill) != self.threads:
            self.threads = (decode, prefill)
            if self._ctx is not None:
                self._lib.llama_set_n_threads(self._ctx, decode, prefill)

    # -- running ----------------------------------------------------------------------------------

    def prefill(self, embeds: torch.Tensor, positions: tuple, reuse_limit: int, room: int) -> tuple[torch.Tensor, int]:
        """Feed `embeds` [1, L, H] whose positions are `positions`, keeping the longest prefix of the KV that
        matches (at most `reuse_limit`): (the float32 logits [1, V] of the last position, positions reused)."""
        self._ensure_context(len(positions) + room)
        reuse = min(common_prefix(self.held, positions), reuse_limit)
        self._lib.llama_memory_seq_rm(self._lib.llama_get_memory(self._ctx), 0, reuse, -1)
        del self.held[reuse:]
        rows = embeds[0, reuse:].to(torch.float32).contiguous().numpy()
        logits = None
        for start in range(0, rows.shape[0], CHUNK):
            part = rows[start:start + CHUNK]
            last = start + part.shape[0] == rows.shape[0]
            logits = self._decode(part, reuse + start, want_logits=last)
            self.held.extend(positions[reuse + start:reuse + start + part.shape[0]])
        assert logits is not None
        return logits, reuse

    def step(self, embedding: torch.Tensor, identity: Any) -> torch.Tensor:
        """Feed one position (its embedding [H]) after those held: the float32 logits [1, V] that follow."""
        if len(self.held) + 1 > self.n_ctx:
            raise InputError(f"the conversation reached llama.cpp's context of {self.n_ctx} positions")
        row = embedding.reshape(1, -1).to(torch.float32).contiguous().numpy()
        logits = self._decode(row, len(self.held), want_logits=True)
        self.held.append(identity)
        return logits

    def _decode(self, rows: np.ndarray, first_pos: int, want_logits: bool) -> torch.Tensor | None:
        lib, n = self._lib, rows.shape[0]
        batch = lib.llama_batch_init(n, self.n_embd, 1)
        try:
            ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
            for i in range(n):
                batch.pos[i] = first_pos + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if (want_logits and i == n - 1) else 0
            batch.n_tokens = n
            rc = lib.llama_decode(self._ctx, batch)
        finally:
            lib.llama_batch_free(batch)
        if rc != 0:
            self.held.clear()  # what the KV holds is no longer known
            lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
            raise CheckpointError(f"llama.cpp could not run {n} position(s) at {first_pos} (code {rc})")
        if not want_logits:
            return None
        ptr = lib.llama_get_logits_ith(self._ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()).reshape(1, -1)

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            self._lib.llama_model_free(self._model)
            self._model = None
        self.held.clear()

    def __del__(self) -> None:  # the C objects go with the Python one
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the library may be gone already
            pass
