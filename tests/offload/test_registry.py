"""The hook registry (offload/registry.py) and every hook in it: named, ordered whatever the order of registration,
removable by name, and a model with all of them removed is bitwise its plain self (weights, dtypes, outputs)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn

from lite.runtime.cpu.compute import HOOK_NAME as FP32, use_fp32_compute
from lite.runtime.cpu.prepack import HOOK_NAME as PACKED, prepack_ops_available, use_packed_linears
from lite.runtime.cpu.row_gemv import HOOK_NAME as ROW, use_row_gemv
from offload import attach_offload, min_budget_bytes, plan, units_for
from offload.registry import (COMPUTE, KERNEL, ModuleHook, add_hook, get_hook, hook_names, remove_hook,
                              remove_hooks)
from quant.backends.int4_prefill import dense_gemm_is_native

NATIVE = prepack_ops_available() and dense_gemm_is_native(torch.bfloat16)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
                                    for _ in range(3))
        self.head = nn.Linear(32, 50, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return _Net().to(torch.bfloat16).eval()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_plain(model: nn.Module, state: dict[str, torch.Tensor], outputs: list[torch.Tensor],
                  inputs: list[torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert not now[k].is_mkldnn and now[k].dtype == v.dtype and torch.equal(now[k], v), k
    for m in model.modules():
        assert "forward" not in vars(m) and hook_names(m) == [] and not hasattr(m, "_lite_hook_registry")
        if hasattr(m, "compute_dtype"):
            assert m.compute_dtype is None
    with torch.no_grad():
        for x, y in zip(inputs, outputs):
            assert torch.equal(model(x), y)  # bitwise


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50, (1, 1), generator=g), torch.randint(0, 50, (2, 9), generator=g)]


@pytest.mark.parametrize("fp32", [False, True])
def test_every_hook_removed_leaves_the_model_bitwise_plain(fp32: bool) -> None:
    model, inputs = _net(), _inputs()
    state = _snapshot(model)
    with torch.no_grad():
        outputs = [model(x) for x in inputs]
    # installed in the "wrong" order on purpose: the registry orders them, not the caller
    rows = use_row_gemv(model, kernel="mv")
    other = use_fp32_compute(model) if fp32 else use_packed_linears(model, skip=lambda n: n == "head", native=NATIVE)
    linear = model.blocks[0][1]
    assert hook_names(linear) == ([FP32, ROW] if fp32 else [ROW, PACKED] if NATIVE else [ROW])
    units = units_for(model, "net", "block")
    off = attach_offload(units, plan(min_budget_bytes(units, {"default": 0}), units, {"default": 0}), "cpu",
                         simulate=True)
    assert hook_names(linear) == ([FP32, ROW] if fp32 else [ROW])  # paging took packing off what it pages
    assert hook_names(model.blocks[0]) == ["offload"]
    with torch.no_grad():
        for x, y in zip(inputs, outputs):
            got = model(x)
            assert got.shape == y.shape and torch.isfinite(got.float()).all()
            if fp32:
                assert got.dtype == torch.float32
    off.remove()
    if not fp32 and NATIVE:  # paging took packing off the layers it paged and put it back, by name
        assert get_hook(linear, PACKED) is not None and linear.weight.is_mkldnn
    other.remove()
    rows.remove()
    _assert_plain(model, state, outputs, inputs)


def test_paged_packed_layers_run_plain_tensors() -> None:
    if not NATIVE:
        pytest.skip("oneDNN's bf16 GEMM is not native on this CPU")
    model = _net()
    use_packed_linears(model)
    units = units_for(model, "net", "block")
    off = attach_offload(units, plan(min_budget_bytes(units, {"default": 0}), units, {"default": 0}), "cpu",
                         simulate=True)
    assert all(get_hook(m, PACKED) is None for m in model.modules())  # taken off while paging
    with torch.no_grad():
        model(_inputs()[1])
    off.remove()
    assert sum(get_hook(m, PACKED) is not None for m in model.modules()) == 7
    assert remove_hooks(model, PACKED) == 7 and not any(p.is_mkldnn for p in model.parameters())


class _Tag(ModuleHook):
    def __init__(self, tag: str, order: int, log: list[str]) -> None:
        self.tag, self.order, self.log = tag, order, log

    def attach(self, module: nn.Module) -> None:
        self.log.append(f"attach {self.tag}")

    def detach(self, module: nn.Module) -> None:
        self.log.append(f"detach {self.tag}")

    def forward(self, module: nn.Module, inner: Any, *args: Any, **kwargs: Any) -> Any:
        self.log.append(f"in {self.tag}")
        out = inner(*args, **kwargs)
        self.log.append(f"out {self.tag}")
        return out


def test_hooks_are_named_ordered_and_removable_by_name() -> None:
    for names in (["b", "a", "k"], ["k", "a", "b"]):  # any registration order gives one chain
        lin, log = nn.Linear(4, 4), []
        orders = {"a": COMPUTE, "b": COMPUTE, "k": KERNEL}
        for name in names:
            add_hook(lin, name, _Tag(name, orders[name], log))
        assert hook_names(lin) == ["a", "b", "k"]
        log.clear()
        lin(torch.zeros(1, 4))
        assert log == ["in a", "in b", "in k", "out k", "out b", "out a"]
        with pytest.raises(ValueError, match="already has a hook named 'a'"):
            add_hook(lin, "a", _Tag("a", COMPUTE, log))
        log.clear()
        assert remove_hook(lin, "b") is not None and remove_hook(lin, "b") is None
        assert log == ["detach b"] and hook_names(lin) == ["a", "k"]
        assert remove_hooks(lin) == 2 and "forward" not in vars(lin)


def test_someone_elses_forward_is_kept_under_the_chain_and_restored() -> None:
    lin = nn.Linear(4, 4)
    lin.forward = lambda x: x * 2  # type: ignore[method-assign]
    assert use_row_gemv(lin, kernel="mv").layers == []  # a foreign override is left alone by the kernels
    add_hook(lin, "t", _Tag("t", COMPUTE, []))
    assert torch.equal(lin(torch.ones(1, 4)), torch.full((1, 4), 2.0))
    remove_hook(lin, "t")
    assert torch.equal(lin(torch.ones(1, 4)), torch.full((1, 4), 2.0))


def test_the_cpu_plan_hooks_come_off_the_tiny_model_bitwise(tiny_dir) -> None:
    from lite.model.config import load_preprocessor_config
    from lite.model.tokenizer import load_tokenizer
    from lite.runtime.cpu.install import install_cpu_plan
    from lite.runtime.cpu.plan import Choice
    from lite.runtime.cpu.probes import this_machine_plan
    from lite.runtime.loading import load_weights
    from lite.runtime.pipeline import OvisPipeline
    from lite.runtime.resolve import resolve

    model, report, _ = load_weights(resolve(tiny_dir, device="cpu", dtype=None, progress=False))
    pipe = OvisPipeline(model, load_tokenizer(tiny_dir), load_preprocessor_config(tiny_dir, model.config.vision),
                        torch.device("cpu"), False, report)
    state = _snapshot(model)
    first = pipe.generate("a fox", width=32, height=32, steps=2, seed=5).image.tobytes()
    real = this_machine_plan()
    for cpu_plan in (real, replace(real, compute=Choice("fp32", "test"))):
        hooks = install_cpu_plan(model, cpu_plan)
        pipe.generate("a fox", width=32, height=32, steps=2, seed=5)
        hooks.remove()
        for k, v in model.state_dict().items():
            assert not v.is_mkldnn and v.dtype == state[k].dtype and torch.equal(v, state[k]), k
        assert not any("forward" in vars(m) or hook_names(m) for m in model.modules())
        assert pipe.generate("a fox", width=32, height=32, steps=2, seed=5).image.tobytes() == first
