"""The `ovis-lite` argument parser: every option with its default, every subcommand with examples.

Imports nothing heavy: `ovis-lite --help` must not load torch. Options whose default depends on the
preset or the task parse to None and are resolved once, in `lite.cli.settings`.
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from lite import __version__
from lite.cli import types
from lite.cli.serve import add_serve_parser

EXIT_USAGE = 2
PRESET_NAMES_MARK = "{presets}"


class HelpFormatter(argparse.HelpFormatter):
    """Examples keep their lines; every option shows its default (flags: off)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if PRESET_NAMES_MARK in help_text:
            help_text = help_text.replace(PRESET_NAMES_MARK, ", ".join(_preset_names()))
        if "default" in help_text or action.default is argparse.SUPPRESS or isinstance(
                action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction,
                         argparse._SubParsersAction._ChoicesPseudoAction)):
            return help_text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{help_text} (default: off)"
        if action.default is None:
            return f"{help_text} (default: none)"
        return f"{help_text} (default: %(default)s)"


def _preset_names() -> list[str]:
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.runtime.presets import PRESETS

    return list(PRESETS)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not a usage dump."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # `--prompt` must never be taken as `--prompt-file`
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory or HF repo id in the local cache "
                                   "(default: $OVIS_LITE_MODEL, then the HF cache of AIDC-AI/Ovis-U1-3B)")
    p.add_argument("--device", type=types.device, default="auto",
                   help="auto, cpu, cuda, cuda:N or mps; auto takes CUDA, then MPS, then the CPU")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="compute dtype; auto: the preset's (bf16 weights, as the reference)")
    p.add_argument("--preset", help="quality-vs-memory preset: " + PRESET_NAMES_MARK +
                                    " (see `ovis-lite presets`; default: the best one for this machine)")
    p.add_argument("--vram", type=types.size, help="choose the preset as if the GPU had this much free memory, "
                                                   "e.g. 6GB (the run still uses the device it finds)")
    p.add_argument("--ram", type=types.size, help="choose the preset as if the host had this much RAM, e.g. 16GB")
    p.add_argument("--threads", type=types.bounded_int(1, 1024),
                   help="CPU threads for torch (default: the number of physical cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, notices or summaries")
    p.add_argument("--json", action="store_true", help="print one JSON object per result on stdout")
    p.add_argument("--no-cache", action="store_true",
                   help="keep nothing between calls (vision, prefix KV and condition caches off)")


def _image_options(p: argparse.ArgumentParser, task: str) -> None:
    txt_cfg = 5.0 if task == "t2i" else 6.0
    p.add_argument("-o", "--output", help="output image; .png keeps the metadata; with several images "
                                          "out.png, out-1.png, ... or a %%d pattern such as out-%%03d.png "
                                          "(default: the first free name of output.png, output-1.png, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("-b", "--num-images", type=types.bounded_int(1, 1000), default=1,
                   help="images per prompt, with seeds SEED, SEED+1, ...")
    p.add_argument("-s", "--seed", type=types.seed, help="noise seed, 0..2**63-1, or `random` / -1 (each "
                                                         "prompt draws its own; the seed used is written to the "
                                                         "metadata and --json; default: 42)")
    p.add_argument("--steps", type=types.bounded_int(1, 1000),
                   help="denoising steps (default: the preset's; the reference uses 50)")
    p.add_argument("--txt-cfg", "--cfg-scale", type=types.finite_float(0, 100),
                   help=f"text guidance scale (default: {txt_cfg})")
    if task == "edit":
        p.add_argument("--img-cfg", type=types.finite_float(0, 100), help="image guidance scale (default: 1.5)")
    branches = ("the no_both pass" if task == "t2i" else
                "the no_txt pass with the source image, and the no_both pass with the white canvas")
    p.add_argument("--negative-prompt", type=types.text,
                   help=f"replaces the text of the unconditional branch of text guidance ({branches}); "
                        "empty: the reference's 'Generate an image.' (default: empty)")
    p.add_argument("--solver", help="flow solver: euler (the reference), heun, dpmpp_2m, unipc "
                                    "(default: the preset's)")
    p.add_argument("--spacing", help="timestep spacing: linear (the reference), logsnr, karras "
                                     "(default: the preset's)")
    p.add_argument("--cfg-interval", type=types.finite_float(0, 1), nargs=2, metavar=("T_LO", "T_HI"),
                   help="apply guidance only for t in [T_LO, T_HI], t=1 is noise (default: the preset's)")
    p.add_argument("--prompt-file", metavar="FILE",
                   help="one prompt per line, one run each (blank lines and lines starting with # skipped); "
                        "- reads stdin (default: none)")
    p.add_argument("--preview", metavar="PATH", help="write a cheap decoded preview of the latent to PATH "
                                                     "while denoising (default: none)")
    p.add_argument("--preview-every", type=types.bounded_int(1), default=1, metavar="K",
                   help="write the preview every K steps")
    p.add_argument("--config-from-metadata", metavar="IMAGE",
                   help="rerun with the settings stored in an earlier ovis-lite PNG; explicit options "
                        "still override (default: none)")


