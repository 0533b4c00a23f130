"""The `ovis-lite` command line.

Every user mistake ends as one line on stderr and exit code 2, before any model is loaded where
possible; nothing the user owns is overwritten without --overwrite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .errors import InputError, OvisLiteError
from .validation import check_cfg, check_positive_int, check_side, check_text

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
    p.add_argument("--quiet", action="store_true", help="no progress bars or summaries")
    p.add_argument("--json", action="store_true", help="print one JSON object with the result at the end")


def _image_options(p: argparse.ArgumentParser, txt_cfg: float, img_cfg: float | None) -> None:
    p.add_argument("-o", "--output", required=True, help="output image (.png keeps the metadata)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--seed", type=int, default=42, help="noise seed (default 42)")
    p.add_argument("--txt-cfg", type=float, default=txt_cfg, help=f"text guidance scale (default {txt_cfg})")
    if img_cfg is not None:
        p.add_argument("--img-cfg", type=float, default=img_cfg, help=f"image guidance scale (default {img_cfg})")
    p.add_argument("--solver", default="euler", help="flow solver (default euler, the reference)")
    p.add_argument("--spacing", default="linear", help="timestep spacing (default linear, the reference)")
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


def _load_pipeline(args: argparse.Namespace):
    from .devices import resolve_device, resolve_dtype
    from .loading import find_checkpoint
    from .memory import format_bytes
    from .pipeline import OvisPipeline

    device, notice = resolve_device(args.device)
    if notice:
        print(f"ovis-lite: {notice}", file=sys.stderr)
    dtype = resolve_dtype(args.dtype, device)
    directory = find_checkpoint(args.model)
    pipe = OvisPipeline.from_pretrained(directory, device=device, dtype=dtype, progress=not args.quiet)
    rep = pipe.load_report
    if rep is not None:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in rep.component_bytes.items())
        _say(args, f"ovis-lite: loaded {rep.path} on {device} in {rep.seconds:.1f} s: {parts}; "
                   f"host RssAnon peak {format_bytes(rep.peak_rss_anon_bytes)}")
    return pipe


def _summary(args: argparse.Namespace, stats: Any, output: str | None) -> None:
    from .memory import format_bytes

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
    from .sampling import SOLVERS, SPACINGS

    if args.solver not in SOLVERS:
        raise InputError(f"unknown solver {args.solver!r}; choose one of {', '.join(SOLVERS)}")
    if args.spacing not in SPACINGS:
        raise InputError(f"unknown spacing {args.spacing!r}; choose one of {', '.join(SPACINGS)}")


def _metadata(pipe: Any, stats: Any, task: str) -> dict[str, Any]:
    return {"task": task, "model": pipe.model_id, "width": stats.width, "height": stats.height,
            "nfe": stats.nfe, "preset": None, **stats.settings}


def cmd_generate(args: argparse.Namespace) -> int:
    check_text("prompt", args.prompt)
    _check_image_args(args)
    from .outputs import check_output_path, save_image

    check_output_path(args.output, args.overwrite)
    _check_solver_args(args)
    pipe = _load_pipeline(args)
    image = pipe.generate(args.prompt, width=args.width, height=args.height, steps=args.steps, seed=args.seed,
                          txt_cfg=args.txt_cfg, solver=args.solver, spacing=args.spacing,
                          cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None)
    stats = pipe.last_run
    out = save_image(image, args.output, args.overwrite, _metadata(pipe, stats, "t2i"))
    _summary(args, stats, str(out))
    if args.json:
        print(_result_json(stats, str(out)))
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    check_text("instruction", args.instruction)
    _check_image_args(args)
    from .outputs import check_output_path, save_image
    from .processing import load_image

    source = load_image(args.image)
    check_output_path(args.output, args.overwrite)
    _check_solver_args(args)
    pipe = _load_pipeline(args)
    image = pipe.edit(source, args.instruction, steps=args.steps, seed=args.seed, img_cfg=args.img_cfg,
                      txt_cfg=args.txt_cfg, solver=args.solver, spacing=args.spacing,
                      cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None)
    stats = pipe.last_run
    meta = _metadata(pipe, stats, "edit") | {"source": str(args.image)}
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
    from .processing import load_image

    images = [load_image(p) for p in image_paths]
    pipe = _load_pipeline(args)
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
    from .devices import resolve_dtype
    from .tiny import make_tiny

    import torch

    path = make_tiny(args.out, seed=args.seed, dtype=resolve_dtype(args.dtype, torch.device("cpu")),
                     overwrite=args.overwrite)
    print(f"ovis-lite: wrote a tiny random checkpoint (seed {args.seed}) to {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from importlib import resources

    from .config import load_config
    from .inspect import format_inspect, inspect_config
    from .loading import find_checkpoint

    if args.model:
        source: Any = find_checkpoint(args.model)
    elif args.config:
        source = args.config
    else:
        source = resources.files("lite").joinpath("data/config.json")
    result = inspect_config(load_config(Path(str(source))), tensors=args.tensors)
    print(json.dumps(result) if args.json else format_inspect(result))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .outputs import read_metadata

    meta = read_metadata(args.image)
    if args.json:
        print(json.dumps(meta, sort_keys=True))
    else:
        for key, value in sorted(meta.items()):
            print(f"{key}: {value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), quiet=args.quiet)
    return 0


COMMANDS = {"ask": cmd_ask, "generate": cmd_generate, "edit": cmd_edit, "demo": cmd_demo,
            "make-tiny": cmd_make_tiny, "inspect": cmd_inspect, "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        return COMMANDS[args.command](args)
    except (OvisLiteError, FileExistsError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"ovis-lite: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"ovis-lite: interrupted after {time.perf_counter() - started:.1f} s", file=sys.stderr)
        return 130
