"""Side by side: the same Yak MMDiT, on the same inputs, under four offloaders.

One full-size Yak (YakConfig defaults: 1.13B parameters, random weights, bf16, ~2.25 GB) is built
once and run, on one fixed set of inputs, under

- resident                  : plain forward, the reference output;
- ours (simulate / device)  : `offload` block units (one per double/single block + the rest), prefetch
                              depth 1, at a budget that pages every block (min budget + one block);
                              on CPU the simulate mode (placeholders, a real host->"device" copy per
                              onload) and the count-only mode (hooks + ledger, nothing moves);
                              on CUDA the real paging (pinned host copies, side stream);
- diffusers                 : `apply_group_offloading` block_level (num_blocks_per_group=1) and
                              leaf_level (and, on CUDA, each with use_stream=True);
- accelerate                : `cpu_offload(model, execution_device)`.

For each: max |out - resident| (expected 0), seconds per forward (median of `--repeats` after one
warm-up forward, which is also the output checked), and the accounting the method gives. Ours
reports its ledger (peak resident weight bytes, onloads, bytes onloaded) next to the plan's
peaks; for diffusers and accelerate the script wraps their own onload/offload calls with counters
(`ModuleGroup.onload_/offload_`, `AlignDevicesHook.pre_forward/post_forward`), giving onloads and
bytes per forward and the peak of weight bytes they hold onloaded at once. On CPU the onload
device *is* the offload device, so diffusers (`.to("cpu")`) and accelerate (re-wrapping the CPU
state dict) copy nothing: their counts are what a GPU run would move. On CUDA the script adds
`torch.cuda.max_memory_allocated` per method (reset before the timed forwards).

Between methods every hook is removed with the library's own call (`SequentialOffloader.remove`,
`HookRegistry.remove_hook(..., recurse=True)`, `accelerate.hooks.remove_hook_from_module`); the
script then checks that no hook, registry or forward override is left and that every parameter
is the original storage again. What does not come back by itself (accelerate's meta tensors are
restored by `detach_hook`; diffusers' stream mode leaves params pointing at its pinned copies) is
re-pointed at the saved originals, and the count is reported as `undo.repointed`. A final
resident forward (`resident_after`) must reproduce the first one bit for bit.

    python scripts/bench_offload_compare.py                  # CPU, 128x128 (64+32 tokens), table
    python scripts/bench_offload_compare.py --json
    python scripts/bench_offload_compare.py --device cuda    # 1024x1024 (4096+64 tokens)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchtools, also when imported by a test

from lite.model.config import YakConfig  # noqa: E402
from lite.model.latents import image_ids  # noqa: E402
from lite.model.modeling_yak import RefinedText, YakTransformer  # noqa: E402
from offload import UnitSpec, attach_offload, build_units, min_budget_bytes, plan  # noqa: E402
from benchtools import sync, time_calls  # noqa: E402

PHASE = "denoise"
GiB = 1024 ** 3


# --------------------------------------------------------------------------- model and inputs
def build_yak(cfg: YakConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> YakTransformer:
    """A Yak with seeded random weights, made without an fp32 detour (meta -> empty -> fill)."""
    with torch.device("meta"):
        model = YakTransformer(cfg)
    model = model.to(dtype).to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "scale":  # RMSNorm
                p.fill_(1.0)
            elif leaf == "bias":
                p.normal_(0.0, 0.02, generator=gen)
            elif p.dim() >= 2 and leaf == "weight":
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for _, b in model.named_buffers():
            b.zero_()
    model.requires_grad_(False)
    return model


@dataclass
class Inputs:
    img: torch.Tensor
    img_ids: torch.Tensor
    text: RefinedText
    t: torch.Tensor

    def to(self, device: torch.device) -> "Inputs":
        return Inputs(self.img.to(device), self.img_ids.to(device),
                      RefinedText(self.text.txt_fea.to(device), self.text.y.to(device)), self.t.to(device))


def make_inputs(cfg: YakConfig, image_size: int, text_tokens: int, dtype: torch.dtype, seed: int = 1) -> Inputs:
    """Inputs of one denoising step: latent side image_size/8, packed 2x2 -> (image_size/16)^2 tokens."""
    if image_size % 16:
        raise ValueError(f"image size must be a multiple of 16, got {image_size}")
    side = image_size // 16
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(1, side * side, cfg.in_channels, generator=gen).to(dtype)
    txt = torch.randn(1, text_tokens, cfg.hidden_size, generator=gen).to(dtype)
    y = torch.randn(1, cfg.vec_in_dim, generator=gen).to(dtype)
    return Inputs(img, image_ids(side, side), RefinedText(txt, y), torch.tensor([0.7]).to(dtype))


def yak_activation_bytes(cfg: YakConfig, tokens: int, dtype_bytes: int, device_type: str) -> int:
    """Rough activation peak of one Yak pass (the widest single block + attention), for the plan only."""
    d, mlp = cfg.hidden_size, cfg.mlp_hidden
    widest = tokens * (3 * d + mlp) + tokens * (d + mlp) + 4 * tokens * d
    scores = cfg.num_heads * tokens * (64 if device_type == "cuda" else 2 * tokens)
    return (widest + scores) * dtype_bytes


def yak_specs() -> list[UnitSpec]:
    return [UnitSpec("yak", "double_blocks", 1, (PHASE,)), UnitSpec("yak", "single_blocks", 1, (PHASE,))]


# --------------------------------------------------------------------------- snapshot / undo
def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, int, torch.dtype, torch.Size, bool]]:
    """References (no copies) to every parameter's and buffer's storage, with what must not change."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        out[name] = (t.data, t.data_ptr(), t.dtype, t.shape, isinstance(t, nn.Parameter))
    return out


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def undo_check(model: nn.Module, snap: dict[str, Any]) -> dict[str, Any]:
    """Make sure nothing of a method is left on `model`; re-point tensors that did not come back.

    Returns what had to be done: leftover empty diffusers registries and forward overrides deleted,
    tensors re-pointed at the saved originals. Raises if a hook is still live afterwards.
    """
    registries = forwards = 0
    for m in model.modules():
        reg = m.__dict__.get("_diffusers_hook")
        if reg is not None:
            if reg.hooks:
                raise RuntimeError(f"diffusers hooks still registered on {type(m).__name__}: {list(reg.hooks)}")
            del m._diffusers_hook
            registries += 1
        fwd = m.__dict__.get("forward")
        if fwd is not None:
            if getattr(fwd, "__func__", None) is type(m).forward and getattr(fwd, "__self__", None) is m:
                del m.__dict__["forward"]
                forwards += 1
            else:
                raise RuntimeError(f"{type(m).__name__}.forward is still overridden by {fwd!r}")
        if hasattr(m, "_hf_hook") or hasattr(m, "_old_forward"):
            raise RuntimeError(f"accelerate hook still on {type(m).__name__}")
        if m._forward_pre_hooks or m._forward_hooks:
            raise RuntimeError(f"torch forward hooks still on {type(m).__name__}")
    repointed = 0
    for name, (orig, ptr, dtype, shape, is_param) in snap.items():
        mod, leaf = _owner(model, name)
        table = mod._parameters if is_param else mod._buffers
        cur = table.get(leaf)
        if cur is None or cur.device.type == "meta" or cur.data_ptr() != ptr:
            if is_param:
                if isinstance(cur, nn.Parameter) and cur.device.type != "meta":
                    cur.data = orig
                else:
                    table[leaf] = nn.Parameter(orig, requires_grad=False)
            else:
                table[leaf] = orig
            repointed += 1
            cur = table[leaf]
        if cur.dtype != dtype or cur.shape != shape or cur.data_ptr() != ptr:
            raise RuntimeError(f"{name} did not come back: {cur.dtype} {tuple(cur.shape)} on {cur.device}")
    return {"empty_registries_deleted": registries, "forward_overrides_deleted": forwards, "repointed": repointed}