def _ask_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image to ask about; repeat it for several (default: none)")
    p.add_argument("--max-new-tokens", type=types.bounded_int(1), default=1024,
                   help="most tokens in an answer; refused past the model's context")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (at temperature 0.7 "
                                                         "unless --temperature is given)")
    p.add_argument("--temperature", type=types.finite_float(0, 100),
                   help="sampling temperature; > 0 samples (as the API and the page do), 0 decodes greedily "
                        "(default: greedy; 0.7 with --sample)")
    p.add_argument("--top-p", type=types.finite_float(0, 1, low_open=True), default=0.9,
                   help="nucleus sampling mass, when sampling")
    p.add_argument("-s", "--seed", type=types.seed, default=42,
                   help="sampling seed, when sampling (or `random` / -1)")
    p.add_argument("--llm-engine", type=types.llm_engine, metavar="ENGINE",
                   help="what runs the LLM: torch (default), or llama.cpp[:FORMAT] on the CPU (optional package "
                        "llama-cpp-python; FORMAT q4_0 by default, or q4_k_m, q5_k_m, q6_k, q8_0, bf16, f32; the "
                        "LLM is converted once and cached)")


def _add_task_parsers(sub: Any) -> None:
    ask = sub.add_parser("ask", help="answer a question about images (streams to stdout)",
                         description="Answer a question about zero or more images; the answer streams.",
                         epilog=_examples('ovis-lite ask cat.png "What is it?"',
                                          'ovis-lite ask --image a.png --image b.png "Describe each image."',
                                          'ovis-lite ask "Write a haiku about snow." --max-new-tokens 64'))
    ask.add_argument("inputs", nargs="*", metavar="[IMAGE...] QUESTION",
                     help="zero or more images, then the question (default: required)")
    _ask_options(ask)
    _runtime_options(ask)

    chat = sub.add_parser("chat", help="multi-turn chat about images on stdin/stdout (scriptable)",
                          description="A multi-turn chat; the model stays loaded. Commands: /image PATH attaches "
                                      "an image to the next question, /clear starts over, /save FILE writes the "
                                      "transcript as JSON, /quit ends (so does end of input).",
                          epilog=_examples("ovis-lite chat --image cat.png",
                                           "printf '/image cat.png\\nWhat is it?\\n/quit\\n' | ovis-lite chat"))
    chat.add_argument("images", nargs="*", metavar="IMAGE", help="images for the first question (default: none)")
    _ask_options(chat)
    _runtime_options(chat)

    gen = sub.add_parser("generate", help="text-to-image",
                         description="Text-to-image. W and H are floored to multiples of 16.",
                         epilog=_examples('ovis-lite generate "a red fox in the snow" -o fox.png',
                                          'ovis-lite generate -p "a red fox" -W 768 -H 512 -s -1',
                                          'ovis-lite generate "a red fox" -o fox.png -b 3 --seed random',
                                          'ovis-lite generate "a fox" -o fox.png --negative-prompt "blurry"',
                                          "ovis-lite generate --prompt-file prompts.txt -o out-%03d.png",
                                          "ovis-lite generate --config-from-metadata fox.png -o fox2.png "
                                          "--steps 30"))
    gen.add_argument("prompt", nargs="?", type=types.text,
                     help="what to draw (default: required unless --prompt-file or --config-from-metadata)")
    gen.add_argument("-p", "--prompt", dest="prompt_option", metavar="PROMPT", type=types.text,
                     help="the prompt as an option, as sd.cpp and mflux take it (default: none)")
    gen.add_argument("-W", "--width", type=types.bounded_int(16, 4096),
                     help="image width, floored to /16 (default: 1024)")
    gen.add_argument("-H", "--height", type=types.bounded_int(16, 4096),
                     help="image height, floored to /16 (default: 1024)")
    _image_options(gen, "t2i")
    _runtime_options(gen)

    edit = sub.add_parser("edit", help="edit an image by instruction",
                          description="Edit an image by instruction; the output size is smart_resize(factor 32) "
                                      "of the input (about 1 MP at most).",
                          epilog=_examples('ovis-lite edit cat.png "add a hat to this cat." -o cat_hat.png',
                                           'ovis-lite edit cat.png "make it night" -o night.png -b 2'))
    edit.add_argument("image", help="the image to edit (default: required)")
    edit.add_argument("instruction", nargs="?", type=types.text,
                      help="what to change (default: required unless --prompt-file or --config-from-metadata)")
    edit.add_argument("-p", "--prompt", dest="prompt_option", metavar="INSTRUCTION", type=types.text,
                      help="the instruction as an option (default: none)")
    _image_options(edit, "edit")
    _runtime_options(edit)


