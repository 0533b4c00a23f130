"""The `ovis-lite` command line: parse once, resolve a run configuration, hand it to the pipeline."""

from lite.cli.main import main

__all__ = ["main"]
