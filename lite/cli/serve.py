"""`ovis-lite serve`: check the options, load the model once, serve it with uvicorn until stopped.

Everything that can be refused is refused before the model loads: a non-loopback --host without
--api-key (or --insecure), a port in use, nonsensical limits.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
from typing import Any

from offload.errors import UserError

from lite.cli import types
from lite.cli.runconfig import load_pipeline, resolve_run
from lite.errors import InputError
from lite.server.trust import Trust, normal_origin

EXAMPLE = """example:
  ovis-lite serve --preset low --port 8000
  then open http://127.0.0.1:8000/ , or from another device: ssh -N -L 8000:127.0.0.1:8000 you@this-machine
  (the server binds to loopback; a non-loopback --host needs --api-key KEY, or an explicit --insecure)"""


def add_serve_parser(subparsers: Any) -> None:
    """Add the `serve` subcommand (its handler is `run_serve`)."""
    p = subparsers.add_parser("serve", help="keep one model resident behind a local OpenAI-compatible HTTP API "
                                            "and a web page",
                              description="Load the model once and serve understanding, text-to-image and "
                                          "editing over HTTP: OpenAI-compatible routes, a job queue with "
                                          "progress, and a web page at /.",
                              epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory or HF repo id in the local cache "
                                   "(default: $OVIS_LITE_MODEL, then the HF cache of AIDC-AI/Ovis-U1-3B)")
    p.add_argument("--preset", help="quality-vs-memory preset (see `ovis-lite presets`; default: chosen for this machine)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="compute dtype (default: auto, the preset's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("OVIS_LITE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics "
                        "(default: $OVIS_LITE_API_KEY, else none)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without --api-key (anyone who reaches it can use it)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also serve requests whose Host header is NAME (repeatable; '*.example.com' for a domain, "
                        "'*' for any). By default only loopback names and the bound address are served: "
                        "a guard against DNS rebinding")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API (repeatable; '*' for "
                        "any). By default requests carrying another site's Origin are refused")
    p.add_argument("--max-queue", type=int, default=16, help="jobs that may wait for the device (default: 16)")
    p.add_argument("--max-body-mb", type=float, default=25.0, help="largest request body in MiB (default: 25)")
    p.add_argument("--max-image-pixels", type=int, default=16 * 2**20,
                   help="largest uploaded image, width*height (default: 16777216)")
    p.add_argument("--max-prompt-chars", type=int, default=16000,
                   help="longest prompt, or a conversation's text, in characters (default: 16000)")
    p.add_argument("--max-side", type=int, default=2048, help="largest generated width or height (default: 2048)")
    p.add_argument("--max-n", type=int, default=4, help="most images per request (default: 4)")
    p.add_argument("--max-steps", type=int, default=200, help="most denoising steps per request (default: 200)")
    p.add_argument("--max-tokens", type=int, default=2048, help="most new tokens per answer (default: 2048)")
    p.add_argument("--vram", help="choose the preset as if the GPU had this much free memory, e.g. 6GB")
    p.add_argument("--ram", help="choose the preset as if the host had this much RAM, e.g. 16GB")
    p.add_argument("--llm-engine", type=types.llm_engine, metavar="ENGINE",
                   help="what runs the LLM of chat: torch (default), or llama.cpp[:FORMAT] on the CPU (optional "
                        "package llama-cpp-python; see `ovis-lite ask --help`)")
    p.add_argument("--no-cache", action="store_true",
                   help="keep nothing between requests (vision, prefix KV and condition caches off)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: the number of physical cores)")
    p.add_argument("--quiet", action="store_true", help="no load report and no access log")
    p.set_defaults(func=run_serve, command="serve")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_args(args: argparse.Namespace) -> Any:
    """Refuse bad options before anything loads; returns the Limits."""
    from lite.server.openai_schema import Limits  # torch behind it: not before the options are checked

    if not is_loopback(args.host) and not args.api_key and not args.insecure:
        raise InputError(f"--host {args.host} is not a loopback address, so anyone who can reach this machine could "
                         f"use the server; add --api-key KEY (or --insecure to serve it without a key)")
    if args.api_key is not None and not args.api_key.strip():
        raise InputError("--api-key is empty; give a non-empty key")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be between 0 and 65535, got {args.port}")
    for name in ("max_queue", "max_image_pixels", "max_prompt_chars", "max_n", "max_steps", "max_tokens"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    if not 16 <= args.max_side <= 4096:
        raise InputError(f"--max-side must be between 16 and 4096, got {args.max_side}")
    if not args.max_body_mb > 0:
        raise InputError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    for origin in getattr(args, "cors_origin", []):
        if origin != "*" and normal_origin(origin) is None:
            raise InputError(f"--cors-origin {origin!r} is not a web origin; give scheme://host[:port], "
                             "e.g. http://localhost:3000")
    for name in getattr(args, "allowed_host", []):
        if not name.strip() or "/" in name:
            raise InputError(f"--allowed-host {name!r} is not a host name; give a name such as my-box.lan")
    return Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_image_pixels=args.max_image_pixels,
                  max_prompt_chars=args.max_prompt_chars, max_side=args.max_side, max_n=args.max_n,
                  max_steps=args.max_steps, max_tokens=args.max_tokens, max_queue=args.max_queue)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def load(args: argparse.Namespace) -> Any:
    """The CLI's own resolution (preset chosen for this machine, checked to fit) and loader."""

    for name, default in (("json", False), ("vram", None), ("ram", None), ("threads", None)):
        if not hasattr(args, name):
            setattr(args, name, default)
    if isinstance(args.vram, str) or isinstance(args.ram, str):
        args.vram = types.size(args.vram) if isinstance(args.vram, str) else args.vram
        args.ram = types.size(args.ram) if isinstance(args.ram, str) else args.ram
    run = resolve_run(args, "t2i", 1024, 1024)
    run.resolved.progress = False  # bars would only clutter a server's log
    pipe = load_pipeline(run, args)
    pipe.vae  # diffusers imported at start-up: inside the first image job it delayed /health (0.2 s, 1-1.45 s loaded)
    return pipe


