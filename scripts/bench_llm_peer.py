"""Our `cpu`-preset LLM against llama.cpp on the same CPU: prefill 512 tokens, decode 128 after ~600.

    python scripts/bench_llm_peer.py --json [--checkpoint /work/fullsize] [--rounds 3] [--threads 2]

llama.cpp is a benchmark tool here only (never a runtime dependency, never committed): its `llama-bench` and
`llama-quantize` are built from the `llama-cpp-python` source distribution (which vendors llama.cpp) into a
cache folder (`~/.cache/ovis-lite/llama.cpp`, `--cache`), once. A GGUF of the same Qwen3 shape as Ovis-U1's
LLM (read from the checkpoint's config: hidden 2048, 28 layers, vocab 151936, tied head) with random weights
is written with the `gguf` package (the copy vendored in that sdist unless `gguf` is installed), F16, then
quantized to Q4_0 by `llama-quantize` (which keeps the tied output matrix at Q6_K, as it does for every Q4_0).

Ours runs through the path users hit: `OvisPipeline.understand` (text only, caches off so every round computes
everything, as llama-bench does), the `cpu` preset, reading the `prefill` and `decode` phases it reports.
Both run interleaved, `--rounds` rounds, `--threads` threads. Ratios are ours over theirs, in tok/s (median).

With `--engines torch llama.cpp` (when llama-cpp-python is installed) the same `understand` calls also run
through our optional llama.cpp engine (`--llm-engine llama.cpp`: the checkpoint's own LLM exported to Q4_0,
fed our embeddings), in the same rounds; its ratios are reported as `llamacpp_engine_*`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cpuname, also when imported by a test
from cpuname import cpu_name  # noqa: E402

SDIST = "llama-cpp-python"
TOOLS = ("llama-bench", "llama-quantize")
#: Common English words: questions are made of them up to an exact token count (the prefill reports its count).
WORDS = ("the", "cat", "sat", "on", "a", "red", "mat", "and", "looked", "at", "blue", "sky", "while", "dog",
         "ran", "to", "green", "tree", "in", "park")


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, **kw)


def llama_source(cache: Path) -> Path:
    """The vendored llama.cpp of the llama-cpp-python sdist, downloaded and unpacked into `cache` once."""
    found = sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if found:
        return found[-1].parent
    cache.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", SDIST, "-d", str(cache)])
    archive = sorted(cache.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    return sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))[-1].parent


def build_tools(src: Path, jobs: int) -> dict[str, Path]:
    """llama-bench and llama-quantize, built once (Release, native ISA, static, no curl), niced."""
    bins = {t: src / "build" / "bin" / t for t in TOOLS}
    if all(p.exists() for p in bins.values()):
        return bins
    nice = ["nice", "-n", "10"]
    run(nice + ["cmake", "-S", str(src), "-B", str(src / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"])
    run(nice + ["cmake", "--build", str(src / "build"), "--target", *TOOLS, f"-j{jobs}"])
    return bins


def import_gguf(src: Path) -> Any:
    try:
        import gguf  # the installed package, if any
    except ImportError:
        sys.path.insert(0, str(src / "gguf-py"))  # the copy the sdist vendors
        import gguf
    return gguf


def write_gguf(path: Path, checkpoint: Path, gguf: Any, seed: int = 0) -> None:
    """A Qwen3 GGUF of the checkpoint LLM's shape, random F16 weights (std 0.02, norms 1), the checkpoint's BPE
    vocab (the engine's own metadata writer, `lite.runtime.llama_gguf.qwen3_writer`), written one tensor at a
    time (never the whole model in memory)."""
    from lite.model.config import load_config
    from lite.runtime.llama_gguf import llm_hparams, qwen3_writer

    llm = llm_hparams(load_config(checkpoint))
    h, layers, ffn = llm["hidden_size"], llm["num_hidden_layers"], llm["intermediate_size"]
    heads, kv, hd, vocab = llm["num_attention_heads"], llm["num_key_value_heads"], llm["head_dim"], llm["vocab_size"]
    w = qwen3_writer(path, llm, checkpoint, gguf)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (vocab, h)), ("output_norm.weight", (h,))]
    for i in range(layers):
        b = f"blk.{i}."
        shapes += [(b + "attn_norm.weight", (h,)), (b + "attn_q.weight", (heads * hd, h)),
                   (b + "attn_k.weight", (kv * hd, h)), (b + "attn_v.weight", (kv * hd, h)),
                   (b + "attn_output.weight", (h, heads * hd)), (b + "attn_q_norm.weight", (hd,)),
                   (b + "attn_k_norm.weight", (hd,)), (b + "ffn_norm.weight", (h,)),
                   (b + "ffn_gate.weight", (ffn, h)), (b + "ffn_up.weight", (ffn, h)), (b + "ffn_down.weight", (h, ffn))]
    for name, shape in shapes:
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape in shapes:
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            w.write_tensor_data((rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16))
    w.close()


def peer_model(cache: Path, bins: dict[str, Path], llm: dict[str, Any], tokenizer_dir: Path, src: Path) -> Path:
    """The Q4_0 GGUF in `cache`, made once (F16 written, quantized, F16 removed)."""
    q4 = cache / f"qwen3-h{llm['hidden_size']}-l{llm['num_hidden_layers']}-v{llm['vocab_size']}-random-q4_0.gguf"
    if q4.exists():
        return q4
    f16 = q4.with_name(q4.name.replace("q4_0", "f16"))
    write_gguf(f16, tokenizer_dir, import_gguf(src))
    run([str(bins["llama-quantize"]), str(f16), str(q4), "Q4_0", "2"], stdout=subprocess.DEVNULL)
    f16.unlink()
    return q4


def llama_bench(binary: Path, model: Path, threads: int, prompt: int, gen: int, depth: int) -> float:
    """tok/s of one llama-bench test (one repetition)."""
    out = subprocess.run([str(binary), "-m", str(model), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
                          "-d", str(depth), "-r", "1", "-o", "json"], check=True, capture_output=True, text=True)
    return float(json.loads(out.stdout)[0]["avg_ts"])


class Ours:
    """Our `cpu`-preset pipeline, caches off, asked text-only questions of exact token counts."""

    def __init__(self, checkpoint: str, threads: int, engine: str = "torch") -> None:
        import torch

        from lite import OvisPipeline

        torch.set_num_threads(threads)
        self.pipe = OvisPipeline.from_pretrained(checkpoint, device="cpu", preset="cpu", progress=False,
                                                 llm_engine=engine)
        self.pipe.caches.set_enabled(False)
        calibration = self.question(8, seed=0)
        self.overhead = self.ask(calibration, 1)["prefill_tokens"] - self.count(calibration)  # the chat template

    def count(self, text: str) -> int:
        return len(self.pipe.tokenizer(text, add_special_tokens=False)["input_ids"])

    def question(self, tokens: int, seed: int) -> str:
        """Random common words until the text is `tokens` tokens long (seeded: every round asks anew)."""
        rng = np.random.default_rng(seed)
        words: list[str] = []
        while self.count(" ".join(words)) < tokens:
            words.append(str(rng.choice(WORDS)))
        return " ".join(words)

    def ask(self, question: str, new_tokens: int) -> dict[str, Any]:
        self.pipe.understand(None, question, max_new_tokens=new_tokens)
        stats = self.pipe.last_run
        return {"prefill_tokens": stats.cache.get("prefill_tokens"), "tokens": stats.tokens,
                "prefill_s": stats.phases.get("prefill"), "decode_s": stats.phases.get("decode"),
                "decode_threads": stats.settings.get("decode_threads")}

    def prefill(self, tokens: int, seed: int) -> tuple[float, dict[str, Any]]:
        r = self.ask(self.question(tokens - self.overhead, seed), 1)
        return r["prefill_tokens"] / r["prefill_s"], r

    def decode(self, depth: int, tokens: int, seed: int) -> tuple[float, dict[str, Any]]:
        r = self.ask(self.question(depth - self.overhead, seed), tokens + 1)  # token 1: the prefill's logits
        return (r["tokens"] - 1) / r["decode_s"], r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=os.environ.get("OVIS_FULLSIZE", "/work/fullsize"))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ovis-lite" / "llama.cpp")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--depth", type=int, default=600)
    ap.add_argument("--engines", nargs="+", default=["torch"], choices=("torch", "llama.cpp"),
                    help="our engines to measure (llama.cpp: the optional engine, needs llama-cpp-python)")
    ap.add_argument("--build-only", action="store_true", help="build the tools and the GGUF, measure nothing")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    ckpt = Path(args.checkpoint)
    llm = json.loads((ckpt / "config.json").read_text())
    llm = llm.get("llm_config", llm)
    src = llama_source(args.cache)
    bins = build_tools(src, jobs=args.threads)
    model = peer_model(args.cache, bins, llm, ckpt, src)
    if args.build_only:
        print(json.dumps({"llama_bench": str(bins["llama-bench"]), "gguf": str(model)}))
        return 0
    engines = {name: Ours(str(ckpt), args.threads, name) for name in args.engines}
    prefix = {"torch": "ours", "llama.cpp": "ours_llamacpp_engine"}
    rows: list[dict[str, Any]] = []
    for r in range(args.rounds):  # interleaved: each round runs all, in the same order
        row: dict[str, Any] = {"round": r + 1}
        row["llamacpp_prefill_tok_s"] = llama_bench(bins["llama-bench"], model, args.threads, args.prompt, 0, 0)
        for name, ours in engines.items():
            row[f"{prefix[name]}_prefill_tok_s"], row[f"{prefix[name]}_prefill"] = ours.prefill(args.prompt,
                                                                                                 seed=100 + r)
        row["llamacpp_decode_tok_s"] = llama_bench(bins["llama-bench"], model, args.threads, 0, args.gen, args.depth)
        for name, ours in engines.items():
            row[f"{prefix[name]}_decode_tok_s"], row[f"{prefix[name]}_decode"] = ours.decode(args.depth, args.gen,
                                                                                             seed=200 + r)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    keys = ["llamacpp_prefill_tok_s", "llamacpp_decode_tok_s"] + [f"{prefix[n]}_{k}_tok_s" for n in engines
                                                                  for k in ("prefill", "decode")]
    med = {k: statistics.median(row[k] for row in rows) for k in keys}
    result = {"cpu": cpu_name(), "threads": args.threads, "rounds": rows, "median": med,
              "prefill_tokens": args.prompt, "decode_tokens": args.gen, "decode_depth": args.depth,
              "gguf": model.name, "llama_cpp": src.parent.name,
              "decode_threads": {n: e.pipe.last_run.settings.get("decode_threads") for n, e in engines.items()}}
    for name in engines:
        tag = "" if name == "torch" else "llamacpp_engine_"
        for phase in ("prefill", "decode"):
            ratio = med[f"{prefix[name]}_{phase}_tok_s"] / med[f"llamacpp_{phase}_tok_s"]
            result[f"{tag}{phase}_ratio_vs_llamacpp"] = ratio
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
