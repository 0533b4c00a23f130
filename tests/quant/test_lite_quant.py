"""Per-component quantization of Ovis-U1 (lite.model.quantization) on tiny checkpoints.

Two checkpoints: `make_tiny` (every int4 layer is too narrow for quanto's TinyGemm kernel, so the
policy turns it into int8 on CPU), and a "small" one whose LLM and Yak widths are multiples of
128, so the 4-bit paths (quanto int4 TinyGemm, bf16, group 128) really run. Generic quanto int4
(which JIT-compiles a C++ extension) is never triggered.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
from torch import nn

from lite.model.config import parse_config
from lite.errors import CheckpointError, OutputError
from lite.model.latents import image_ids
from lite.model.checkpoint import MANIFEST_FILE, CheckpointKind, checkpoint_kind, load_model
from lite.model.load_quantized import load_quantized_model
from lite.model.modeling_ovis_u1 import OvisU1
from lite.model.precision import POLICY_NAMES, policy_for
from lite.model.prequantized import QuantizedCheckpointError
from lite.model.prequantized_save import save_quantized_checkpoint
from lite.model.quantize import component_nbytes, quantize_model
from lite.model.sizes import make_sizeof, quantized_bytes
from quant import Int8VisualEmbedding
from lite.model.tiny import randomize_, tiny_config_dict, write_checkpoint, write_tokenizer
from quant import Int8Embedding, Int8Linear, layer_kind

def _small_config() -> dict:
    cfg = tiny_config_dict()
    cfg["hidden_size"] = 256
    cfg["llm_config"].update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=64)
    cfg["visual_generator_config"].update(hidden_size=256, num_heads=2, axes_dim=[16, 56, 56], context_in_dim=512,
                                          vec_in_dim=256)
    return cfg


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small") / "ckpt"
    out.mkdir()
    special = write_tokenizer(out)
    cfg = _small_config()
    cfg["llm_config"].update(bos_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"])
    torch.manual_seed(1)
    model = OvisU1(parse_config(cfg))
    randomize_(model, 1)
    write_checkpoint(out, model, cfg, torch.bfloat16)
    (out / "preprocessor_config.json").write_text(resources.files("lite").joinpath("data/preprocessor_config.json")
                                                  .read_text())
    return out


@pytest.fixture(scope="module")
def reference(small_dir):
    model, _ = load_model(small_dir, dtype=policy_for("reference").dtype_for, progress=False)
    return model


@pytest.fixture(scope="module")
def quantized(small_dir):
    """Streaming-loaded small models, one per policy name, built once per module."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_quantized_model(small_dir, name, progress=False)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def saved(small_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prequant") / "tiny"
    return out, save_quantized_checkpoint(small_dir, "tiny", out)


@torch.no_grad()
def _condition(model: OvisU1) -> torch.Tensor:
    ids = torch.arange(3, 40) % model.config.vocab_size
    embeds = model.llm.get_input_embeddings()(ids)[None]
    return model.condition(embeds).float()


@torch.no_grad()
def _velocity(model: OvisU1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yak = model.visual_generator.backbone
    cfg = yak.config
    txt = torch.randn(1, 12, cfg.context_in_dim, generator=g).to(torch.bfloat16)
    img = torch.randn(1, 16, 16, generator=g).to(torch.bfloat16)
    ids = image_ids(4, 4)[None] if image_ids(4, 4).dim() == 2 else image_ids(4, 4)
    t = torch.full((1,), 0.7, dtype=torch.bfloat16)
    return yak(img, ids, yak.refine(txt), t).float()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def _relerr(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).norm() / ref.norm()).item()


def _state_equal(a: nn.Module, b: nn.Module) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def test_policy_names_and_overrides():
    assert set(POLICY_NAMES) == {"reference", "quality", "balanced", "low", "tiny", "minimal", "mps", "cpu"}
    assert policy_for("balanced", "cuda").spec("llm").format == "nf4"
    assert policy_for("balanced", "cpu").resolved("llm").backend == "quanto"
    # issue 11: MPS runs torch's packed kernels (Metal implementations), not quanto (whose MPS op never dispatches)
    assert policy_for("mps", "mps").resolved("llm").backend == "native"
    assert policy_for("cpu", "cpu").resolved("llm").backend == "native"
    for name in POLICY_NAMES:
        assert "bnb" not in str(policy_for(name, "cpu").formats())
    p = policy_for("balanced").override(llm="int8", vae="fp16")
    assert p.spec("llm").format == "int8" and p.spec("llm").include == ("model.layers.*",)
    assert p.vae_dtype == torch.float16 and p.name == "balanced+custom"
    assert policy_for("balanced").override({"yak": {"exclude": ()}}).spec("yak").exclude == ()
    with pytest.raises(ValueError, match="never quantized"):
        policy_for("balanced").override(vae="int8")
    with pytest.raises(ValueError, match="unknown quantization policy"):
        policy_for("fast")