def run_serve(args: argparse.Namespace) -> int:
    """Check, bind, load, serve; SIGTERM/SIGINT cancel the running job and stop within a few seconds."""
    limits = check_args(args)
    sock = bind(args.host, args.port)  # a busy port is refused before the model loads
    # uvicorn, and the app with torch behind it, only once the options passed and the port is bound.
    import uvicorn
    from lite.server.app import ServerSettings, create_app

    pipe = load(args)
    trust = Trust.for_bind(args.host, args.allowed_host, args.cors_origin)
    settings = ServerSettings(limits=limits, api_key=args.api_key or None, device=str(pipe.device), trust=trust)
    app = create_app(pipe, settings)
    server_state = app.state.server
    config = uvicorn.Config(app, log_level="warning" if args.quiet else "info", access_log=not args.quiet,
                            timeout_graceful_shutdown=3, timeout_keep_alive=5, lifespan="off")

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            server_state.queue.close()  # the running job stops at its next step; queued ones are dropped
            super().handle_exit(sig, frame)

    server = Uvicorn(config)
    sock.listen(2048)  # from now on connections wait in the backlog until uvicorn accepts them
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"ovis-lite: serving {pipe.model_id} ({getattr(pipe.preset, 'name', 'no preset')}) on "
          f"http://{shown}:{port}/", flush=True)
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler makes that a clean exit 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        server_state.queue.close()
        server_state.parsers.shutdown(wait=False, cancel_futures=True)
        server_state.queue.join(5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m lite.server`: the serve command on its own (the CLI registers the same parser)."""
    parser = argparse.ArgumentParser(prog="ovis-lite")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "serve":
        argv = ["serve", *argv]
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"ovis-lite: error: {exc}", file=sys.stderr)
        return 2
