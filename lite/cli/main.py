"""The `ovis-lite` command line.

Every user mistake ends as one line on stderr and exit code 2, before any model is loaded where
possible; nothing the user owns is overwritten without --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from lite import __version__
from lite.errors import InputError, OvisLiteError
from lite.validation import check_cfg, check_positive_int, check_side, check_text

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------------
# Parser.
# ---------------------------------------------------------------------------------------------

def _runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory or HF repo id in the local cache "
                                   "(default: $OVIS_LITE_MODEL, then the HF cache of AIDC-AI/Ovis-U1-3B)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.add_argument("--dtype", default="auto", help="bf16, fp16 or fp32 (default: bf16, as the reference)")
    p.add_argument("--preset", help="quality-vs-memory preset (see `ovis-lite presets`; default: chosen for this machine)")
    p.add_argument("--vram", help="plan as if the GPU had this much free memory, e.g. 6GB")
    p.add_argument("--ram", help="plan as if the host had this much RAM, e.g. 16GB")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summaries")
    p.add_argument("--json", action="store_true", help="print one JSON object with the result at the end")


def _image_options(p: argparse.ArgumentParser, txt_cfg: float, img_cfg: float | None) -> None:
    p.add_argument("-o", "--output", required=True, help="output image (.png keeps the metadata)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--steps", type=int, help="denoising steps (default: the preset's; reference 50)")
    p.add_argument("--seed", type=int, default=42, help="noise seed (default 42)")
    p.add_argument("--txt-cfg", type=float, default=txt_cfg, help=f"text guidance scale (default {txt_cfg})")
    if img_cfg is not None:
        p.add_argument("--img-cfg", type=float, default=img_cfg, help=f"image guidance scale (default {img_cfg})")
    p.add_argument("--solver", help="flow solver: euler (the reference), heun, dpmpp_2m, unipc (default: the preset's)")
    p.add_argument("--spacing", help="timestep spacing: linear (the reference), logsnr, karras (default: the preset's)")
    p.add_argument("--cfg-interval", type=float, nargs=2, metavar=("T_LO", "T_HI"),
                   help="apply guidance only for t in [T_LO, T_HI] (t=1 is noise)")


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="ovis-lite", description="Low-VRAM runtime for AIDC-AI/Ovis-U1-3B.")
    parser.add_argument("--version", action="version", version=f"ovis-lite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    ask = sub.add_parser("ask", help="answer a question about images (streams to stdout)")
    ask.add_argument("inputs", nargs="+", metavar="IMAGE... QUESTION", help="zero or more images, then the question")
    ask.add_argument("--max-new-tokens", type=int, default=1024)
    ask.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ask.add_argument("--temperature", type=float, default=0.7)
    ask.add_argument("--top-p", type=float, default=0.9)
    ask.add_argument("--seed", type=int, default=42)
    _runtime_options(ask)

    gen = sub.add_parser("generate", help="text-to-image")
    gen.add_argument("prompt")
    gen.add_argument("--width", type=int, default=1024)
    gen.add_argument("--height", type=int, default=1024)
    _image_options(gen, txt_cfg=5.0, img_cfg=None)
    _runtime_options(gen)

    edit = sub.add_parser("edit", help="edit an image by instruction")
    edit.add_argument("image")
    edit.add_argument("instruction")
    _image_options(edit, txt_cfg=6.0, img_cfg=1.5)
    _runtime_options(edit)

    demo = sub.add_parser("demo", help="run all three tasks on a tiny random model (shows the runtime)")
    demo.add_argument("--out", default="ovis-lite-demo", help="folder for the demo images (default ./ovis-lite-demo)")
    demo.add_argument("--quiet", action="store_true")

    tiny = sub.add_parser("make-tiny", help="write a seeded tiny random checkpoint in the HF layout")
    tiny.add_argument("out")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", default="fp32", help="stored dtype: fp32, bf16 or fp16")
    tiny.add_argument("--overwrite", action="store_true")

    insp = sub.add_parser("inspect", help="parameters and bytes per component; reads no weights")
    src = insp.add_mutually_exclusive_group()
    src.add_argument("--config", help="a config.json (default: the real Ovis-U1-3B config)")
    src.add_argument("--model", help="a checkpoint directory")
    insp.add_argument("--tensors", action="store_true", help="list every tensor and its shape")
    insp.add_argument("--json", action="store_true")

    insp.add_argument("--preset", help="report the bytes of this preset's quantized layout")

    presets = sub.add_parser("presets", help="the presets and their planned peak memory at 1024x1024")
    presets.add_argument("--device", default="cuda", choices=("cuda", "mps", "cpu"),
                         help="plan for this kind of device (default cuda)")
    presets.add_argument("--config", help="a config.json (default: the real Ovis-U1-3B config)")
    presets.add_argument("--json", action="store_true")

    plan = sub.add_parser("plan", help="the offload plan for a task, size and budget; reads no weights")
    src = plan.add_mutually_exclusive_group()
    src.add_argument("--config", help="a config.json (default: the real Ovis-U1-3B config)")
    src.add_argument("--model", help="a checkpoint directory")
    plan.add_argument("--task", choices=("understand", "t2i", "edit"), default="t2i")
    plan.add_argument("--width", type=int, default=1024)
    plan.add_argument("--height", type=int, default=1024)
    plan.add_argument("--device", default="cuda", choices=("cuda", "mps", "cpu"))
    how = plan.add_mutually_exclusive_group()
    how.add_argument("--budget", help="device budget, e.g. 4GB or a number of bytes")
    how.add_argument("--preset", help="use a preset's precision, sampling and budget")
    plan.add_argument("--json", action="store_true")

    quant = sub.add_parser("quantize", help="write a pre-quantized checkpoint for a preset")
    quant.add_argument("--model", help="the source checkpoint directory")
    quant.add_argument("--preset", required=True, help="the preset whose precision policy to apply")
    quant.add_argument("--out", required=True, help="a new (or empty) output directory")
    quant.add_argument("--device", default="cuda", choices=("cuda", "mps", "cpu"),
                       help="the device the checkpoint is meant for (picks the backends; default cuda)")
    quant.add_argument("--quiet", action="store_true")

    info = sub.add_parser("info", help="print the generation settings stored in an image")
    info.add_argument("image")
    info.add_argument("--json", action="store_true")
    return parser


# ---------------------------------------------------------------------------------------------
# Commands.
# ---------------------------------------------------------------------------------------------

def _say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def _select_preset(args: argparse.Namespace, task: str, width: int, height: int):
    """The user's preset (checked to fit), or the best one for this machine; says which and why."""
    from lite.model.config import load_config, load_preprocessor_config
    from lite.runtime.devices import resolve_device
    from lite.model.checkpoint import find_checkpoint
    from lite.runtime.presets import check_fits, choose_preset, detect_machine, get_preset, parse_bytes

    preset = get_preset(args.preset) if args.preset else None  # unknown names fail before anything loads
    vram = parse_bytes(args.vram) if args.vram else None
    ram = parse_bytes(args.ram) if args.ram else None
    device, notice = resolve_device(args.device)
    if notice:
        print(f"ovis-lite: {notice}", file=sys.stderr)
    directory = find_checkpoint(args.model)
    config, pp = load_config(directory), load_preprocessor_config(directory)
    machine = detect_machine(device, vram, ram)
    if preset is None:
        preset, why = choose_preset(machine, config, pp, task, width, height)
        _say(args, f"ovis-lite: {why}")
    else:
        check_fits(preset, config, pp, task, width, height, machine)
    return preset, device, directory, machine


