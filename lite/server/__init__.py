"""`ovis-lite serve`: one resident model behind a local OpenAI-compatible HTTP API and a web page."""

from lite.server.command import add_serve_parser, run_serve

__all__ = ["add_serve_parser", "run_serve"]