# --------------------------------------------------------------------------- counters
@dataclass
class Counter:
    """Onloads / bytes / peak of what a method holds onloaded, fed by wrapped library calls."""

    onloads: int = 0
    onloaded_bytes: int = 0
    live: dict[int, int] = field(default_factory=dict)
    peak_bytes: int = 0
    double_onloads: int = 0

    def on(self, key: int, nbytes: int) -> None:
        self.onloads += 1
        self.onloaded_bytes += nbytes
        if key in self.live:
            self.double_onloads += 1
        self.live[key] = nbytes
        self.peak_bytes = max(self.peak_bytes, sum(self.live.values()))

    def off(self, key: int) -> None:
        self.live.pop(key, None)

    def reset(self) -> None:
        self.onloads = self.onloaded_bytes = self.double_onloads = 0
        self.peak_bytes = sum(self.live.values())


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------- methods
class Method:
    """attach() -> forward works under the method; stats() -> its accounting; remove() -> undone."""

    name = "?"
    note = ""

    def attach(self, model: nn.Module, device: torch.device) -> None:
        raise NotImplementedError

    def begin_timed(self) -> None:
        """Called after the warm-up forward: reset per-forward counters."""

    def stats(self, forwards: int) -> dict[str, Any]:
        return {}

    def remove(self, model: nn.Module) -> None:
        raise NotImplementedError