def _load_pipeline(args: argparse.Namespace, task: str, width: int = 1024, height: int = 1024):
    from lite.runtime.devices import resolve_dtype
    from lite.memory import format_bytes
    from lite.runtime.pipeline import OvisPipeline
    from lite.runtime.presets import effective_budget

    preset, device, directory, machine = _select_preset(args, task, width, height)
    dtype = resolve_dtype(args.dtype, device) if args.dtype != "auto" else None
    pipe = OvisPipeline.from_pretrained(directory, device=device, dtype=dtype, preset=preset,
                                        budget_bytes=effective_budget(preset, machine), progress=not args.quiet)
    pipe.notify = lambda message: print(f"ovis-lite: {message}", file=sys.stderr)
    rep = pipe.load_report
    if rep is not None:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in rep.component_bytes.items())
        where = f"{device}" + (f", paging within {format_bytes(pipe.offload.budget_bytes)}" if pipe.offload else "")
        _say(args, f"ovis-lite: loaded {rep.path} ({preset.name}) on {where} in {rep.seconds:.1f} s: {parts}; "
                   f"host RssAnon peak {format_bytes(rep.peak_rss_anon_bytes)}")
    return pipe, preset


def _sampling(args: argparse.Namespace, preset) -> dict:
    """The user's sampling options, falling back to the preset's."""
    interval = tuple(args.cfg_interval) if args.cfg_interval else preset.cfg_interval
    return dict(steps=args.steps or preset.steps, solver=args.solver or preset.solver,
                spacing=args.spacing or preset.spacing, cfg_interval=interval)