def _add_tool_parsers(sub: Any) -> None:
    demo = sub.add_parser("demo", help="run all three tasks on a tiny random model (shows the runtime)",
                          epilog=_examples("ovis-lite demo", "ovis-lite demo --out /tmp/demo --overwrite"))
    demo.add_argument("--out", default="ovis-lite-demo", help="folder for the demo images")
    demo.add_argument("--overwrite", action="store_true", help="replace demo images already in --out")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    tiny = sub.add_parser("make-tiny", help="write a seeded tiny random checkpoint in the HF layout",
                          epilog=_examples("ovis-lite make-tiny /tmp/tiny", "ovis-lite make-tiny /tmp/tiny --seed 3"))
    tiny.add_argument("out", help="a new or empty folder (default: required)")
    tiny.add_argument("--seed", type=types.bounded_int(0, types.MAX_SEED), default=0, help="weight seed")
    tiny.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="stored dtype")
    tiny.add_argument("--overwrite", action="store_true", help="replace a non-empty folder's checkpoint")

    insp = sub.add_parser("inspect", help="parameters and bytes per component; reads no weights",
                          epilog=_examples("ovis-lite inspect", "ovis-lite inspect --preset balanced --json",
                                           "ovis-lite inspect --model DIR --tensors"))
    src = insp.add_mutually_exclusive_group()
    src.add_argument("--config", help="a config.json (default: the real Ovis-U1-3B config)")
    src.add_argument("--model", help="a checkpoint directory (default: none)")
    insp.add_argument("--tensors", action="store_true", help="list every tensor and its shape")
    insp.add_argument("--preset", help="report the bytes of this preset's quantized layout: " + PRESET_NAMES_MARK +
                                       " (default: none, bf16)")
    insp.add_argument("--json", action="store_true", help="print JSON")

    presets = sub.add_parser("presets", help="the presets and their planned peak memory at 1024x1024",
                             epilog=_examples("ovis-lite presets", "ovis-lite presets --device cpu --json"))
    presets.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                         help="plan for this kind of device; a preset made for other devices is planned for its "
                              "own; auto: the one found here")
    presets.add_argument("--config", help="a config.json (default: the real Ovis-U1-3B config)")
    presets.add_argument("--json", action="store_true", help="print JSON")
    presets.add_argument("--markdown", action="store_true",
                         help="print the README's table (each preset planned for its own device)")

    plan = sub.add_parser("plan", help="the offload plan for a task, size and budget; reads no weights",
                          description="Plan a run without loading anything. Alone: the preset a run on this "
                                      "machine would choose (--vram/--ram: on the machine they describe). With "
                                      "--budget alone, bf16 weights page through that much GPU memory, or, when "
                                      "bf16 cannot fit, the most precise preset that fits it. With --preset, that "
                                      "preset's precision and sampler, at --budget if given, else its own budget.",
                          epilog=_examples("ovis-lite plan --task t2i",
                                           "ovis-lite plan --task t2i --ram 8GB",
                                           "ovis-lite plan --task t2i --budget 4GB --device cuda",
                                           "ovis-lite plan --task edit --budget 3GB --device cuda --json",
                                           "ovis-lite plan --preset tiny --budget 3GB",
                                           "ovis-lite plan --preset cpu --task understand"))
    src = plan.add_mutually_exclusive_group()
    src.add_argument("--config", help="a config.json (default: the real Ovis-U1-3B config)")
    src.add_argument("--model", help="a checkpoint directory (default: none)")
    plan.add_argument("--task", choices=("understand", "t2i", "edit"), default="t2i", help="the task")
    plan.add_argument("--width", type=types.bounded_int(16, 4096), default=1024, help="image width")
    plan.add_argument("--height", type=types.bounded_int(16, 4096), default=1024, help="image height")
    plan.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                      help="plan for this kind of device; auto: a --preset's own device, else the one found here")
    plan.add_argument("--budget", type=types.size, help="GPU budget the weights page through, with a unit, e.g. "
                                                        "4GB or 512MB (default: the preset's, or all resident)")
    plan.add_argument("--vram", type=types.size, help="without --preset: choose the preset a run would choose "
                                                      "on a GPU with this much free memory, e.g. 6GB")
    plan.add_argument("--ram", type=types.size, help="without --preset: choose the preset a run would choose "
                                                     "on a host with this much RAM, e.g. 8GB")
    plan.add_argument("--preset", help="plan with this preset's precision and sampler: " + PRESET_NAMES_MARK +
                                       " (default: none)")
    plan.add_argument("--json", action="store_true", help="print JSON")

    quant = sub.add_parser("quantize", help="write a pre-quantized checkpoint for a preset",
                           epilog=_examples("ovis-lite quantize --model path/to/Ovis-U1-3B --preset balanced "
                                            "--out ovis-balanced"))
    quant.add_argument("--model", help="the source checkpoint directory (default: $OVIS_LITE_MODEL, then the HF cache)")
    quant.add_argument("--preset", required=True, help="the preset whose precision to apply: " + PRESET_NAMES_MARK +
                                                       " (default: required)")
    quant.add_argument("--out", required=True, help="a new (or empty) output directory (default: required)")
    quant.add_argument("--device", default="cuda", choices=("cuda", "mps", "cpu"),
                       help="the device the checkpoint is meant for (picks the kernels)")
    quant.add_argument("--quiet", action="store_true", help="no progress bars")

    info = sub.add_parser("info", help="print the generation settings stored in an image",
                          epilog=_examples("ovis-lite info fox.png", "ovis-lite info fox.png --json"))
    info.add_argument("image", help="an image written by ovis-lite (default: required)")
    info.add_argument("--json", action="store_true", help="print JSON")


