"""`ovis-lite chat`: a multi-turn conversation on stdin/stdout; the model stays loaded between turns.

Lines are questions; `/image PATH` attaches an image to the next question, `/clear` starts over,
`/save FILE` writes the transcript as JSON, `/quit` (or end of input) ends. It reads a pipe as well
as a terminal, so it can be scripted. The conversation keeps one image list, as the reference does:
every image of every turn, in order, with its placeholder in the turn that attached it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from offload.errors import UserError

from lite.cli.report import answer_result, count_tokens, notice, say, summary, user_error_line
from lite.cli.run import resolve_decoding, resolve_seed, stream_answer
from lite.cli.runconfig import check_max_new_tokens, load_pipeline, resolve_run
from lite.cli.types import utf8_problem
from lite.errors import InputError, OutputError
from lite.model.images import load_image
from lite.runtime.outputs import atomic_write

HELP = "commands: /image PATH (attach to the next question), /clear, /save FILE, /stats, /quit"


@dataclass
class Conversation:
    """The turns so far and the whole conversation's images (earlier turns' first)."""

    images: list[Any] = field(default_factory=list)
    image_paths: list[str] = field(default_factory=list)
    history: list[Any] = field(default_factory=list)  # lite.model.processing.Turn
    pending: list[tuple[str, Any]] = field(default_factory=list)  # attached to the next question

    def clear(self) -> None:
        self.images.clear()
        self.image_paths.clear()
        self.history.clear()
        self.pending.clear()

    def transcript(self) -> dict[str, Any]:
        turns, start = [], 0
        for turn in self.history:
            turns.append({"question": turn.question, "answer": turn.answer,
                          "images": self.image_paths[start:start + turn.num_images]})
            start += turn.num_images
        return {"turns": turns}


def _read_line(stream: TextIO, interactive: bool) -> str | None:
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
    line = stream.readline()
    return None if line == "" else line.rstrip("\r\n")


def _save(conv: Conversation, target: str) -> str:
    path = Path(target)
    if path.exists() or path.is_symlink():
        raise OutputError(f"{path} already exists; /save to a new file")
    data = json.dumps(conv.transcript(), indent=2, ensure_ascii=False).encode("utf-8")
    atomic_write(path, lambda f: f.write(data))
    return str(path)


def _cache_line(caches: dict[str, Any]) -> str:
    """One line of the caches' counts: `/stats` in the chat."""
    parts = [f"{name} {c['hits']} hits / {c['misses']} misses, {c['entries']} entries, {c['bytes'] / 2**20:.1f} MiB"
             for name, c in caches.items() if isinstance(c, dict)]
    state = "" if caches.get("enabled", True) else " (off: --no-cache)"
    return f"caches{state}: " + "; ".join(parts)


def _command(conv: Conversation, line: str, args: argparse.Namespace, pipe: Any = None) -> bool:
    """Handle a /command; False ends the chat."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/clear":
        conv.clear()
        notice(args, "conversation cleared")
    elif name == "/image":
        if not rest:
            raise InputError("/image needs a path: /image cat.png")
        conv.pending.append((rest, load_image(rest)))
        notice(args, f"attached {rest} to the next question")
    elif name == "/save":
        if not rest:
            raise InputError("/save needs a file name: /save chat.json")
        notice(args, f"saved the transcript to {_save(conv, rest)}")
    elif name == "/stats" and pipe is not None:
        notice(args, _cache_line(pipe.caches.stats()))
    elif name == "/help":
        notice(args, HELP)
    else:
        raise InputError(f"unknown command {name}; {HELP}")
    return True


def _ask(pipe: Any, conv: Conversation, question: str, args: argparse.Namespace, preset: str, seed: int) -> None:
    # heavy: torch is behind it, so only once the command runs (the CLI parses and sets threads first)
    from lite.model.processing import Turn

    new = conv.pending[:]
    images = conv.images + [img for _, img in new]
    pieces = pipe.understand(images, question, history=list(conv.history), max_new_tokens=args.max_new_tokens,
                             do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, stream=True,
                             seed=seed)
    answer = stream_answer(pieces, echo=not args.json)
    conv.pending.clear()
    conv.images.extend(img for _, img in new)
    conv.image_paths.extend(path for path, _ in new)
    conv.history.append(Turn(question, answer, num_images=len(new)))
    stats = pieces.stats
    tokens = count_tokens(stats, pipe.tokenizer, answer)
    summary(args, stats, None, f", {tokens} tokens")
    if args.json:
        print(answer_result(stats, answer, tokens, preset, seed if args.sample else None), flush=True)


def cmd_chat(args: argparse.Namespace) -> int:
    resolve_decoding(args)  # a temperature > 0 samples, as in `ask`, the API and the page
    paths = [*args.image, *args.images]  # attached to the first question
    conv = Conversation()
    conv.pending = [(p, load_image(p)) for p in paths]
    seed = resolve_seed(args.seed)
    run = resolve_run(args, "understand", 448, 448)
    check_max_new_tokens(run.config, args.max_new_tokens)
    pipe = load_pipeline(run, args)
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:  # bytes that are not UTF-8 become one error line, not a traceback
        reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    say(args, f"ovis-lite: chat ready; {HELP}")
    while True:
        line = _read_line(sys.stdin, interactive)
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        try:
            problem = utf8_problem("the line", line)
            if problem:
                raise InputError(problem)
            if line.startswith("/"):
                if not _command(conv, line, args, pipe):
                    break
                continue
            _ask(pipe, conv, line, args, run.preset.name, seed)
        except UserError as exc:  # one bad line does not end the conversation
            print(f"ovis-lite: error: {user_error_line(exc)}", file=sys.stderr, flush=True)
    return 0
