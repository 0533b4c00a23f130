"""The planning skeleton is the real model's tree, and the table commands never import the heavy libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources

import pytest
from torch import nn

from lite.model.config import load_config, parse_config
from lite.model.skeleton import skeleton_model

from tests.conftest import REPO


def _real_dict() -> dict:
    return json.loads(resources.files("lite").joinpath("data/config.json").read_text())


def _variant() -> dict:
    """A config no shipped checkpoint has: untied head, biased attention, 3 VAE levels, no mid attention."""
    cfg = _real_dict()
    llm = cfg["llm_config"]
    llm.update(num_hidden_layers=2, tie_word_embeddings=False, attention_bias=True, num_key_value_heads=4)
    vae = cfg["visual_generator_config"]["vae_config"] if "vae_config" in cfg["visual_generator_config"] else None
    assert vae is not None, "the shipped config keeps the VAE config under visual_generator_config.vae_config"
    vae.update(block_out_channels=[64, 128, 128], down_block_types=["DownEncoderBlock2D"] * 3,
               up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, mid_block_add_attention=False)
    return cfg


def _tree(model: nn.Module) -> tuple[list, list, list]:
    params = [(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()]
    buffers = [(n, tuple(b.shape), b.dtype) for n, b in model.named_buffers()]
    kinds = [(n, "linear" if isinstance(m, nn.Linear) else "embedding" if isinstance(m, nn.Embedding) else "")
             for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    return params, buffers, kinds


@pytest.mark.parametrize("which", ["real", "tiny", "variant"])
def test_the_skeleton_is_the_real_module_tree(which: str, tiny_dir) -> None:
    # The independent computation is the real model itself, built by transformers and diffusers on meta.
    from lite.model.sizes import meta_model

    config = {"real": lambda: parse_config(_real_dict()), "tiny": lambda: load_config(tiny_dir),
              "variant": lambda: parse_config(_variant())}[which]()
    real, skeleton = meta_model(config), skeleton_model(config)
    assert _tree(skeleton) == _tree(real)
    tied = config.llm.get("tie_word_embeddings", True)
    assert (skeleton.llm.lm_head.weight is skeleton.llm.model.embed_tokens.weight) == tied
    assert list(skeleton.state_dict()) == list(real.state_dict())


# (lite.model.modeling_ovis_u1 itself is light: it imports transformers and diffusers only to build a model.)
_HEAVY = ("diffusers", "bitsandbytes", "torch._dynamo", "torch._inductor", "transformers.modeling_utils",
          "transformers.models.qwen3.modeling_qwen3", "optimum.quanto")


@pytest.mark.parametrize("argv", [["presets"], ["plan", "--preset", "balanced", "--task", "t2i"],
                                  ["inspect", "--preset", "cpu", "--tensors"]])
def test_the_table_commands_import_no_model_library(argv: list[str]) -> None:
    probe = (
        "import sys\n"
        "from lite.cli import main\n"
        f"code = main({argv!r})\n"
        "assert code in (0, None), code\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {{h.split('.')[0] for h in {_HEAVY!r}}} "
        f"and any(m == h or m.startswith(h + '.') for h in {_HEAVY!r}))\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
        "assert not heavy, heavy\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip(), "the command printed nothing"


def test_the_spelled_out_activation_names_are_the_libraries_own() -> None:
    from diffusers.models.activations import ACT2CLS
    from transformers.activations import ACT2FN

    from lite.model.config import LLM_ACTIVATIONS, VAE_ACTIVATIONS

    assert set(LLM_ACTIVATIONS) <= set(ACT2FN)
    assert set(VAE_ACTIVATIONS) == set(ACT2CLS)


def test_the_skeleton_cuts_units_once_per_layout_and_each_cut_equals_a_fresh_one() -> None:
    # Independent: offload's build_units on the same skeleton, every time from scratch (no cache).
    from offload import build_units

    from lite.model.architecture import OVIS_U1
    from lite.model.memory_profile import Workload, ovis_units, unit_specs

    model = skeleton_model(parse_config(_real_dict()))

    def key(u):
        slots = tuple((id(s.module), s.name, s.is_param) for s in u.slots)
        return (u.name, u.component, slots, tuple(map(id, u.entry_modules)), id(u.exit_module), u.nbytes,
                u.phases, u.uses, u.outer)

    for wl in (Workload("t2i", nfe=16), Workload("edit", nfe=30), Workload("understand", max_new_tokens=7),
               Workload("t2i", nfe=3)):
        for group in (4, 2, 1):
            fresh = build_units(OVIS_U1.component_modules(model), unit_specs(wl, group, 1))
            assert [key(u) for u in ovis_units(model, wl, llm_group=group)] == [key(u) for u in fresh]
    assert len(model.planning_units) == 3  # one cut per LLM grouping, whatever the workload
