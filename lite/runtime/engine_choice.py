"""Which code runs the LLM of understanding: ours (`torch`, the default that always works) or llama.cpp
(`llama.cpp[:FORMAT]`, optional: `lite.runtime.llama_engine`). Light on purpose: the CLI checks the choice
while it parses, before torch is imported."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from lite.errors import DeviceError, InputError

#: The GGUF formats `llama.cpp:FORMAT` takes, as llama.cpp's `llama_ftype` values (llama.h).
FORMATS: dict[str, int] = {"q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "q8_0": 7, "bf16": 32, "f32": 0}
DEFAULT_FORMAT = "q4_0"  # what the peer benchmark runs (`scripts/bench_llm_peer.py`): 4.5 bits per weight
MISSING = ("the llama.cpp engine needs llama-cpp-python and gguf: pip install 'ovis-lite[llamacpp]' "
           "(it compiles llama.cpp, a few minutes), or use --llm-engine torch")


@dataclass(frozen=True)
class EngineChoice:
    """`torch`, or `llama.cpp` with the GGUF format of its weights."""

    name: str = "torch"
    gguf_format: str | None = None

    def label(self) -> str:
        return self.name if self.gguf_format is None else f"{self.name}:{self.gguf_format}"


def check_format(fmt: str) -> str:
    """`fmt` lower-cased, or a one-line error naming the choices."""
    key = fmt.strip().lower()
    if key not in FORMATS:
        raise InputError(f"unknown llama.cpp format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return key


def parse_engine(text: str | None) -> EngineChoice:
    """`torch`, `llama.cpp` or `llama.cpp:FORMAT` -> a choice (a one-line error otherwise)."""
    value = (text or "torch").strip()
    name, colon, fmt = value.partition(":")
    if name.lower() == "torch" and not colon:
        return EngineChoice()
    if name.lower() not in ("llama.cpp", "llamacpp", "llama-cpp"):
        raise InputError(f"unknown LLM engine {text!r}; choose torch, llama.cpp or llama.cpp:FORMAT "
                         f"(FORMAT one of {', '.join(FORMATS)})")
    return EngineChoice("llama.cpp", check_format(fmt) if colon else DEFAULT_FORMAT)


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("gguf") is not None


def check_engine(choice: EngineChoice, device: Any) -> None:
    """What can be checked before loading: llama.cpp runs the LLM on the CPU, and its packages are installed."""
    if choice.name == "torch":
        return
    if device.type != "cpu":
        raise DeviceError(f"--llm-engine llama.cpp runs on the CPU only (this run is on {device.type}); "
                          "drop --llm-engine or pass --device cpu")
    if not llama_cpp_installed():
        raise InputError(MISSING)


def check_engine_source(choice: EngineChoice, directory: Any, prequantized: bool) -> None:
    """llama.cpp exports the LLM from full-precision weights: a checkpoint written by `ovis-lite quantize` holds
    ours (int4/int8 payloads), which it cannot read."""
    if choice.name == "llama.cpp" and prequantized:
        raise InputError(f"--llm-engine llama.cpp needs a plain checkpoint (bf16/fp32 weights), and {directory} was "
                         "written by `ovis-lite quantize`; pass the original checkpoint, or drop --llm-engine")
