"""oneDNN-packed bf16 Linears on CPU (lite/runtime/cpu/prepack.py) and where the pipeline uses them.

ISA-dependent by design: packing happens only where oneDNN's bf16 GEMM is native (AMX, AVX512-BF16). On a
CPU without it (an AVX2-only x86, or this one under ONEDNN_MAX_CPU_ISA=AVX2) the assertions are that
nothing is packed; where it is native they are that the packed layers give F.linear's bits, keep the
bytes, and come back plain. Both comparisons are on the same machine, so they stay bitwise.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from offload.accounting import module_nbytes
from lite.runtime.cpu import prepack
from lite.runtime.cpu.prepack import prepack_ops_available, unpack_linears, use_packed_linears
from quant.backends.int4_prefill import dense_gemm_is_native

NATIVE = prepack_ops_available() and dense_gemm_is_native(torch.bfloat16)
needs_native = pytest.mark.skipif(not NATIVE, reason="oneDNN's bf16 GEMM is not native on this CPU")


def _model(seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(96, 160), nn.GELU(), nn.Linear(160, 64, bias=False), nn.Linear(64, 200))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.to(torch.bfloat16).eval()


@needs_native
@pytest.mark.parametrize("shape", [(2, 96), (37, 96), (256, 96), (3, 17, 96)])
def test_packed_layers_give_f_linear_bits_and_keep_their_bytes(shape: tuple[int, ...]) -> None:
    plain, packed = _model(), _model()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    nbytes = module_nbytes(plain)
    state = use_packed_linears(packed)
    assert len(state.layers) == 3 and all(m.weight.is_mkldnn for m in state.layers)
    assert module_nbytes(packed) == nbytes
    with torch.no_grad():
        expected = plain[3](F.linear(plain[1](F.linear(x, plain[0].weight, plain[0].bias)), plain[2].weight))
        assert torch.equal(packed(x), expected)
    state.remove()
    assert not any(p.is_mkldnn for p in packed.parameters())
    for a, b in zip(plain.parameters(), packed.parameters()):
        assert torch.equal(a, b)  # the plain weights come back bit for bit
    assert all("forward" not in m.__dict__ for m in packed)


@needs_native
def test_skip_fp32_and_already_overridden_layers_stay_plain() -> None:
    model = _model()
    model[3].float()
    model[2].forward = lambda x: x  # someone else's override (the one-row GEMV, say) is left alone
    state = use_packed_linears(model, skip=lambda name: name == "0")
    assert state.layers == []
    assert unpack_linears(model) == 0


@needs_native
def test_unpack_linears_restores_whoever_packed() -> None:
    model, reference = _model(), _model()
    use_packed_linears(model)
    assert unpack_linears(model) == 3
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_nothing_is_packed_where_bf16_gemm_is_not_native(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    assert use_packed_linears(model, native=False).layers == []
    assert not any(p.is_mkldnn for p in model.parameters())


def test_packed_layer_refuses_a_dtype_mismatch() -> None:
    if not NATIVE:
        pytest.skip("oneDNN's bf16 GEMM is not native on this CPU")
    model = _model()
    use_packed_linears(model)
    with pytest.raises(RuntimeError, match="bfloat16 input"):
        model[0](torch.zeros(2, 96))


def test_cpu_pipeline_packs_yak_and_vit_token_layers_only_where_native(tiny_dir) -> None:
    from lite import OvisPipeline

    pipe = OvisPipeline.from_pretrained(tiny_dir, device="cpu", progress=False)
    model = pipe.model
    packed = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.is_mkldnn}
    if pipe.dtype != torch.bfloat16 or not NATIVE:
        assert packed == set()  # fp32 compute (no native bf16): the weights stay as stored
        return
    yak, vit = "visual_generator.backbone.", "visual_tokenizer.backbone."
    assert packed and all(n.startswith((yak, vit)) for n in packed)
    assert f"{yak}double_blocks.0.img_attn.qkv" in packed and f"{vit}trunk.blocks.0.attn.qkv" in packed
    # one-row layers (modulation, embedders) and the LLM stay plain
    assert not any("mod" in n.rsplit(".", 2)[-2] or "time_in" in n or "adaLN" in n for n in packed)
    image = pipe.generate("a red square", width=64, height=64, steps=2, seed=3).image
    pipe.enable_offload(1 << 40)  # paging needs plain tensors: it takes packing off the layers it pages
    assert image.tobytes() == pipe.generate("a red square", width=64, height=64, steps=2, seed=3).image.tobytes()
    assert not any(p.is_mkldnn for p in model.parameters())
    pipe.disable_offload()  # and puts it back, by name, when it goes
    assert {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.is_mkldnn} == packed


def test_file_backed_ranges_reads_file_mappings_only() -> None:
    maps = ("55d0c0000000-55d0c0021000 r--p 00000000 fd:01 1234  /usr/bin/python3.11\n"
            "7f0000000000-7f0000100000 rw-p 00000000 00:00 0 \n"
            "7f1000000000-7f1040000000 r--s 00000000 fd:01 99  /tmp/ckpt/model-00001.safetensors\n"
            "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0  [stack]\n")
    ranges = prepack.file_backed_ranges(maps)
    assert ranges == [(0x55D0C0000000, 0x55D0C0021000), (0x7F1000000000, 0x7F1040000000)]
    assert prepack._in_ranges(0x7F1000000010, ranges) and not prepack._in_ranges(0x7F0000000010, ranges)
    assert not prepack._in_ranges(0x7F1040000000, ranges)  # the end is exclusive


@needs_native
def test_weights_viewing_a_mapped_checkpoint_stay_unpacked(tmp_path) -> None:
    """Packing a view of an mmapped shard would add a copy while the mapping keeps the original resident."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = _model()
    save_file({"w": model[0].weight.detach().contiguous()}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        mapped = f.get_tensor("w")
    if not prepack._in_ranges(mapped.data_ptr(), prepack.file_backed_ranges()):
        pytest.skip("this safetensors build copies instead of mapping")
    model[0].weight = nn.Parameter(mapped, requires_grad=False)
    state = use_packed_linears(model)
    assert model[0] not in state.layers and not model[0].weight.is_mkldnn
    assert model[2] in state.layers and model[3] in state.layers