def test_quantized_forward_within_tolerance(quantized, reference):
    ref_c, ref_v = _condition(reference), _velocity(reference)
    for name, min_cos, max_err in (("balanced", 0.97, 0.15), ("tiny", 0.97, 0.25)):
        model, report = quantized(name)
        kinds = report.quant.formats()
        assert "int4/quanto" in kinds and "int8/quanto" in kinds, kinds
        c, v = _condition(model), _velocity(model)
        assert _cos(c, ref_c) > min_cos, (name, _cos(c, ref_c))
        assert 1e-4 < _relerr(v, ref_v) < max_err, (name, _relerr(v, ref_v))
        assert isinstance(model.llm.model.embed_tokens, Int8Embedding)
        assert model.llm.lm_head.qweight is model.llm.model.embed_tokens.qweight


def test_int8_vte_keeps_the_forward_contract(reference):
    vte = reference.vte
    q = Int8VisualEmbedding.from_weight(vte.weight, compute_dtype=torch.bfloat16)
    q.block_rows = 100  # several row blocks
    probs = torch.softmax(torch.randn(7, vte.num_embeddings - 4), -1).to(torch.bfloat16)
    ref = vte(probs).float()
    assert _relerr(q(probs).float(), ref) < 0.02
    ids = torch.tensor([0, 5, vte.num_embeddings - 1])
    assert _relerr(q(ids).float(), vte(ids).float()) < 0.02
    seen = []
    q.register_forward_hook(lambda *a: seen.append(1))
    q(ids)
    assert seen and q.weight.device == vte.weight.device


def test_quantized_bytes_match_real_bytes(tiny_dir, quantized):
    for path, names in ((tiny_dir, ("low", "cpu")), (None, ("balanced", "tiny", "reference"))):
        for name in names:
            policy = policy_for(name, "cpu")
            model, report = load_quantized_model(path, policy, progress=False) if path else quantized(name)
            predicted = quantized_bytes(model.config, policy)
            real = component_nbytes(model)
            for comp, got in real.items():
                want = predicted["components"][comp]["bytes"]
                assert abs(want - got) <= 0.01 * got, (name, comp, want, got)
            assert abs(predicted["total_bytes"] - sum(real.values())) <= 0.01 * sum(real.values())
            meta = _meta(model.config)
            sizeof = make_sizeof(meta, policy)  # the planner's per-block bytes, on meta
            real_block = make_sizeof(model, policy)(model.visual_generator.backbone.double_blocks[0])
            assert abs(sizeof(meta.visual_generator.backbone.double_blocks[0]) - real_block) <= 0.01 * real_block
            assert sizeof(meta) == predicted["total_bytes"]
            assert sizeof(meta.llm) == predicted["components"]["llm"]["bytes"]


def _meta(config) -> OvisU1:
    with torch.device("meta"):
        return OvisU1(config)


def test_exclusion_rules_hold(quantized):
    model, _ = quantized("tiny")
    yak = model.visual_generator.backbone
    for mod in (yak.double_blocks[0].img_mod.lin, yak.single_blocks[0].modulation.lin, yak.img_in,
                yak.final_layer.linear, yak.final_layer.adaLN_modulation[1], yak.time_in.in_layer,
                yak.txt_in.input_embedder, yak.txt_in.c_embedder.linear_1):
        assert type(mod) is nn.Linear and mod.weight.dtype == torch.bfloat16
    assert layer_kind(yak.double_blocks[0].img_attn.qkv).format == "int4"
    assert model.visual_generator.vae.decoder.conv_out.weight.dtype == torch.bfloat16
    low, _ = quantized("low")
    assert layer_kind(low.visual_generator.backbone.double_blocks[0].img_mod.lin).format == "int8"
    assert type(low.visual_generator.backbone.img_in) is nn.Linear


def test_streaming_load_equals_quantize_after_load(small_dir, quantized):
    policy = policy_for("tiny", "cpu")
    loaded, _ = load_model(small_dir, dtype=policy.dtype_for, progress=False)
    quantize_model(loaded, policy)
    streamed, report = quantized("tiny")
    assert _state_equal(loaded, streamed) == []
    assert torch.equal(_velocity(loaded), _velocity(streamed))
    assert report.quant.layers and not report.prequantized


