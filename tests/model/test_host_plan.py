"""The CPU host plan counts converted weights as anonymous and stored-dtype weights as mapped, per phase.

Expected bytes are counted here from the modules' own parameters, not from the planner's tables.
"""

from __future__ import annotations

import torch
from torch import nn

from lite.model.config import PreprocessorConfig, parse_config
from lite.model.host_plan import HOST_VAE_DECODE_FACTOR, RUNTIME_ANON_BYTES, RUNTIME_MAPPED_BYTES, host_plan
from lite.model.memory_profile import Workload, activation_bytes
from lite.model.precision import REFERENCE
from lite.model.skeleton import skeleton_model
from lite.model.tiny import tiny_config_dict


def _bytes(module: nn.Module, itemsize: int = 2) -> int:
    return sum(p.numel() * itemsize for p in module.parameters())


def test_bf16_weights_stored_in_bf16_are_mapped_and_each_phase_holds_its_own() -> None:
    config = parse_config(tiny_config_dict())
    model = skeleton_model(config)
    pp = PreprocessorConfig(min_pixels=3136, max_pixels=12544)
    wl = Workload("t2i", 64, 64, device_type="cpu")
    policy = REFERENCE.policy("cpu")
    assert policy.vae_dtype == torch.float32  # the reference's VAE: cast from the stored bf16, so new memory
    plan = host_plan(model, config, pp, wl, policy)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    vae = model.visual_generator.vae
    assert plan.weights_mapped == _bytes(model) - _bytes(vae)  # every other weight a view of the shards
    assert 0 <= plan.weights_anon - _bytes(vae, 4) <= buffers  # + the buffers (RoPE frequencies)
    act = activation_bytes(config, pp, wl)
    decode = plan.phases["decode"]
    assert decode.mapped == RUNTIME_MAPPED_BYTES
    assert decode.anon == RUNTIME_ANON_BYTES + plan.weights_anon + int(act["decode"] * HOST_VAE_DECODE_FACTOR)
    assert HOST_VAE_DECODE_FACTOR > 1  # the measured CPU decode holds more than the six maps counted
    denoise = plan.phases["denoise"]
    assert denoise.mapped == RUNTIME_MAPPED_BYTES + _bytes(model.visual_generator.backbone)
    conditions = plan.phases["conditions"].mapped - RUNTIME_MAPPED_BYTES
    understanding = _bytes(model.llm) + _bytes(model.visual_tokenizer) + _bytes(model.vte)
    assert understanding < conditions < understanding + _bytes(model.visual_generator.backbone)  # + the refiner
    assert plan.peak.total == max(p.total for p in plan.phases.values())


def test_weights_stored_wider_are_converted_so_anonymous_unless_kept_wide() -> None:
    config = parse_config(tiny_config_dict())
    model = skeleton_model(config)
    wl = Workload("understand", 64, 64, device_type="cpu", max_new_tokens=8)
    plan = host_plan(model, config, PreprocessorConfig(), wl, REFERENCE.policy("cpu"),
                     stored=lambda _name: torch.float32)
    vae = model.visual_generator.vae
    assert plan.weights_mapped == _bytes(vae, 4)  # the fp32 VAE stays as stored: a view of the shard
    converted = _bytes(model) - _bytes(vae)  # every other weight cast to bf16
    assert 0 <= plan.weights_anon - converted <= sum(b.numel() * b.element_size() for b in model.buffers())
    assert set(plan.phases) == {"load", "conditions"}  # understanding neither denoises nor decodes