def _summary(args: argparse.Namespace, stats: Any, output: str | None) -> None:
    from lite.memory import format_bytes

    dev = f", device peak {format_bytes(stats.peak_device_bytes)}" if stats.peak_device_bytes is not None else ""
    size = f" {stats.width}x{stats.height}" if stats.width else ""
    nfe = f", NFE {stats.nfe}" if stats.nfe else ""
    dest = f" -> {output}" if output else ""
    _say(args, f"ovis-lite: {stats.task}{size} in {stats.seconds:.1f} s, host peak "
               f"{format_bytes(stats.peak_rss_bytes)}{dev}{nfe}{dest}")


def _result_json(stats: Any, output: str | None, **extra: Any) -> str:
    return json.dumps({"task": stats.task, "output": output, "seconds": round(stats.seconds, 3),
                       "peak_rss_bytes": stats.peak_rss_bytes, "peak_device_bytes": stats.peak_device_bytes,
                       "nfe": stats.nfe, "width": stats.width or None, "height": stats.height or None, **extra})


def _check_image_args(args: argparse.Namespace) -> None:
    """Every numeric argument, checked before torch is even imported."""
    if args.steps is not None:
        check_positive_int("--steps", args.steps, 1, 1000)
    check_cfg("--txt-cfg", args.txt_cfg)
    if hasattr(args, "img_cfg"):
        check_cfg("--img-cfg", args.img_cfg)
    for name in ("width", "height"):
        if hasattr(args, name):
            check_side(f"--{name}", getattr(args, name))
    if args.cfg_interval and not 0 <= args.cfg_interval[0] <= args.cfg_interval[1] <= 1:
        raise InputError("--cfg-interval needs 0 <= T_LO <= T_HI <= 1")


def _check_solver_args(args: argparse.Namespace) -> None:
    from lite.sampling import SOLVERS, SPACINGS

    if args.solver is not None and args.solver not in SOLVERS:
        raise InputError(f"unknown solver {args.solver!r}; choose one of {', '.join(SOLVERS)}")
    if args.spacing is not None and args.spacing not in SPACINGS:
        raise InputError(f"unknown spacing {args.spacing!r}; choose one of {', '.join(SPACINGS)}")


def _metadata(pipe: Any, stats: Any, task: str, preset: Any) -> dict[str, Any]:
    return {"task": task, "model": pipe.model_id, "width": stats.width, "height": stats.height,
            "nfe": stats.nfe, "preset": preset.name, "ovis_lite_version": __version__, **stats.settings}


