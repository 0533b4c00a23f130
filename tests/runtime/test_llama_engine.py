"""The optional llama.cpp engine for understanding's LLM, checked against our torch LLM in fp32 on a tiny
checkpoint whose LLM weights are widened (seeded) so that logits vary; the choice's parsing and its checks
before loading run without the package."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lite.errors import DeviceError, InputError
from lite.model.processing import Turn
from lite.runtime import engine_choice
from lite.runtime.engine_choice import EngineChoice, check_engine, check_engine_source, parse_engine
from lite.runtime.llama_gguf import gguf_name

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "ovis_u1_3b" / "tensors.json"
needs_llama = pytest.mark.skipif(not engine_choice.llama_cpp_installed(),
                                 reason="llama-cpp-python is not installed (pip install 'ovis-lite[llamacpp]')")


# -- the choice, before anything loads --------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (None, EngineChoice()), ("torch", EngineChoice()), ("llama.cpp", EngineChoice("llama.cpp", "q4_0")),
    ("llama.cpp:Q8_0", EngineChoice("llama.cpp", "q8_0")), ("llamacpp:f32", EngineChoice("llama.cpp", "f32")),
])
def test_parse_engine(text, expected):
    assert parse_engine(text) == expected


@pytest.mark.parametrize("text", ["vllm", "llama.cpp:q3_k", "torch:q4_0", "llama.cpp:"])
def test_parse_engine_refuses_in_one_line(text):
    with pytest.raises(InputError) as info:
        parse_engine(text)
    assert "\n" not in str(info.value)


def test_llama_cpp_runs_on_the_cpu_only():
    with pytest.raises(DeviceError, match="CPU only"):
        check_engine(EngineChoice("llama.cpp", "q4_0"), torch.device("cuda"))
    check_engine(EngineChoice(), torch.device("cuda"))  # torch runs anywhere


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setattr(engine_choice, "llama_cpp_installed", lambda: False)
    with pytest.raises(InputError, match=r"pip install 'ovis-lite\[llamacpp\]'"):
        check_engine(EngineChoice("llama.cpp", "q4_0"), torch.device("cpu"))


def test_a_prequantized_checkpoint_is_refused_before_loading():
    with pytest.raises(InputError, match="needs a plain checkpoint"):
        check_engine_source(EngineChoice("llama.cpp", "q4_0"), "ovis-balanced", prequantized=True)
    check_engine_source(EngineChoice(), "ovis-balanced", prequantized=True)


def test_export_refuses_weights_that_are_not_full_precision(tiny_dir, tmp_path, monkeypatch):
    """A checkpoint whose LLM holds an int8 tensor (not ours to read) stops with one line naming it."""
    pytest.importorskip("gguf")
    from lite.errors import CheckpointError
    from lite.model.config import load_config
    from lite.runtime.llama_gguf import export_llm

    monkeypatch.setenv("OVIS_LITE_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(n for n in sorted(tensors) if n.startswith("llm.model.layers.") and n.endswith("q_proj.weight"))
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + " is stored as I8"):
        export_llm(ckpt, load_config(ckpt), "q8_0")
    assert not list((tmp_path / "cache").rglob("*.gguf*"))  # nothing half-written is left


def test_an_unwritable_cache_is_one_line(tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from lite.errors import OutputError
    from lite.model.config import load_config
    from lite.runtime.llama_gguf import export_llm

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("OVIS_LITE_CACHE", str(blocker))  # the cache folder would have to be inside a file
    with pytest.raises(OutputError, match=r"\$OVIS_LITE_CACHE") as info:
        export_llm(tiny_dir, load_config(tiny_dir), "q8_0")
    assert "\n" not in str(info.value) and blocker.read_text() == "not a folder"


def test_every_llm_tensor_of_the_real_checkpoint_has_one_gguf_name():
    if not SHARED.is_file():
        pytest.skip(f"{SHARED} not found")
    names = json.loads(SHARED.read_text())
    llm = [n for n in names if n.startswith("llm.")]
    mapped = {n: gguf_name(n) for n in llm}
    assert all(mapped.values()), [n for n, g in mapped.items() if g is None]
    assert len(set(mapped.values())) == len(llm)
    layers = 1 + max(int(n.split(".")[3]) for n in llm if ".layers." in n)
    assert len(llm) == 3 + 11 * layers  # token table, final norm, head; 11 tensors per layer (spec §3.5)
    assert gguf_name("visual_tokenizer.vit.x.weight") is None


# -- the engine against our LLM ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with its LLM's matrices drawn N(0, 0.2) (seeded), written back to disk."""
    out = tmp_path_factory.mktemp("wide") / "ckpt"
    shutil.copytree(tiny_dir, out)
    gen = torch.Generator().manual_seed(0)
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        for name in sorted(tensors):
            if name.startswith("llm.") and tensors[name].dim() >= 2:
                tensors[name] = torch.empty(tensors[name].shape).normal_(0, 0.2, generator=gen).to(tensors[name].dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="module")