SERVE_HELP = "keep one model resident behind a local HTTP API and a web page (`ovis-lite serve --help`)"


def _add_serve_parser(sub: Any, command: str | None) -> None:
    """`serve`'s own options (from lite.server) are added only when `serve` runs: the other commands list it."""
    if command != "serve":
        sub.add_parser("serve", help=SERVE_HELP, add_help=False)
        return
    add_serve_parser(sub)


def build_parser(argv: list[str] | None = None) -> OneLineParser:
    """The whole parser; `argv` only says whether the server's options are needed (`serve`)."""
    command = next((a for a in argv or [] if not a.startswith("-")), None)
    parser = OneLineParser(
        prog="ovis-lite", description="Low-VRAM runtime for AIDC-AI/Ovis-U1-3B: understand, generate and edit "
                                      "images. `ovis-lite COMMAND --help` shows each command's options.",
        epilog=_examples('ovis-lite ask cat.png "What is it?"',
                         'ovis-lite generate "a red fox in the snow" -o fox.png',
                         'ovis-lite edit cat.png "add a hat to this cat." -o cat_hat.png',
                         "ovis-lite presets", "ovis-lite demo"))
    parser.add_argument("--version", action="version", version=f"ovis-lite {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    _add_task_parsers(sub)
    _add_tool_parsers(sub)
    _add_serve_parser(sub, command)
    return parser