def cmd_generate(args: argparse.Namespace) -> int:
    check_text("prompt", args.prompt)
    _check_image_args(args)
    from lite.runtime.outputs import check_output_path, save_image

    check_output_path(args.output, args.overwrite)
    _check_solver_args(args)
    pipe, preset = _load_pipeline(args, "t2i", args.width, args.height)
    image = pipe.generate(args.prompt, width=args.width, height=args.height, seed=args.seed, txt_cfg=args.txt_cfg,
                          **_sampling(args, preset))
    stats = pipe.last_run
    out = save_image(image, args.output, args.overwrite, _metadata(pipe, stats, "t2i", preset))
    _summary(args, stats, str(out))
    if args.json:
        print(_result_json(stats, str(out)))
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    check_text("instruction", args.instruction)
    _check_image_args(args)
    from lite.runtime.outputs import check_output_path, save_image
    from lite.model.processing import load_image

    source = load_image(args.image)
    check_output_path(args.output, args.overwrite)
    _check_solver_args(args)
    pipe, preset = _load_pipeline(args, "edit", *source.size)
    image = pipe.edit(source, args.instruction, seed=args.seed, img_cfg=args.img_cfg, txt_cfg=args.txt_cfg,
                      **_sampling(args, preset))
    stats = pipe.last_run
    meta = _metadata(pipe, stats, "edit", preset) | {"source": str(args.image)}
    out = save_image(image, args.output, args.overwrite, meta)
    _summary(args, stats, str(out))
    if args.json:
        print(_result_json(stats, str(out)))
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    *image_paths, question = args.inputs
    check_text("question", question)
    check_positive_int("--max-new-tokens", args.max_new_tokens)
    if args.sample and (args.temperature <= 0 or not 0 < args.top_p <= 1):
        raise InputError("--sample needs --temperature > 0 and 0 < --top-p <= 1")
    from lite.model.processing import load_image

    images = [load_image(p) for p in image_paths]
    w = max((img.size[0] for img in images), default=448)
    h = max((img.size[1] for img in images), default=448)
    pipe, _preset = _load_pipeline(args, "understand", w, h)
    pieces = pipe.understand(images, question, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                             temperature=args.temperature, top_p=args.top_p, stream=True, seed=args.seed)
    answer = []
    for piece in pieces:
        answer.append(piece)
        if not args.json:
            print(piece, end="", flush=True)
    if not args.json:
        print()
    _summary(args, pipe.last_run, None)
    if args.json:
        print(_result_json(pipe.last_run, None, answer="".join(answer)))
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from lite.runtime.devices import resolve_dtype
    from lite.model.tiny import make_tiny

    import torch

    path = make_tiny(args.out, seed=args.seed, dtype=resolve_dtype(args.dtype, torch.device("cpu")),
                     overwrite=args.overwrite)
    print(f"ovis-lite: wrote a tiny random checkpoint (seed {args.seed}) to {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lite.model.config import load_config
    from lite.model.sizes import format_inspect, inspect_config

    config = load_config(_config_source(args))
    if args.preset:
        from lite.runtime.presets import get_preset
        from lite.model.quantization import format_quantized_bytes, quantized_bytes

        preset = get_preset(args.preset)
        result = quantized_bytes(config, preset.quant, "cuda" if "cuda" in preset.devices else preset.devices[0])
        if args.tensors:
            result["tensors"] = inspect_config(config, tensors=True)["tensors"]
        print(json.dumps(result) if args.json else format_quantized_bytes(result))
        return 0
    result = inspect_config(config, tensors=args.tensors)
    print(json.dumps(result) if args.json else format_inspect(result))
    return 0


def _config_source(args: argparse.Namespace) -> Path:
    from importlib import resources

    from lite.model.checkpoint import find_checkpoint

    if getattr(args, "model", None):
        return find_checkpoint(args.model)
    if getattr(args, "config", None):
        return Path(args.config)
    return Path(str(resources.files("lite").joinpath("data/config.json")))


def cmd_presets(args: argparse.Namespace) -> int:
    from lite.model.config import PreprocessorConfig, load_config
    from lite.runtime.presets import preset_table

    rows = preset_table(load_config(_config_source(args)), PreprocessorConfig(), args.device)
    if args.json:
        print(json.dumps(rows))
        return 0
    gib = 1 << 30
    print(f"{'preset':<10} {'budget':>7} {'sampler':<18} {'NFE t2i/edit':>12} {'understand':>10} {'t2i 1024':>9} "
          f"{'edit 1024':>9}  description")
    for r in rows:
        budget = f"{r['budget_bytes'] / gib:.0f} GiB" if r["budget_bytes"] else "-"
        peaks = {k: (f"{v / gib:.2f}G" if v is not None else "n/a") for k, v in r["planned_peak_bytes"].items()}
        print(f"{r['name']:<10} {budget:>7} {r['solver'] + '/' + r['spacing'] + ' ' + str(r['steps']):<18} "
              f"{str(r['nfe']['t2i']) + '/' + str(r['nfe']['edit']):>12} {peaks['understand']:>10} "
              f"{peaks['t2i_1024']:>9} {peaks['edit_1024']:>9}  {r['description']} [{r['planned_for']}]")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from lite.model.config import PreprocessorConfig, load_config, load_preprocessor_config
    from lite.runtime.presets import PRESETS, Preset, get_preset, parse_bytes, plan_preset, resident_peak
    from lite.validation import check_side

    check_side("--width", args.width)
    check_side("--height", args.height)
    source = _config_source(args)
    config = load_config(source)
    pp = load_preprocessor_config(source) if source.is_dir() else PreprocessorConfig()
    if args.preset:
        preset = get_preset(args.preset)
        budget = preset.budget_bytes
    else:
        preset = PRESETS["reference"]
        budget = parse_bytes(args.budget) if args.budget else None
        if budget is not None:
            preset = Preset("custom", "bf16 with a custom budget", quant="reference", budget_bytes=budget)
    p = plan_preset(preset, config, pp, args.task, args.width, args.height, args.device, budget)
    resident = budget is None or not preset.offload
    result = {
        "task": args.task, "width": args.width, "height": args.height, "preset": preset.name,
        "budget_bytes": budget, "planned_peak_bytes": resident_peak(p) if resident else p.planned_peak_bytes,
        "phase_peaks": p.phase_peaks, "activation_bytes": p.activation_bytes,
        "resident_weight_bytes": p.resident_weight_bytes, "paged_units": p.paged_units,
        "resident_units": len(p.resident_units), "prefetch_depth": p.prefetch_depth,
        "min_budget_bytes": p.min_budget_bytes,
        "nfe": preset.nfe(args.task) if args.task != "understand" else 0,
    }
    if args.json:
        print(json.dumps(result))
    else:
        gib = 1 << 30
        print(f"{args.task} {args.width}x{args.height} with {preset.name}: planned peak "
              f"{result['planned_peak_bytes'] / gib:.2f} GiB of "
              f"{(budget / gib if budget else float('nan')):.2f} GiB; "
              f"{len(p.paged_units)} paged unit(s), prefetch {p.prefetch_depth}; NFE {result['nfe']}")
        for phase, peak in p.phase_peaks.items():
            print(f"  {phase:<10} {peak / gib:6.2f} GiB (activations {p.activation_bytes[phase] / gib:.2f})")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from lite.runtime.presets import get_preset
    from lite.model.quantization import save_quantized_checkpoint

    preset = get_preset(args.preset)
    manifest = save_quantized_checkpoint(args.model, preset.quant, args.out, device_type=args.device,
                                         progress=not args.quiet)
    print(f"ovis-lite: wrote {args.out} ({preset.name}: {manifest.get('policy', preset.quant)})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from lite.runtime.outputs import read_metadata

    meta = read_metadata(args.image)
    if args.json:
        print(json.dumps(meta, sort_keys=True))
    else:
        for key, value in sorted(meta.items()):
            print(f"{key}: {value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lite.cli.demo import run_demo

    run_demo(Path(args.out), quiet=args.quiet)
    return 0


_LAYER_USER_ERRORS = {"BudgetError", "QuantFormatError", "QuantBackendError"}


def _is_user_error(exc: BaseException) -> bool:
    """Errors that describe the user's input or machine (reported in one line), not bugs."""
    if isinstance(exc, (OvisLiteError, FileExistsError)):
        return True
    return type(exc).__name__ in _LAYER_USER_ERRORS and type(exc).__module__.startswith(("offload", "quant"))


COMMANDS = {"ask": cmd_ask, "generate": cmd_generate, "edit": cmd_edit, "demo": cmd_demo,
            "make-tiny": cmd_make_tiny, "inspect": cmd_inspect, "info": cmd_info, "presets": cmd_presets,
            "plan": cmd_plan, "quantize": cmd_quantize}


def main(argv: list[str] | None = None) -> int:
    # Before torch initialises CUDA: paging units through the device fragments the default allocator.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        return COMMANDS[args.command](args)
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"ovis-lite: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"ovis-lite: interrupted after {time.perf_counter() - started:.1f} s", file=sys.stderr)
        return 130
