"""Resolve once, hand objects down: on the CLI's generate path (and the API's load) each of the resolving
functions runs at most once, wherever it is imported from."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch

RESOLVERS = (("lite.model.checkpoint", "find_checkpoint"), ("lite.model.checkpoint", "checkpoint_kind"),
             ("lite.model.config", "load_config"),
             ("lite.runtime.devices", "resolve_device"), ("lite.runtime.devices", "resolve_dtype"),
             ("lite.runtime.presets", "get_preset"))


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count every call of the resolvers: each module of ours that bound one gets the counting wrapper."""
    import lite.cli.run  # noqa: F401 - the CLI path's modules, so that their bindings exist
    import lite.runtime.pipeline  # noqa: F401

    counted: Counter[str] = Counter()

    def counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counted[name] += 1
            return original(*args, **kwargs)

        return wrapper

    for module_name, name in RESOLVERS:
        original = getattr(sys.modules[module_name], name)
        wrapper = counting(name, original)
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith(("lite", "quant", "offload")) and \
                    getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, wrapper)
    return counted


def test_the_cli_generate_path_resolves_each_setting_once(calls, tiny_dir, tmp_path, capsys):
    from lite.cli.main import main

    out = tmp_path / "fox.png"
    code = main(["generate", "a fox", "-o", str(out), "--model", str(tiny_dir), "--device", "cpu", "--dtype", "fp32",
                 "--preset", "cpu", "--steps", "1", "--width", "32", "--height", "32", "--quiet", "--json"])
    assert code == 0, capsys.readouterr().err
    assert out.exists() and json.loads(capsys.readouterr().out)["output"] == str(out)
    assert {name: calls[name] for _, name in RESOLVERS} == {
        "find_checkpoint": 1, "checkpoint_kind": 1, "load_config": 1, "resolve_device": 1, "resolve_dtype": 1,
        "get_preset": 1}


def test_the_api_resolves_once_and_takes_the_same_load(calls, tiny_dir, monkeypatch):
    from lite.runtime.pipeline import OvisPipeline

    loaded: list[Any] = []
    original = OvisPipeline.load.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(OvisPipeline, "load", classmethod(lambda cls, run: (loaded.append(run), original(cls, run))[1]))
    pipe = OvisPipeline.from_pretrained(tiny_dir, device="cpu", dtype="fp32", preset="cpu", progress=False)
    assert len(loaded) == 1 and loaded[0].directory == tiny_dir and loaded[0].dtype == torch.float32
    assert pipe.preset is loaded[0].preset and pipe.pp is loaded[0].preprocessor
    assert all(calls[name] <= 1 for _, name in RESOLVERS), dict(calls)
