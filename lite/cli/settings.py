"""The settings of an image run, from three sources in order: explicit options, an earlier output's
metadata (`--config-from-metadata`), then the task's and the preset's defaults. Resolved once.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lite.cli.report import notice
from lite.cli.types import MAX_SEED, utf8_problem
from lite.errors import InputError, OutputError
from lite.runtime.metadata import read_metadata
from lite.runtime.outputs import check_output_path
from lite.validation import check_cfg, check_positive_int, check_side, check_text

TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "t2i": {"width": 1024, "height": 1024, "txt_cfg": 5.0, "seed": 42},
    "edit": {"txt_cfg": 6.0, "img_cfg": 1.5, "seed": 42},
}
# metadata key -> option dest; explicit options win over these
FROM_METADATA = {"prompt": "prompt", "seed": "seed", "steps": "steps", "txt_cfg": "txt_cfg", "img_cfg": "img_cfg",
                 "solver": "solver", "spacing": "spacing", "cfg_interval": "cfg_interval", "width": "width",
                 "height": "height", "preset": "preset", "negative_prompt": "negative_prompt"}
PATTERN = re.compile(r"%0?\d*d")


@dataclass(frozen=True)
class Job:
    """One image to make: its prompt, seed and output path."""

    prompt: str
    seed: int
    output: Path


def apply_metadata(args: argparse.Namespace, task: str) -> None:
    """Fill every option the user did not give from the metadata of `--config-from-metadata`."""
    if not getattr(args, "config_from_metadata", None):
        return
    meta = read_metadata(args.config_from_metadata)
    if not isinstance(meta, dict) or "task" not in meta:
        raise InputError(f"{args.config_from_metadata} holds no ovis-lite settings to rerun")
    text_dest = "prompt" if task == "t2i" else "instruction"
    for key, dest in FROM_METADATA.items():
        if dest == "prompt":
            if getattr(args, "prompt_file", None) is not None:
                continue  # the prompts come from the file
            dest = text_dest
        if key in meta and meta[key] is not None and hasattr(args, dest) and getattr(args, dest) is None:
            value = meta[key]
            setattr(args, dest, list(value) if key == "cfg_interval" else value)


def merge_prompt_option(args: argparse.Namespace, task: str) -> None:
    """`-p/--prompt TEXT` (sd.cpp, mflux) is the positional prompt (the instruction for edit) given as an option."""
    option = getattr(args, "prompt_option", None)
    if option is None:
        return
    dest = "prompt" if task == "t2i" else "instruction"
    if getattr(args, dest) is not None:
        raise InputError(f"the {dest} is given twice (after the command and as -p/--prompt); give it once")
    setattr(args, dest, option)


def apply_defaults(args: argparse.Namespace, task: str) -> None:
    """The task's defaults for what is still unset; `--seed random` stays random: each prompt draws its own
    seed in `plan_jobs`."""
    for dest, value in TASK_DEFAULTS[task].items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, value)
    _check_numbers(args)


def floored_size(args: argparse.Namespace) -> tuple[int, int]:
    """The size the image will have (W and H floored to multiples of 16), said once when it differs."""
    width, height = args.width // 16 * 16, args.height // 16 * 16
    if (width, height) != (args.width, args.height):
        notice(args, f"{args.width}x{args.height} is floored to multiples of 16: the image will be {width}x{height}")
    return width, height


def _check_numbers(args: argparse.Namespace) -> None:
    """Values from metadata are untrusted: the same checks as the parser's, one line each."""
    if args.seed != "random":  # a random seed is drawn per prompt, below 2**32
        check_positive_int("--seed", args.seed, 0, MAX_SEED)
        if args.seed + args.num_images - 1 > MAX_SEED:
            raise InputError(f"--seed {args.seed} with --num-images {args.num_images} passes the largest seed "
                             f"{MAX_SEED}")
    if args.steps is not None:
        check_positive_int("--steps", args.steps, 1, 1000)
    for name in ("txt_cfg", "img_cfg"):
        if getattr(args, name, None) is not None:
            check_cfg("--" + name.replace("_", "-"), args.txt_cfg if name == "txt_cfg" else args.img_cfg)
    for name in ("width", "height"):
        if getattr(args, name, None) is not None:
            check_side(f"--{name}", getattr(args, name))
    interval = args.cfg_interval
    if interval is not None and not (isinstance(interval, (list, tuple)) and len(interval) == 2
                                     and all(isinstance(v, (int, float)) for v in interval)
                                     and 0 <= interval[0] <= interval[1] <= 1):
        raise InputError("--cfg-interval needs 0 <= T_LO <= T_HI <= 1")