def test_prequantized_round_trip_is_identical(small_dir, saved, quantized):
    out, manifest = saved
    assert checkpoint_kind(out) is CheckpointKind.PREQUANTIZED and checkpoint_kind(small_dir) is CheckpointKind.PLAIN
    for f in ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json", "preprocessor_config.json"):
        assert (out / f).is_file(), f
    assert manifest["policy"] == "tiny" and manifest["source"]["hash"].startswith("sha256:")
    entry = manifest["modules"]["llm.model.layers.0.mlp.up_proj"]
    assert entry["format"] == "int4" and entry["group_size"] == 128 and entry["backend"] == "quanto"
    fresh, _ = quantized("tiny")
    restored, report = load_quantized_model(out, progress=False)
    assert report.prequantized and report.policy == "tiny"
    assert torch.equal(_velocity(fresh), _velocity(restored))
    assert torch.equal(_condition(fresh), _condition(restored))
    # never reads a full-precision weight of a quantized layer
    assert not any(n.endswith(".weight") and n.rpartition(".")[0] in manifest["modules"] for n in report.names_read)
    assert report.bytes_read < 0.6 * quantized_bytes(fresh.config, "reference")["total_bytes"]
    with pytest.raises(OutputError, match="refusing to overwrite"):
        save_quantized_checkpoint(small_dir, "tiny", out)


_RSS_SCRIPT = """
import json, sys, threading, time
import torch
torch.set_num_threads(1)
from lite.model.config import load_config
from lite.memory import rss_anon_bytes, trim_host_heap
from lite.model.load_quantized import load_quantized_model
from lite.model.sizes import quantized_bytes
out, src = sys.argv[1], sys.argv[2]
warm, _ = load_quantized_model(out, progress=False)  # first-use costs: lazy imports, kernel set-up
del warm
trim_host_heap()
base = rss_anon_bytes()
peak, stop = [base], threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss_anon_bytes())
        time.sleep(0.002)
th = threading.Thread(target=sample)
th.start()
model, report = load_quantized_model(out, progress=False)
stop.set()
th.join()
print(json.dumps({"delta": peak[0] - base, "bf16": quantized_bytes(load_config(src), "reference")["total_bytes"],
                  "quant": sum(report.component_bytes.values()), "bytes_read": report.bytes_read}))
"""


def test_prequantized_load_peak_host_ram_is_below_bf16(small_dir, saved):
    """RssAnon sampled every 2 ms while loading the pre-quantized checkpoint, in a fresh process
    after one warm-up load (imports and kernel set-up are fixed costs that would swamp a 24 MB
    model), against the bf16 bytes of the same model."""
    out, _ = saved
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(out), str(small_dir)], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["delta"] < got["bf16"], got
    assert got["bytes_read"] < got["bf16"] and got["quant"] < 0.6 * got["bf16"], got


def test_corrupt_or_mismatched_manifest_is_one_clear_line(saved, tmp_path):
    out = tmp_path / "q"
    shutil.copytree(saved[0], out)
    manifest_path = out / MANIFEST_FILE
    good = manifest_path.read_text()
    manifest_path.write_text(good[: len(good) // 2])
    with pytest.raises(QuantizedCheckpointError, match="not valid JSON") as exc:
        load_quantized_model(out, progress=False)
    assert "\n" not in str(exc.value) and isinstance(exc.value, CheckpointError)
    data = json.loads(good)
    data["modules"]["llm.model.layers.0.mlp.up_proj"]["shape"] = [7, 256]
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(QuantizedCheckpointError, match="up_proj") as exc:
        load_quantized_model(out, progress=False)
    assert "\n" not in str(exc.value)
    data = json.loads(good)
    data["unquantized"]["llm.model.norm.weight"] = "float32"
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(QuantizedCheckpointError, match="norm.weight"):
        load_quantized_model(out, progress=False)
    manifest_path.write_text(good)
    (out / "config.json").write_text((out / "config.json").read_text().replace("256", "257", 1))
    with pytest.raises(QuantizedCheckpointError, match="config.json does not match"):
        load_quantized_model(out, progress=False)


def test_refuses_to_overwrite_a_non_empty_out_dir(tiny_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OutputError, match="refusing to overwrite"):
        save_quantized_checkpoint(tiny_dir, "balanced", out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_torch_int8_head_and_tied_embedding_in_quantize_model(tiny_dir):
    policy = policy_for("balanced", "cpu").override(llm="int8", visual_head={"backend": "torch"})
    model, _ = load_model(tiny_dir, dtype=policy.dtype_for, progress=False)
    report = quantize_model(model, policy)
    assert isinstance(model.llm.lm_head, Int8Linear) and model.llm.lm_head.tied_to == "llm.model.embed_tokens"
    assert isinstance(model.vte, Int8VisualEmbedding)
    assert report.bytes_after < report.bytes_before
