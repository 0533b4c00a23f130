"""`ovis-lite serve`: one resident model behind a local OpenAI-compatible HTTP API and a web page.

The `serve` command itself (options, checks, loading) is the CLI's: `lite/cli/serve.py`.
"""
