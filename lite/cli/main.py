"""`ovis-lite`: parse once, run one command, and end every way a Unix tool should.

- A user-fixable error (any `offload.errors.UserError`, caught by type) is one line on stderr, exit 2.
- SIGINT / SIGTERM at any point: one "interrupted" line, exit 130 / 143, no traceback; outputs are
  written atomically, so no partial or temporary file is left.
- A closed stdout (`| head`) ends quietly with exit 141, as a filter killed by SIGPIPE would.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import gc
import importlib.abc
import importlib.util
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from offload.errors import UserError

from lite.cli.parser import EXIT_USAGE, build_parser
from lite.cli.report import user_error_line
from lite.runtime.cpu.threads import early_environment
from lite.cli.serve import run_serve

EXIT_SIGINT, EXIT_SIGTERM, EXIT_PIPE = 130, 143, 141


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same cleanup runs."""


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """The handler of one command, importing only its own module."""
    if name == "serve":
        return run_serve
    if name == "chat":
        from lite.cli.chat import cmd_chat  # PIL, and torch once it runs: never for `--help` or a bad option

        return cmd_chat
    if name in ("ask", "generate", "edit"):
        from lite.cli import run  # PIL, and torch once it runs: never for `--help` or a bad option

        return {"ask": run.cmd_ask, "generate": run.cmd_generate, "edit": run.cmd_edit}[name]
    from lite.cli import tools  # PIL, and torch once it runs: never for `--help` or a bad option

    return {"demo": tools.cmd_demo, "make-tiny": tools.cmd_make_tiny, "inspect": tools.cmd_inspect,
            "info": tools.cmd_info, "presets": tools.cmd_presets, "plan": tools.cmd_plan,
            "quantize": tools.cmd_quantize}[name]


class _FreezeAfterTorch(importlib.abc.MetaPathFinder):
    """Once torch is imported, `gc.freeze()`: for a one-shot process only (the real `ovis-lite` process).

    Why: torch's import leaves ~10^6 objects that live until exit, and every full collection of the cyclic GC
    scans them again (~90 ms each; planning and loading trigger several, and `lite.memory.trim_host_heap`
    collects on purpose): 0.3-0.4 s of `presets`' CPU time. Frozen objects are skipped, never freed (they
    would not be anyway). Not done when `main` runs inside another program (tests), whose objects would leak.
    """

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module: Any) -> None:
                run(module)
                gc.freeze()

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


#: The interrupting signal this run received, if any. An exception raised from a signal handler can come out as
#: another one when it lands inside machinery that replaces it (an import's `except ImportError` building its
#: ImportError: a SIGTERM during diffusers' import ended as "TypeError: expected a message argument"), so `main`
#: asks this, not only the exception's type.
_received: list[int] = []


def _on_sigterm(signum: int, frame: Any) -> None:
    _received.append(signum)
    raise Terminated()


def _on_sigint(signum: int, frame: Any) -> None:
    _received.append(signum)
    raise KeyboardInterrupt()


def _install_signals() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    _received.clear()
    return {signal.SIGTERM: signal.signal(signal.SIGTERM, _on_sigterm),
            signal.SIGINT: signal.signal(signal.SIGINT, _on_sigint)}


def _ignore_signals() -> None:
    """After the first interrupt: a second one must not cut the cleanup short with a traceback."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _silence_stdout() -> None:
    """The reader is gone: point stdout at /dev/null so the final flush cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # in-process (tests): stdout has no descriptor


def _finish(code: int, standalone: bool) -> int:
    """A worker thread (a streamed answer) may still be inside torch: never let the interpreter
    tear it down mid-call (that aborts with "terminate called ..."); leave without finalization."""
    if standalone and threading.active_count() > 1:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    return code


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse once. `ask IMG --image B QUESTION`: words after an option still belong to the positional
    list (argparse stops a `*` positional at the first option)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        dest = {"ask": "inputs", "chat": "images"}.get(args.command or "")
        if dest is None or any(word.startswith("-") and word != "-" for word in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, dest, [*getattr(args, dest), *extra])
    return args


def main(argv: list[str] | None = None) -> int:
    """The `ovis-lite` entry point; `argv=None` means the real process (sys.argv)."""
    standalone = argv is None
    args_list = sys.argv[1:] if argv is None else list(argv)
    # Before torch initialises CUDA: paging units through the device fragments the default allocator.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # Before torch starts OpenMP: its wait policy, from how busy the CPUs are (lite/runtime/cpu/threads.py).
    os.environ.update(early_environment())
    parser = build_parser(args_list)
    if not args_list:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args = _parse(parser, args_list)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    previous = _install_signals()
    if standalone and "torch" not in sys.modules:
        sys.meta_path.insert(0, _FreezeAfterTorch())
    started = time.perf_counter()
    try:
        code = _run(args)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt as exc:
        return _interrupted(EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT, started, standalone)
    except BrokenPipeError:
        _silence_stdout()
        return _finish(EXIT_PIPE, standalone)
    except Exception:
        if not _received:  # a bug: it keeps its traceback
            raise
        return _interrupted(EXIT_SIGTERM if _received[0] == signal.SIGTERM else EXIT_SIGINT, started, standalone)
    finally:
        if not standalone:
            _restore_signals(previous)


def _interrupted(code: int, started: float, standalone: bool) -> int:
    """One "interrupted" line after Ctrl-C or SIGTERM (a second signal is ignored while it is written)."""
    _ignore_signals()
    try:
        sys.stdout.flush()
    except (BrokenPipeError, OSError, ValueError):
        _silence_stdout()
    lead = "\n" if sys.stderr.isatty() else ""  # after a progress bar or a half-printed answer
    name = "SIGTERM" if code == EXIT_SIGTERM else "SIGINT"
    print(f"{lead}ovis-lite: interrupted ({name}) after {time.perf_counter() - started:.1f} s",
          file=sys.stderr, flush=True)
    return _finish(code, standalone)


def _run(args: argparse.Namespace) -> int:
    try:
        return _command(args.command)(args)
    except UserError as exc:
        print(f"ovis-lite: error: {user_error_line(exc)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except FileExistsError as exc:  # an exclusive create lost to another writer
        what = f"{exc.filename} already exists" if exc.filename else str(exc)
        print(f"ovis-lite: error: {what}; choose another name or pass --overwrite", file=sys.stderr, flush=True)
        return EXIT_USAGE