def pipes(wide_dir, cache_home):
    from lite.runtime.pipeline import OvisPipeline

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OVIS_LITE_CACHE", str(cache_home))
        ours = OvisPipeline.from_pretrained(wide_dir, device="cpu", dtype=torch.float32, progress=False)
        peer = OvisPipeline.from_pretrained(wide_dir, device="cpu", dtype=torch.float32, progress=False,
                                            llm_engine="llama.cpp:f32")
    return ours, peer


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (84, 56, 3), dtype=np.uint8))


def _torch_logits(pipe, embeds: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pipe.model.llm(inputs_embeds=embeds).logits[0].float()


@needs_llama
def test_llama_logits_match_our_llm(pipes):
    """Every position's logits from llama.cpp (f32 weights, its f16 KV) against our fp32 LLM."""
    ours, peer = pipes
    gen = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 40, ours.model.llm.config.hidden_size, generator=gen)
    want = _torch_logits(ours, embeds)
    engine = peer.llm_engine
    engine.forget()
    for n in (1, 17, 40):  # prefixes of the same sequence: each prefill keeps what the previous one fed
        got, reused = engine.prefill(embeds[:, :n], tuple(range(n)), n - 1, 8)
        assert reused == (0 if n == 1 else {17: 1, 40: 17}[n])
        scale = want[n - 1].abs().max()
        assert torch.allclose(got[0], want[n - 1], atol=2e-3 * scale, rtol=0), (n, (got[0] - want[n - 1]).abs().max())
        assert int(got.argmax()) == int(want[n - 1].argmax())


@needs_llama
def test_threads_asked_before_a_context_reach_it(wide_dir, cache_home, monkeypatch):
    """The first call's threads are set before its context exists (llama.cpp's default would be 4 on any
    machine), and a context made larger later keeps them."""
    from lite.model.config import load_config
    from lite.runtime.llama_engine import LlamaCppLLM

    monkeypatch.setenv("OVIS_LITE_CACHE", str(cache_home))
    engine = LlamaCppLLM.open(wide_dir, load_config(wide_dir), "f32")
    engine.set_threads(1, 2)
    embeds = torch.zeros(1, 3, engine.n_embd)
    engine.prefill(embeds, (1, 2, 3), 0, 8)
    lib = engine._lib
    assert (lib.llama_n_threads(engine._ctx), lib.llama_n_threads_batch(engine._ctx)) == (1, 2)
    engine.prefill(embeds, (1, 2, 3), 0, engine.n_ctx + 1)  # more room than the context has: a new one
    assert engine.n_ctx > 2048 and lib.llama_n_threads(engine._ctx) == 1
    engine.close()


@needs_llama
def test_greedy_answers_follow_our_llm(pipes):
    """A greedy answer from llama.cpp, re-scored by our LLM (teacher forcing over the same prompt): every
    token it chose is our argmax or within the f16-KV tolerance of it."""
    from lite.runtime.decode import Sampling
    from lite.runtime.results import RunStats
    from lite.runtime.understanding import answer_tokens, build_prompt

    ours, peer = pipes
    img, text = _image(3), _prompt_text(ours, "What is in the picture?", 1)
    stats = RunStats(task="understand")
    tokens = list(answer_tokens(peer, text, [img], Sampling(), 12, stats, time.perf_counter()))
    assert stats.cache["llm_engine"] == "llama.cpp:f32" and len(tokens) == stats.tokens > 0
    prompt = build_prompt(ours, text, [img], {})
    embed = ours.model.llm.get_input_embeddings()
    with torch.no_grad():
        seq = torch.cat([prompt.embeds.float(), embed(torch.tensor([tokens])).float()], dim=1)
    logits = _torch_logits(ours, seq)[prompt.embeds.shape[1] - 1:]
    assert len(set(tokens)) > 1  # the widened weights make the answer vary
    for step, token in enumerate(tokens):
        row = logits[step]
        assert row[token] >= row.max() - 2e-3 * row.abs().max(), (step, token, int(row.argmax()))