def check_solver(args: argparse.Namespace) -> None:
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.sampling import SOLVERS, SPACINGS

    if args.solver is not None and args.solver not in SOLVERS:
        raise InputError(f"unknown solver {args.solver!r}; choose one of {', '.join(SOLVERS)}")
    if args.spacing is not None and args.spacing not in SPACINGS:
        raise InputError(f"unknown spacing {args.spacing!r}; choose one of {', '.join(SPACINGS)}")


def read_prompts(args: argparse.Namespace, text: str | None, name: str) -> list[str]:
    """The positional prompt, or one prompt per line of --prompt-file (- is stdin); blank lines and
    `# comment` lines are skipped, as in shell scripts and sd.cpp-style prompt lists."""
    source = getattr(args, "prompt_file", None)
    if source is not None:
        if text is not None:
            raise InputError(f"give the {name} or --prompt-file, not both")
        data = sys.stdin.buffer.read() if source == "-" else _read_file(source)
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise InputError(f"--prompt-file {source} is not UTF-8 text (byte {exc.start})") from None
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not prompts:
            raise InputError(f"--prompt-file {source} holds no prompt (one per line)")
        return prompts
    if text is None:
        raise InputError(f"the {name} is missing; give it after the command, or use --prompt-file")
    problem = utf8_problem(f"the {name}", text)
    if problem:
        raise InputError(problem)
    return [check_text(name, text)]


def _read_file(path: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--prompt-file {path} is not a readable file")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read --prompt-file {path}: {exc.strerror}") from None


DEFAULT_OUTPUT = Path("output.png")


def default_output_names(count: int, folder: Path = Path(".")) -> list[Path]:
    """Without -o: the first `count` free names of output.png, output-1.png, output-2.png, ... (never
    overwriting, whatever --overwrite says), as sd.cpp writes output.png by default."""
    names: list[Path] = []
    index = 0
    while len(names) < count:
        stem = DEFAULT_OUTPUT.stem if index == 0 else f"{DEFAULT_OUTPUT.stem}-{index}"
        candidate = folder / f"{stem}{DEFAULT_OUTPUT.suffix}"
        if not os.path.lexists(candidate):
            names.append(candidate)
        index += 1
    return names


def output_names(output: str | None, count: int) -> list[Path]:
    """`out.png`, `out-1.png`, ... or the %d pattern filled with 0, 1, ...; without -o the free default names."""
    if not output:
        return default_output_names(count)
    if PATTERN.search(output):
        spec = PATTERN.search(output)
        assert spec is not None
        return [Path(output[:spec.start()] + spec.group() % i + output[spec.end():]) for i in range(count)]
    first = Path(output)
    return [first] + [first.with_name(f"{first.stem}-{i}{first.suffix}") for i in range(1, count)]


def plan_jobs(args: argparse.Namespace, prompts: list[str]) -> list[Job]:
    """Every image of the run, checked for a free output name before any model loads."""
    count = len(prompts) * args.num_images
    names = output_names(args.output, count)
    overwrite = args.overwrite and bool(args.output)  # default names are never overwritten
    if len(set(names)) != len(names):
        raise OutputError(f"-o {args.output} gives the same name to several images; use a %d pattern")
    for name in names:
        check_output_path(name, overwrite)
    if args.preview:
        check_output_path(args.preview, args.overwrite)
        if Path(args.preview) in names:
            raise OutputError(f"--preview {args.preview} is also an output name")
    jobs = []
    for i, prompt in enumerate(prompts):
        first = secrets.randbelow(2**32) if args.seed == "random" else args.seed  # each prompt its own
        for j in range(args.num_images):
            jobs.append(Job(prompt, first + j, names[i * args.num_images + j]))
    return jobs


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    """Only the sampling options the user gave: the pipeline takes the rest from its preset, so the
    CLI and the API run the same sampler (and NFE) for the same preset."""
    given = {"steps": args.steps, "solver": args.solver, "spacing": args.spacing,
             "cfg_interval": tuple(args.cfg_interval) if args.cfg_interval is not None else None}
    return {k: v for k, v in given.items() if v is not None}
