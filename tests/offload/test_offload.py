"""CPU tests for the offload package: planner arithmetic, ledger bounds, simulate-mode equivalence.

The toy pipeline mirrors the real one: an encoder used in "conditions", a two-stack MMDiT-like
denoiser (quanto-quantized) run several times per "denoise" phase (CFG x steps), and a decoder
used in "decode". Simulate mode drops offloaded weights to loud placeholders, so any output that
matches the resident run bit for bit really was computed from paged-in weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from offload import (
    BudgetError,
    OffloadedTensorError,
    UnitInfo,
    UnitSpec,
    attach_offload,
    build_units,
    min_budget_bytes,
    module_nbytes,
    plan,
    units_for,
)

torch.set_num_threads(1)  # tiny ops: thread start-up and contention dominate otherwise

ACT = {"conditions": 3_000, "denoise": 5_000, "decode": 8_000}
STEPS, CFG = 3, 2


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Encoder(nn.Module):
    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.final = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.final(x)


class Denoiser(nn.Module):
    """Double and single stacks around shared in/out projections, like the Yak MMDiT."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.x_in = nn.Linear(d, d)
        self.double_blocks = nn.ModuleList(Block(d) for _ in range(3))
        self.single_blocks = nn.ModuleList(Block(d) for _ in range(4))
        self.proj_out = nn.Linear(d, d)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, d))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.x_in(x) + cond
        for b in self.double_blocks:
            h = b(h)
        for b in self.single_blocks:
            h = b(h)
        return self.proj_out(h) * self.gain


def make_pipeline(quant: str = "qint8") -> dict[str, nn.Module]:
    torch.manual_seed(0)
    comps: dict[str, nn.Module] = {
        "enc": Encoder(32, 3),
        "dit": Denoiser(32),
        "dec": nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)),
    }
    if quant:
        from optimum.quanto import freeze, qint4, qint8, quantize

        quantize(comps["dit"], weights=qint8 if quant == "qint8" else qint4)
        freeze(comps["dit"])
    for m in comps.values():
        m.eval()
    return comps


def run_pipeline(comps: dict[str, nn.Module], off=None, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 32, generator=g)
    outs = []
    with torch.no_grad():
        if off is not None:
            off.enter_phase("conditions")
        cond = comps["enc"](x)
        outs.append(cond)
        if off is not None:
            off.enter_phase("denoise")
        lat = torch.randn(2, 32, generator=g)
        for _ in range(STEPS):
            pos = comps["dit"](lat, cond)
            neg = comps["dit"](lat, torch.zeros_like(cond))
            lat = lat - 0.1 * (neg + 2.0 * (pos - neg))
            outs.append(lat)
        if off is not None:
            off.enter_phase("decode")
        outs.append(comps["dec"](lat))
    return outs


def pipeline_units(comps: dict[str, nn.Module], granularity) -> list:
    if granularity == "component":
        specs = [UnitSpec("enc", None, 1, ("conditions",), 1), UnitSpec("dit", None, 1, ("denoise",), STEPS * CFG)]
    else:
        g = 1 if granularity == "block" else granularity
        specs = [
            UnitSpec("enc", "layers", g, ("conditions",), 1),
            UnitSpec("enc", None, 1, ("conditions",), 1),
            UnitSpec("dit", "double_blocks", g, ("denoise",), STEPS * CFG),
            UnitSpec("dit", "single_blocks", g, ("denoise",), STEPS * CFG),
            UnitSpec("dit", None, 1, ("denoise",), STEPS * CFG),
        ]
    specs.append(UnitSpec("dec", None, 1, ("decode",), 1))
    return build_units(comps, specs)


def snapshot_tensors(comps: dict[str, nn.Module]) -> dict[str, tuple[int, torch.device]]:
    return {f"{c}.{n}": (id(t), t.device) for c, m in comps.items()
            for n, t in list(m.named_parameters()) + list(m.named_buffers())}