def _prompt_text(pipe, question: str, images: int, history=None) -> str:
    from lite.model.processing import understanding_prompt

    return understanding_prompt(question, images, history)


@needs_llama
def test_follow_up_reuses_the_prefix_and_matches_a_fresh_engine(pipes, wide_dir, cache_home, monkeypatch):
    ours, peer = pipes
    img = _image(5)
    peer.llm_engine.forget()
    first = str(peer.understand([img], "Describe it.", max_new_tokens=6))
    first_prompt = peer.last_run.cache["prefill_tokens"]
    history = [Turn("Describe it.", first, num_images=1)]
    second = str(peer.understand([img], "And the colours?", max_new_tokens=6, history=history))
    cache = peer.last_run.cache
    assert cache["prefix_tokens_reused"] >= first_prompt - 1  # the whole first prompt, image included
    from lite.runtime.pipeline import OvisPipeline

    monkeypatch.setenv("OVIS_LITE_CACHE", str(cache_home))
    fresh = OvisPipeline.from_pretrained(wide_dir, device="cpu", dtype=torch.float32, progress=False,
                                         llm_engine="llama.cpp:f32", cache=False)
    assert str(fresh.understand([img], "And the colours?", max_new_tokens=6, history=history)) == second
    assert fresh.last_run.cache["prefix_tokens_reused"] == 0
    assert fresh.llm_engine.path == peer.llm_engine.path  # the GGUF is converted once per checkpoint and format


@needs_llama
def test_q4_0_export_is_smaller_and_close(pipes, wide_dir, cache_home, monkeypatch):
    from lite.runtime.llama_engine import LlamaCppLLM
    from lite.model.config import load_config

    monkeypatch.setenv("OVIS_LITE_CACHE", str(cache_home))
    ours, peer = pipes
    q4 = LlamaCppLLM.open(wide_dir, load_config(wide_dir), "q4_0")
    assert q4.path.stat().st_size < 0.6 * peer.llm_engine.path.stat().st_size
    gen = torch.Generator().manual_seed(2)
    embeds = torch.randn(1, 9, ours.model.llm.config.hidden_size, generator=gen)
    want = _torch_logits(ours, embeds)[-1]
    got = q4.prefill(embeds, tuple(range(9)), 0, 4)[0][0]
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.95
    q4.close()


@needs_llama
def test_server_chat_runs_on_the_engine_and_reuses_the_prefix(pipes):
    """`/v1/chat/completions` on a pipeline with the llama.cpp engine: a conversation resent with one more turn
    prefills only what is new, and `/health` names the engine."""
    testclient = pytest.importorskip("starlette.testclient")
    from lite.server.app import ServerSettings, create_app

    _, peer = pipes
    peer.llm_engine.forget()
    messages = [{"role": "user", "content": "Say something."}]
    with testclient.TestClient(create_app(peer, ServerSettings()), base_url="http://127.0.0.1") as client:
        assert client.get("/health").json()["llm_engine"] == "llama.cpp:f32"
        first = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5})
        assert first.status_code == 200, first.text
        reply = first.json()["choices"][0]["message"]["content"]
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
        second = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5})
        assert second.status_code == 200, second.text
    assert peer.last_run.cache["prefix_tokens_reused"] > 0


# -- the CLI ---------------------------------------------------------------------------------------------

def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "lite", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("engine, says", [("vllm", "unknown LLM engine"),
                                          ("llama.cpp:q3_k", "unknown llama.cpp format")])
def test_cli_refuses_a_bad_engine_in_one_line(tiny_dir, engine, says):
    done = _cli("ask", "--model", str(tiny_dir), "--llm-engine", engine, "Hi?")
    assert done.returncode == 2 and says in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2 and "Traceback" not in done.stderr  # usage + the error


@needs_llama
def test_cli_ask_on_the_engine(wide_dir, cache_home):
    done = _cli("ask", "--model", str(wide_dir), "--llm-engine", "llama.cpp:q8_0", "--max-new-tokens", "4",
                "--json", "Hi?", env={"OVIS_LITE_CACHE": str(cache_home)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cache"]["llm_engine"] == "llama.cpp:q8_0" and result["tokens"] >= 1
    assert "runs on llama.cpp (q8_0" in done.stderr  # the load report names the engine and its file