class Resident(Method):
    name = "resident"
    note = "reference"

    def attach(self, model, device):
        if device.type != "cpu":
            model.to(device)

    def remove(self, model):
        model.to("cpu")  # undo_check re-points at the original CPU storage


class Ours(Method):
    def __init__(self, mode: str, activation: int) -> None:
        self.mode = mode  # "simulate", "account" or "device"
        self.activation = activation
        self.name = {"simulate": "ours_simulate", "account": "ours_account", "device": "ours"}[mode]
        self.note = {"simulate": "placeholders + a real copy per onload (CPU)",
                     "account": "hooks + ledger only, nothing moves",
                     "device": "pinned host copies, side stream, prefetch"}[mode]

    def attach(self, model, device):
        units = build_units({"yak": model}, yak_specs())
        act = {PHASE: self.activation}
        inner = max(u.nbytes for u in units if not u.outer)
        self.plan = plan(min_budget_bytes(units, act) + inner, units, act, max_prefetch_depth=1)
        self.units = units
        self.off = attach_offload(units, self.plan, device, simulate=self.mode == "simulate")
        self.off.enter_phase(PHASE)

    def begin_timed(self):
        led = self.off.ledger
        led.reset_peak()
        self._onloads, self._bytes = led.onloads, led.onloaded_bytes

    def stats(self, forwards):
        led, p = self.off.ledger, self.plan
        return {
            "units": len(self.units), "paged_units": len(p.paged_units), "resident_units": len(p.resident_units),
            "prefetch_depth": p.prefetch_depth, "budget_bytes": p.budget_bytes,
            "planned_peak_bytes": p.planned_peak_bytes, "planned_weight_peak_bytes": p.phase_weight_peaks[PHASE],
            "activation_estimate_bytes": p.activation_bytes[PHASE],
            "peak_weight_bytes": led.peak_bytes,  # ledger
            "onloads_per_forward": (led.onloads - self._onloads) / forwards,
            "onloaded_bytes_per_forward": (led.onloaded_bytes - self._bytes) / forwards,
            "bytes_really_copied": self.mode != "account",
        }

    def remove(self, model):
        self.off.remove()


class Diffusers(Method):
    def __init__(self, offload_type: str, use_stream: bool = False) -> None:
        self.offload_type, self.use_stream = offload_type, use_stream
        kind = "block" if offload_type == "block_level" else "leaf"
        self.name = f"diffusers_{kind}" + ("_stream" if use_stream else "")
        self.note = ("num_blocks_per_group=1" if kind == "block" else "per leaf layer") + \
                    (", use_stream" if use_stream else "")

    def attach(self, model, device):
        from diffusers.hooks import apply_group_offloading
        from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

        kwargs: dict[str, Any] = {"num_blocks_per_group": 1} if self.offload_type == "block_level" else {}
        apply_group_offloading(model, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type=self.offload_type, use_stream=self.use_stream, **kwargs)
        self.counter = Counter()
        self.moves = device.type != "cpu"
        groups = {}
        for m in model.modules():
            reg = m.__dict__.get("_diffusers_hook")
            hook = reg.get_hook(_GROUP_OFFLOADING) if reg is not None else None
            if hook is not None:
                groups[id(hook.group)] = hook.group
        for g in groups.values():
            tensors = [t for mod in g.modules for t in list(mod.parameters()) + list(mod.buffers())]
            self._wrap(g, _nbytes(tensors + list(g.parameters) + list(g.buffers)))
        self.groups = len(groups)

    def _wrap(self, group, nbytes: int) -> None:
        counter, key = self.counter, id(group)
        onload, offload = group.onload_, group.offload_

        def onload_() -> None:
            counter.on(key, nbytes)
            onload()

        def offload_() -> None:
            counter.off(key)
            offload()

        group.onload_, group.offload_ = onload_, offload_

    def begin_timed(self):
        self.counter.reset()

    def stats(self, forwards):
        c = self.counter
        return {"groups": self.groups, "onloads_per_forward": c.onloads / forwards,
                "onloaded_bytes_per_forward": c.onloaded_bytes / forwards, "peak_weight_bytes": c.peak_bytes,
                "repeated_onloads": c.double_onloads, "bytes_really_copied": self.moves}

    def remove(self, model):
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.group_offloading import (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER,
                                                      _LAZY_PREFETCH_GROUP_OFFLOADING)

        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in (_LAZY_PREFETCH_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _GROUP_OFFLOADING):
            registry.remove_hook(name, recurse=True)