def budgets(units, act) -> list[int]:
    lo = min_budget_bytes(units, act)
    hi = sum(u.nbytes for u in units) + max(act.values())
    return sorted({lo, lo + (hi - lo) // 4, lo + (hi - lo) // 2, lo + 3 * (hi - lo) // 4, hi})


@pytest.fixture(scope="module")
def pipeline():
    comps = make_pipeline("qint8")
    return comps, run_pipeline(comps)


GRANULARITIES = ["block", 2, "component"]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_equivalence_and_ledger_over_budget_sweep(pipeline, granularity, depth):
    comps, ref = pipeline
    units = pipeline_units(comps, granularity)
    before = snapshot_tensors(comps)
    seen_paged = False
    for budget in budgets(units, ACT):
        p = plan(budget, units, ACT, max_prefetch_depth=depth)
        seen_paged |= bool(p.paged_units)
        assert p.planned_peak_bytes <= budget
        off = attach_offload(units, p, "cpu", simulate=True)
        try:
            for rep in range(2):  # a second generation reuses the learned order and wraps prefetch
                out = run_pipeline(comps, off)
                assert all(torch.equal(a, b) for a, b in zip(out, ref)), f"output differs at budget {budget}"
            for phase, peak in off.ledger.phase_peaks.items():
                if phase == "<none>":
                    continue
                assert peak + ACT[phase] <= p.phase_peaks[phase], (phase, peak, p.to_json())
                assert peak <= budget - ACT[phase]
            assert off.ledger.peak_bytes <= p.planned_peak_bytes - min(ACT.values())
        finally:
            off.remove()
        assert snapshot_tensors(comps) == before
    assert seen_paged or granularity == "component"  # one unit per phase: paging saves nothing


def test_minimal_plan_pages_everything_and_full_budget_keeps_everything(pipeline):
    comps, _ = pipeline
    units = pipeline_units(comps, "block")
    lo = plan(min_budget_bytes(units, ACT), units, ACT, max_prefetch_depth=2)
    assert lo.planned_peak_bytes == lo.min_budget_bytes
    hi = plan(sum(u.nbytes for u in units) + max(ACT.values()), units, ACT, max_prefetch_depth=2)
    assert hi.paged_units == [] and hi.prefetch_depth == 0
    assert hi.resident_weight_bytes == sum(u.nbytes for u in units)


def test_refuses_impossible_budget_and_names_minimum(pipeline):
    comps, _ = pipeline
    units = pipeline_units(comps, "block")
    # Independent computation: per phase, the largest rest + largest block + activation.
    enc, dit, dec = comps["enc"], comps["dit"], comps["dec"]
    enc_rest = module_nbytes(enc) - sum(module_nbytes(b) for b in enc.layers)
    dit_blocks = list(dit.double_blocks) + list(dit.single_blocks)
    dit_rest = module_nbytes(dit) - sum(module_nbytes(b) for b in dit_blocks)
    expected = max(
        enc_rest + max(module_nbytes(b) for b in enc.layers) + ACT["conditions"],
        dit_rest + max(module_nbytes(b) for b in dit_blocks) + ACT["denoise"],
        module_nbytes(dec) + ACT["decode"],
    )
    assert min_budget_bytes(units, ACT) == expected
    with pytest.raises(BudgetError) as info:
        plan(expected - 1, units, ACT)
    assert info.value.min_budget_bytes == expected
    assert str(expected) in str(info.value) and "\n" not in str(info.value)
    plan(expected, units, ACT)  # the named minimum really works


def test_planner_prefetch_costs_and_batch_choice():
    units = [UnitInfo(f"b{i}", 100, frozenset({"denoise"}), uses=10) for i in range(4)]
    units.append(UnitInfo("vae", 300, frozenset({"decode"})))
    act = {"denoise": 50, "decode": 10}
    assert min_budget_bytes(units, act) == 310
    # 330: keeping a block resident would need 100 + 2 x 100 paged + 50 = 350, so only vae stays.
    p = plan(330, units, act, max_prefetch_depth=3)
    assert p.prefetch_depth == 1 and p.resident_units == ["vae"] and p.phase_peaks["denoise"] == 250
    p = plan(360, units, act, max_prefetch_depth=3)  # most-used first: b0 resident, depth 2 would need 450
    assert p.prefetch_depth == 1 and p.resident_units == ["b0", "vae"] and p.phase_peaks["denoise"] == 350
    # Batched CFG doubles the activation: taken when it pages no more, refused when it would.
    roomy = plan(500, units, act, batch_activation_bytes={"denoise": 100})
    assert roomy.batch_cfg and roomy.paged_units == []
    tight = plan(450, units, act, batch_activation_bytes={"denoise": 100})
    assert not tight.batch_cfg and tight.paged_units == []
    forced = plan(450, units, act, batch_activation_bytes={"denoise": 100}, batch_cfg=True)
    assert forced.batch_cfg and forced.planned_peak_bytes <= 450
    with pytest.raises(BudgetError):
        plan(320, units, act, batch_activation_bytes={"denoise": 300}, batch_cfg=True)
    assert json.loads(p.to_json())["prefetch_depth"] == 1


def test_missing_onload_fails_loudly(pipeline):
    comps, _ = pipeline
    units = pipeline_units(comps, "block")
    p = plan(min_budget_bytes(units, ACT), units, ACT)
    off = attach_offload(units, p, "cpu", simulate=True)
    try:
        with pytest.raises(OffloadedTensorError):
            comps["enc"].layers[1].up(torch.randn(2, 32))  # bypasses the block's hook
    finally:
        off.remove()


def test_remove_restores_module_and_hooks(pipeline):
    comps, ref = pipeline
    units = pipeline_units(comps, 2)
    before = snapshot_tensors(comps)
    off = attach_offload(units, plan(min_budget_bytes(units, ACT), units, ACT), "cpu", simulate=True)
    run_pipeline(comps, off)
    off.remove()
    assert snapshot_tensors(comps) == before
    for m in comps.values():
        for sub in m.modules():
            assert not sub._forward_pre_hooks and not sub._forward_hooks
    assert all(torch.equal(a, b) for a, b in zip(run_pipeline(comps), ref))


def test_enter_phase_frees_other_components_and_prefetch_wraps(pipeline):
    comps, ref = pipeline
    specs = [UnitSpec("dit", "double_blocks", 1, ("denoise",), STEPS * CFG),
             UnitSpec("dit", "single_blocks", 1, ("denoise",), STEPS * CFG),
             UnitSpec("dit", None, 1, ("denoise",), STEPS * CFG),
             UnitSpec("dec", None, 1, ("decode",), 1)]
    units = build_units(comps, specs)  # enc stays unmanaged (always on the device)
    blocks = [u for u in units if u.component == "dit" and not u.outer]
    rest = next(u for u in units if u.outer)
    block = max(u.nbytes for u in blocks)
    zero = {k: 0 for k in ACT}
    p = plan(max(rest.nbytes + 2 * block, min_budget_bytes(units, zero)), units, zero, max_prefetch_depth=2)
    assert p.prefetch_depth == 1 and {u.name for u in blocks} <= set(p.paged_units) and rest.name in p.resident_units
    off = attach_offload(units, p, "cpu", simulate=True)
    at_first: list[list[str]] = []
    at_last: list[list[str]] = []
    hooks = [comps["dit"].double_blocks[0].register_forward_hook(lambda *a: at_first.append(off.on_device())),
             comps["dit"].single_blocks[-1].register_forward_hook(lambda *a: at_last.append(off.on_device()))]
    try:
        out = run_pipeline(comps, off)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
        assert off.on_device() == ["dec"]
        off.enter_phase("denoise")
        assert off.on_device() == [rest.name]
        assert off.execution_order("denoise") == [rest.name] + [u.name for u in blocks]
        # Once the order is learned, block 0 has been released after its forward and the next
        # block is already on the device (prefetched while block 0 computed).
        assert blocks[1].name not in at_first[0]
        assert all(blocks[1].name in seen and blocks[0].name not in seen for seen in at_first[1:])
        # From the second pass on, the last block prefetches the first one (wrap-around).
        assert blocks[0].name not in at_last[0]
        assert all(blocks[0].name in seen for seen in at_last[1:])
        assert off.ledger.phase_peaks["denoise"] <= p.phase_weight_peaks["denoise"]
    finally:
        for h in hooks:
            h.remove()
        off.remove()


def test_account_mode_moves_nothing_but_counts(pipeline):
    comps, ref = pipeline
    units = pipeline_units(comps, "block")
    before = snapshot_tensors(comps)
    p = plan(min_budget_bytes(units, ACT), units, ACT)
    off = attach_offload(units, p, "cpu")
    try:
        assert snapshot_tensors(comps) == before
        out = run_pipeline(comps, off)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
        assert off.ledger.peak_bytes > 0 and off.ledger.peak_bytes <= p.planned_peak_bytes - min(ACT.values())
    finally:
        off.remove()


def test_quanto_qint4_bf16_stack_equivalent():
    torch.manual_seed(3)
    from optimum.quanto import freeze, qint4, quantize

    model = Encoder(128, 4).to(torch.bfloat16).eval()
    quantize(model, weights=qint4)
    freeze(model)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    units = units_for(model, "llm", "block", phases=("conditions",))
    assert sum(u.nbytes for u in units) == module_nbytes(model)
    act = {"conditions": 0}
    for budget in budgets(units, act):
        off = attach_offload(units, plan(budget, units, act, max_prefetch_depth=1), "cpu", simulate=True)
        try:
            off.enter_phase("conditions")
            with torch.no_grad():
                for _ in range(2):
                    assert torch.equal(model(x), ref)
        finally:
            off.remove()


def test_bnb_4bit_quant_state_counted_and_paged():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(4)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
                                        for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for b in self.blocks:
                x = b(x)
            return x

    model = Net().to("cpu").eval()  # `.to` quantizes the weights
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = model(x)
    units = units_for(model, "bnb", "block")
    assert [u.name for u in units] == ["bnb.blocks.0", "bnb.blocks.1", "bnb.blocks.2"]
    params_only = sum(p.numel() * p.element_size() for p in model.parameters())
    total = module_nbytes(model)
    assert sum(u.nbytes for u in units) == total > params_only  # quant_state counted
    p = plan(min_budget_bytes(units, {"default": 0}), units, {"default": 0})
    assert p.paged_units and len(p.resident_units) == 0
    off = attach_offload(units, p, "cpu", simulate=True)
    try:
        with torch.no_grad():
            with pytest.raises(Exception):
                type(model.blocks[0]).forward(model.blocks[0], x)  # offloaded (the class's forward, no hooks): no weight, no quant_state
            assert torch.equal(model(x), ref)
        assert off.ledger.onloaded_bytes == total
        assert off.ledger.peak_bytes == max(u.nbytes for u in units)
    finally:
        off.remove()
    with torch.no_grad():
        assert torch.equal(model(x), ref)
