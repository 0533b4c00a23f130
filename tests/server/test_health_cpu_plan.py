"""`/health` carries the CPU plan of the resident pipeline (`cpu_plan`, null off CPU)."""

from __future__ import annotations

import pytest

from lite.server.app import ServerSettings, create_app


def test_health_shows_the_cpu_plan(tiny_dir) -> None:
    testclient = pytest.importorskip("starlette.testclient")
    from lite import OvisPipeline

    pipe = OvisPipeline.from_pretrained(tiny_dir, device="cpu", preset="cpu", progress=False)
    with testclient.TestClient(create_app(pipe, ServerSettings()), base_url="http://127.0.0.1") as client:
        health = client.get("/health").json()
    plan = health["cpu_plan"]
    assert health["llm_engine"] == "torch"
    assert plan == pipe.cpu_hooks.plan_dict()
    assert plan["compute"]["value"] == ("bf16" if pipe.dtype.is_floating_point and pipe.dtype.itemsize == 2 else "fp32")
    assert plan["packed_layers"] == sum(1 for m in pipe.model.modules() if getattr(m, "weight", None) is not None
                                       and getattr(m.weight, "is_mkldnn", False))