class Accelerate(Method):
    name = "accelerate_cpu_offload"
    note = "per-leaf AlignDevicesHook, weights on meta"

    def attach(self, model, device):
        from accelerate import cpu_offload
        from accelerate.hooks import AlignDevicesHook, SequentialHook
        from accelerate.utils import named_module_tensors

        cpu_offload(model, execution_device=device)
        self.counter = Counter()
        self.moves = device.type != "cpu"
        n = 0
        for m in model.modules():
            top = getattr(m, "_hf_hook", None)
            for hook in (top.hooks if isinstance(top, SequentialHook) else [top] if top is not None else []):
                if isinstance(hook, AlignDevicesHook) and hook.offload:
                    nbytes = _nbytes([t for _, t in named_module_tensors(
                        m, include_buffers=hook.offload_buffers, recurse=hook.place_submodules,
                        remove_non_persistent=True)])
                    self._wrap(hook, id(m), nbytes)
                    n += 1
        self.hooks = n

    def _wrap(self, hook, key: int, nbytes: int) -> None:
        counter = self.counter
        pre, post = hook.pre_forward, hook.post_forward

        def pre_forward(module, *args, **kwargs):
            counter.on(key, nbytes)
            return pre(module, *args, **kwargs)

        def post_forward(module, output):
            out = post(module, output)
            counter.off(key)
            return out

        hook.pre_forward, hook.post_forward = pre_forward, post_forward

    def begin_timed(self):
        self.counter.reset()

    def stats(self, forwards):
        c = self.counter
        return {"offload_hooks": self.hooks, "onloads_per_forward": c.onloads / forwards,
                "onloaded_bytes_per_forward": c.onloaded_bytes / forwards, "peak_weight_bytes": c.peak_bytes,
                "repeated_onloads": c.double_onloads, "bytes_really_copied": self.moves}

    def remove(self, model):
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(model, recurse=True)


def methods_for(device: torch.device, activation: int) -> list[Method]:
    if device.type == "cpu":
        return [Resident(), Ours("simulate", activation), Ours("account", activation),
                Diffusers("block_level"), Diffusers("leaf_level"), Accelerate()]
    return [Resident(), Ours("device", activation), Diffusers("block_level"), Diffusers("block_level", True),
            Diffusers("leaf_level"), Diffusers("leaf_level", True), Accelerate()]


