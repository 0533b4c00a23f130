"""Our Qwen3 decoder computes exactly what transformers' Qwen3ForCausalLM computes (bitwise), and imports none
of transformers' modeling code."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lite.model.config import parse_config
from lite.model.modeling_qwen3 import Qwen3ForCausalLM
from lite.model.tiny import tiny_config_dict
from lite.runtime.kv_cache import new_cache, snapshot

VARIANTS = {
    "tiny": {},  # grouped-query attention (4 heads over 2), tied head
    "biased, untied, no groups": {"attention_bias": True, "num_key_value_heads": 4, "tie_word_embeddings": False},
    "linear rope": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
}


def _pair(variant: dict, dtype: torch.dtype):
    """(transformers' model, ours) with the same seeded weights; the independent computation is transformers'."""
    from transformers import Qwen3ForCausalLM as Reference

    raw = tiny_config_dict()
    raw["llm_config"].update(variant)
    config = parse_config(raw).qwen3_config()
    torch.manual_seed(0)
    reference = Reference(config).to(dtype).eval()
    with torch.no_grad():  # wider than the init so that near-ties do not hide a difference
        for p in reference.parameters():
            p.normal_(0, 0.3)
    ours = Qwen3ForCausalLM(config).to(dtype).eval()
    ours.load_state_dict(reference.state_dict())
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in reference.named_buffers()]
    for (name, a), (_, b) in zip(ours.named_buffers(), reference.named_buffers()):
        assert torch.equal(a, b), name
    return reference, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hidden_states_and_cached_decoding_are_bitwise_transformers(variant: str, dtype: torch.dtype) -> None:
    reference, ours = _pair(VARIANTS[variant], dtype)
    embeds = torch.randn(1, 9, reference.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        a = reference.model(inputs_embeds=embeds, output_hidden_states=True, use_cache=False)
        b = ours.model(inputs_embeds=embeds, output_hidden_states=True, use_cache=False)
        assert len(a.hidden_states) == len(b.hidden_states) == reference.config.num_hidden_layers + 1
        for x, y in zip(a.hidden_states, b.hidden_states):
            assert torch.equal(x, y)
        assert torch.equal(a.last_hidden_state, b.last_hidden_state)
        # Prefill into the runtime's KV cache, decode, then a second prompt reusing a 6-position prefix
        # (the masked multi-row path), exactly as lite.runtime.understanding drives the model.
        layers = reference.config.num_hidden_layers
        caches = {"ref": new_cache(layers, 16), "ours": new_cache(layers, 16)}
        logits = {}
        for key, model in (("ref", reference), ("ours", ours)):
            out = [model(inputs_embeds=embeds, cache=caches[key], use_cache=True, logits_to_keep=1).logits]
            for token in (5, 17, 3):
                out.append(model(input_ids=torch.tensor([[token]]), cache=caches[key], use_cache=True,
                                 logits_to_keep=1).logits)
            snap = snapshot(caches[key], tuple(range(6)))
            cache = new_cache(layers, 16, snap, 6)
            out.append(model(inputs_embeds=embeds[:, 3:], cache=cache, use_cache=True, logits_to_keep=2).logits)
            out.append(model(input_ids=torch.tensor([[7]]), cache=cache, use_cache=True).logits)
            logits[key] = out
        for x, y in zip(logits["ref"], logits["ours"]):
            assert x.shape == y.shape and torch.equal(x, y)


def test_building_and_running_imports_no_transformers_modeling_nor_dynamo() -> None:
    probe = ("import sys, torch\n"
             "from lite.model.config import parse_config\nfrom lite.model.tiny import tiny_config_dict\n"
             "from lite.model.modeling_qwen3 import Qwen3ForCausalLM\n"
             "with torch.device('meta'):\n    Qwen3ForCausalLM(parse_config(tiny_config_dict()).qwen3_config())\n"
             "m = Qwen3ForCausalLM(parse_config(tiny_config_dict()).qwen3_config())\n"
             "m(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)\n"
             "heavy = ('transformers.modeling_utils', 'transformers.masking_utils', 'torch._dynamo', 'torch._inductor')\n"
             "print('IMPORTED=' + ','.join(h for h in heavy if h in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "IMPORTED=", proc.stdout
