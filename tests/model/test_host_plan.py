"""The CPU host plan counts converted weights as anonymous and stored-dtype weights as mapped, per phase.

Expected bytes are counted here from the modules' own parameters, not from the planner's tables.
"""

from __future__ import annotations

import torch
from torch import nn

from lite.model.config import PreprocessorConfig, parse_config
from lite.model.host_plan import RUNTIME_ANON_BYTES, RUNTIME_MAPPED_BYTES, host_plan
from lite.model.memory_profile import (CPU_PLAIN_DECODE_MAPS, CPU_PLAIN_ENCODE_MAPS, VAE_STRIP_BYTES, Workload,
                                       activation_bytes, decode_activation, lean_decode_activation)
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
    assert decode.anon == RUNTIME_ANON_BYTES + plan.weights_anon + act["decode"]
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


def test_the_cpu_decode_is_planned_as_the_lean_decode_runs_it() -> None:
    """The real VAE (128, 256, 512, 512 channels) at 1024x1024 in fp32: the last up block's 1x1 shortcut runs
    whole, so its 256-channel input, oneDNN's blocked copy of it and its 128-channel blocked output are alive
    together: 640 channels of 1024x1024 fp32, 2.5 GiB (2.505 GiB measured, docs/BENCHMARKS.md)."""
    channels = [128, 256, 512, 512]
    assert lean_decode_activation(channels, 1024, 1024, 4) == 640 * 1024 * 1024 * 4
    # Where no shortcut runs whole, the strip-cut moments are the peak: 3 maps and a few strips.
    assert lean_decode_activation([64, 64], 512, 512, 4) == 3 * 64 * 512 * 512 * 4 + 4 * VAE_STRIP_BYTES
    config = parse_config(tiny_config_dict())
    config.vae["block_out_channels"] = channels
    image = 3 * 1024 * 1024 * 4
    cpu = Workload("t2i", 1024, 1024, device_type="cpu", vae_dtype_bytes=4)
    assert decode_activation(config, cpu) == 640 * 1024 * 1024 * 4 + image
    # A tiled decode on a CPU is diffusers' own, one tile at a time.
    tiled = Workload("t2i", 1024, 1024, device_type="cpu", vae_dtype_bytes=4, vae_tile=512)
    assert decode_activation(config, tiled) == int(CPU_PLAIN_DECODE_MAPS * 128 * 512 * 512 * 4) + 2 * image
    # Elsewhere the plain decode's estimate: six maps of the last up block.
    cuda = Workload("t2i", 1024, 1024, device_type="mps", vae_dtype_bytes=4)
    assert decode_activation(config, cuda) == 6 * 128 * 1024 * 1024 * 4 + image
    # An edit also encodes its source in the decode phase, with diffusers' plain encoder (5.0 maps measured).
    edit = Workload("edit", 1024, 1024, device_type="cpu", vae_dtype_bytes=4)
    w, h = edit.output_size
    assert CPU_PLAIN_ENCODE_MAPS == 5.0
    assert decode_activation(config, edit) == max(int(5.0 * 128 * w * h * 4), 640 * w * h * 4) + 3 * w * h * 4