# --------------------------------------------------------------------------- running
def run_method(method: Method, model: YakTransformer, inputs: Inputs, device: torch.device, repeats: int,
               ref: torch.Tensor | None, snap: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
    x = inputs.to(device)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(x.img, x.img_ids, x.text, x.t)

    row: dict[str, Any] = {"note": method.note}
    t0 = time.perf_counter()
    method.attach(model, device)
    row["attach_s"] = time.perf_counter() - t0
    try:
        sync(device)
        out = forward()  # warm-up (learns orders), and the output that is checked
        sync(device)
        out = out.detach().to("cpu")
        if ref is not None:
            row["max_abs_diff"] = float((out.float() - ref.float()).abs().max())
            row["bitwise_equal"] = bool(torch.equal(out, ref))
        method.begin_timed()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        times = time_calls(forward, device, repeats, warmup=False)
        row["seconds_per_forward"] = statistics.median(times)
        row["times_s"] = times
        if device.type == "cuda":
            row["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            row["cuda_allocated_before_bytes"] = base
        row["accounting"] = method.stats(repeats)
    finally:
        t0 = time.perf_counter()
        method.remove(model)
        row["undo"] = undo_check(model, snap)
        row["undo"]["seconds"] = time.perf_counter() - t0
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            row["undo"]["cuda_allocated_after_bytes"] = torch.cuda.memory_allocated(device)
    return row, out


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def print_table(result: dict[str, Any]) -> None:
    print(f"Yak {result['params'] / 1e9:.3f}B params, {result['dtype']}, {_fmt_bytes(result['weight_bytes'])} weights; "
          f"device {result['device']}, {result['image_size']}x{result['image_size']} -> {result['image_tokens']} image "
          f"+ {result['text_tokens']} text tokens; threads {result['threads']}; median of {result['repeats']}; "
          f"build {result['build_s']:.1f}s")
    cuda = result["device"].startswith("cuda")
    head = f"{'method':24s} {'max|diff|':>9s} {'s/fwd':>8s} {'x res':>6s} {'onloads':>8s} {'bytes/fwd':>11s} " \
           f"{'peak weights':>13s}" + (f" {'cuda peak':>11s}" if cuda else "") + "  notes"
    print(head)
    print("-" * len(head))
    res_s = result["runs"]["resident"]["seconds_per_forward"]
    for name, row in result["runs"].items():
        acc = row.get("accounting", {})
        diff = row.get("max_abs_diff")
        onl = acc.get("onloads_per_forward")
        notes = [row["note"]]
        if "planned_peak_bytes" in acc:
            notes.append(f"plan: weights {_fmt_bytes(acc['planned_weight_peak_bytes'])} + act "
                         f"{_fmt_bytes(acc['activation_estimate_bytes'])} = {_fmt_bytes(acc['planned_peak_bytes'])}, "
                         f"depth {acc['prefetch_depth']}, {acc['paged_units']}/{acc['units']} paged")
        if acc and not acc.get("bytes_really_copied", True):
            notes.append("nothing copied (onload device = cpu): counts are what a GPU run would move")
        if row["undo"]["repointed"]:
            notes.append(f"undo re-pointed {row['undo']['repointed']} tensors")
        line = (f"{name:24s} {('-' if diff is None else f'{diff:.3g}'):>9s} {row['seconds_per_forward']:8.3f} "
                f"{row['seconds_per_forward'] / res_s:6.2f} {('-' if onl is None else f'{onl:.0f}'):>8s} "
                f"{_fmt_bytes(acc.get('onloaded_bytes_per_forward')):>11s} {_fmt_bytes(acc.get('peak_weight_bytes')):>13s}")
        if cuda:
            line += f" {_fmt_bytes(row.get('cuda_max_allocated_bytes')):>11s}"
        print(line + "  " + "; ".join(notes))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image-size", type=int, default=None, help="pixels per side (CPU 128, CUDA 1024)")
    ap.add_argument("--text-tokens", type=int, default=None, help="refined text tokens (CPU 32, CUDA 64)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--methods", default="", help="comma-separated subset of method names (resident always runs)")
    ap.add_argument("--tiny", action="store_true", help="a tiny YakConfig (smoke test of the script itself)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {device}")
    cpu = device.type == "cpu"
    image_size = args.image_size or (128 if cpu else 1024)
    text_tokens = args.text_tokens or (32 if cpu else 64)
    dtype = getattr(torch, args.dtype)
    cfg = (YakConfig(hidden_size=48, num_heads=2, axes_dim=(4, 10, 10), depth=2, depth_single_blocks=2,
                     context_in_dim=128, vec_in_dim=48) if args.tiny else YakConfig())
    warnings.filterwarnings("ignore", category=FutureWarning)

    t0 = time.perf_counter()
    model = build_yak(cfg, dtype)
    build_s = time.perf_counter() - t0
    inputs = make_inputs(cfg, image_size, text_tokens, dtype)
    tokens = inputs.img.shape[1] + text_tokens
    activation = yak_activation_bytes(cfg, tokens, dtype.itemsize, device.type)
    snap = snapshot(model)
    methods = methods_for(device, activation)
    if args.methods:
        keep = set(args.methods.split(","))
        unknown = keep - {m.name for m in methods}
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {[m.name for m in methods]}")
        methods = [m for m in methods if m.name == "resident" or m.name in keep]

    result: dict[str, Any] = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if not cpu else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype,
        "params": sum(p.numel() for p in model.parameters()), "weight_bytes": _nbytes(list(model.parameters())),
        "image_size": image_size, "image_tokens": inputs.img.shape[1], "text_tokens": text_tokens,
        "repeats": args.repeats, "build_s": build_s, "runs": {},
    }
    with contextlib.suppress(Exception):
        import accelerate
        import diffusers
        result["diffusers"], result["accelerate"] = diffusers.__version__, accelerate.__version__
    ref = None
    for method in methods:
        row, out = run_method(method, model, inputs, device, args.repeats, ref, snap)
        if ref is None:
            ref = out
        result["runs"][method.name] = row
        print(f"[{method.name}] {row['seconds_per_forward']:.3f} s/forward, diff {row.get('max_abs_diff', 0)}",
              file=sys.stderr, flush=True)
    # The model must be exactly what it was: one more resident forward, compared bit for bit.
    row, _ = run_method(Resident(), model, inputs, device, 1, ref, snap)
    result["runs"]["resident_after"] = row
    result["all_bitwise_equal"] = all(r.get("bitwise_equal", True) for r in result["runs"].values())
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return result


if __name__ == "__main__":
    main()
