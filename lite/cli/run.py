"""`ask`, `generate` and `edit`: check everything, resolve the run once, load, run, write atomically."""

from __future__ import annotations

import argparse
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

from lite.cli import settings
from lite.cli.report import answer_result, count_tokens, image_result, summary
from lite.cli.runconfig import check_max_new_tokens, load_pipeline, resolve_run
from lite.cli.types import utf8_problem
from lite.errors import InputError
from lite.model.images import load_image
from lite.runtime.metadata import image_metadata
from lite.runtime.outputs import save_image
from lite.validation import check_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _preview_callback(pipe: Any, args: argparse.Namespace) -> Callable[[int, int, Any], None] | None:
    """Write a cheap decoded preview every --preview-every steps (and at the last one)."""
    if not args.preview:
        return None
    def callback(step: int, total: int, latent: Any) -> None:
        if step % args.preview_every == 0 or step == total:
            save_image(pipe.preview(latent), args.preview, overwrite=True)

    return callback


def _image_run(args: argparse.Namespace, task: str) -> int:
    """generate and edit: metadata, defaults, prompts and outputs are all settled before loading."""
    settings.merge_prompt_option(args, task)
    settings.apply_metadata(args, task)
    settings.apply_defaults(args, task)
    text = args.prompt if task == "t2i" else args.instruction
    prompts = settings.read_prompts(args, text, "prompt" if task == "t2i" else "instruction")
    if args.negative_prompt is not None:
        problem = utf8_problem("--negative-prompt", args.negative_prompt)
        if problem:
            raise InputError(problem)
    source = None
    if task == "edit":
        source = load_image(args.image)
    jobs = settings.plan_jobs(args, prompts)
    settings.check_solver(args)
    # The plan and every line name the image's real size; the pipeline still gets the requested one (its
    # white canvas is the requested size, as in the reference).
    width, height = settings.floored_size(args) if task == "t2i" else source.size
    run = resolve_run(args, task, width, height)
    pipe = load_pipeline(run, args)
    extra: dict[str, Any] = settings.sampling(args)
    if args.negative_prompt is not None:
        extra["negative_prompt"] = args.negative_prompt
    callback = _preview_callback(pipe, args)
    if callback is not None:
        extra["callback"] = callback
    for job in jobs:
        if task == "t2i":
            result = pipe.generate(job.prompt, width=args.width, height=args.height, seed=job.seed,
                                   txt_cfg=args.txt_cfg, **extra)
        else:
            result = pipe.edit(source, job.prompt, seed=job.seed, img_cfg=args.img_cfg, txt_cfg=args.txt_cfg,
                               **extra)
        meta = result.metadata()
        if task == "edit":
            meta["source"] = str(args.image)
        out = save_image(result.image, job.output, args.overwrite and bool(args.output), meta)  # default names: never
        summary(args, result.stats, str(out), f", seed {job.seed}")
        if args.json:
            print(image_result(result.stats, str(out), job.seed, run.preset.name), flush=True)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    return _image_run(args, "t2i")


def cmd_edit(args: argparse.Namespace) -> int:
    return _image_run(args, "edit")


def looks_like_image(arg: str) -> bool:
    """An existing file, or a single word with an image suffix: not a question."""
    path = Path(arg)
    if " " not in arg.strip() and path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def split_ask_inputs(args: argparse.Namespace) -> tuple[list[str], str]:
    """`ask [IMAGE...] QUESTION` plus `--image PATH`: the image paths and the question."""
    if not args.inputs:
        raise InputError("the question is missing; e.g. ovis-lite ask cat.png \"What is it?\"")
    *positional, question = args.inputs
    if looks_like_image(question):
        images = [*positional, question]
        questions = [word for word in images if not looks_like_image(word)]
        files = [word for word in images if looks_like_image(word)]
        example = questions[-1] if questions else "What is it?"
        raise InputError(f"the question is missing: {question!r} is an image; put the question last, "
                         f"e.g. ovis-lite ask {' '.join(shlex.quote(f) for f in files)} {shlex.quote(example)}")
    problem = utf8_problem("the question", question)
    if problem:
        raise InputError(problem)
    return [*args.image, *positional], check_text("question", question)


def resolve_seed(value: int | str) -> int:
    return secrets.randbelow(2**32) if value == "random" else int(value)


DEFAULT_TEMPERATURE = 0.7  # with --sample and no --temperature


def resolve_decoding(args: argparse.Namespace) -> None:
    """One rule for the CLI, the API and the page: a temperature > 0 samples, 0 (or none) is greedy;
    `--sample` alone samples at 0.7. `--sample --temperature 0` contradicts itself and is refused."""
    if args.temperature is not None and args.temperature == 0:
        if args.sample:
            raise InputError("--sample with --temperature 0 contradicts itself; drop --sample for greedy "
                             "decoding, or give a temperature > 0")
        args.temperature = DEFAULT_TEMPERATURE  # unused: greedy
        return
    if args.temperature is not None:
        args.sample = True
    else:
        args.temperature = DEFAULT_TEMPERATURE


def cmd_ask(args: argparse.Namespace) -> int:
    paths, question = split_ask_inputs(args)
    resolve_decoding(args)
    images = [load_image(p) for p in paths]
    seed = resolve_seed(args.seed)
    w = max((img.size[0] for img in images), default=448)
    h = max((img.size[1] for img in images), default=448)
    run = resolve_run(args, "understand", w, h)
    check_max_new_tokens(run.config, args.max_new_tokens)
    pipe = load_pipeline(run, args)
    pieces = pipe.understand(images, question, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                             temperature=args.temperature, top_p=args.top_p, stream=True, seed=seed)
    answer = stream_answer(pieces, echo=not args.json)
    stats = pieces.stats
    tokens = count_tokens(stats, pipe.tokenizer, answer)
    rate = f", {tokens} tokens, {tokens / stats.seconds:.1f} tokens/s" if stats.seconds > 0 else ""
    summary(args, stats, None, rate)
    if args.json:
        print(answer_result(stats, answer, tokens, run.preset.name, seed if args.sample else None), flush=True)
    return 0


def stream_answer(pieces: Any, echo: bool) -> str:
    """Print the answer as it comes (an `AnswerStream`); it is closed on any exit, so its worker stops."""
    try:
        for piece in pieces:
            if echo:
                sys.stdout.write(piece)
                sys.stdout.flush()
    finally:
        pieces.close()
    if echo:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return str(pieces.text)
