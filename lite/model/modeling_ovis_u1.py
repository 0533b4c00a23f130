"""The top-level Ovis-U1 module: its `state_dict` names are the checkpoint's names.

    OvisU1
    ├── llm                  Qwen3ForCausalLM (modeling_qwen3: transformers' computation; lm_head tied)
    ├── visual_tokenizer     AIMv2 backbone + softmax head          (modeling_aimv2)
    ├── vte                  visual embedding table [65536, 2048]
    └── visual_generator
        ├── backbone         Yak MMDiT                              (modeling_yak)
        └── vae              diffusers AutoencoderKL's weights (4 latent channels); the AutoencoderKL itself is
                             built around them when an image task first runs it (deferred_vae)
"""

from __future__ import annotations

import torch
from torch import nn

from lite.model.architecture import OVIS_U1, Architecture
from lite.model.config import OvisU1Config
from lite.model.deferred_vae import DeferredAutoencoderKL
from lite.model.modeling_aimv2 import VisualEmbedding, VisualTokenizer, indicator_rows
from lite.model.modeling_yak import YakTransformer


class VisualGenerator(nn.Module):
    def __init__(self, config: OvisU1Config) -> None:
        super().__init__()
        self.backbone = YakTransformer(config.yak)
        self.vae = DeferredAutoencoderKL(config.vae)  # diffusers is imported when an image task first needs it


class OvisU1(nn.Module):
    #: components, module paths, block lists, tied keys, bf16 layers, special ids (lite/model/architecture.py)
    architecture: Architecture = OVIS_U1
    _tied_weights_keys = OVIS_U1.tied_weights_keys

    def __init__(self, config: OvisU1Config) -> None:
        super().__init__()
        # transformers' config and cache modules (behind our Qwen3) take ~0.4 s to import: only when a model is built.
        from lite.model.modeling_qwen3 import Qwen3ForCausalLM

        self.config = config
        self.llm = Qwen3ForCausalLM(config.qwen3_config())
        self.visual_tokenizer = VisualTokenizer(config.vision)
        rows, dim = config.vision.vocab_size, config.hidden_size  # given its weight, an Embedding skips `normal_`,
        self.vte = VisualEmbedding(rows, dim, _weight=torch.empty(rows, dim))  # which imports torch._dynamo on meta
        self.visual_generator = VisualGenerator(config)

    # -- understanding side -------------------------------------------------------------------

    def visual_embeddings(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> list[torch.Tensor]:
        """One [N_i/4, H] tensor per image; each image only ever sees itself."""
        embeds = self.visual_tokenizer.embed(pixel_values, grid_thws, self.vte)
        sizes = [int(t * h * w) // (self.config.vision.hidden_stride ** 2) for t, h, w in grid_thws.tolist()]
        return list(embeds.split(sizes))

    def indicator_embeddings(self) -> torch.Tensor:
        """Embeddings for ids -301..-304: vte rows V-5..V-2 (spec §3.3 step 6)."""
        rows = torch.tensor(indicator_rows(self.config.vision.vocab_size), device=self.vte.weight.device)
        return self.vte(rows)

    def merge_multimodal(self, input_ids: torch.Tensor, visual: list[torch.Tensor]) -> torch.Tensor:
        """[L] ids with placeholders -> [1, L', H] LLM input embeddings (spec §3.4)."""
        embed = self.llm.get_input_embeddings()
        text = embed(input_ids.clamp(min=0))
        indicators = self.indicator_embeddings().to(text.dtype)
        for i, ind in enumerate(self.architecture.indicator_ids):
            mask = input_ids == ind
            if mask.any():
                text[mask] = indicators[i]
        atoms = (input_ids == self.architecture.image_atom_id).nonzero().flatten().tolist()
        if len(atoms) != len(visual):
            raise ValueError(f"prompt has {len(atoms)} image placeholders but {len(visual)} images were given")
        pieces, start = [], 0
        for pos, vis in zip(atoms, visual):
            pieces += [text[start:pos], vis.to(text.dtype)]
            start = pos + 1
        pieces.append(text[start:])
        return torch.cat(pieces, 0).unsqueeze(0)

    def condition(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """[final-norm(last layer) ; raw residual after the second-to-last layer]: [1, L, 2H] (spec §3.5)."""
        out = self.llm.model(inputs_embeds=inputs_embeds, output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states
        return torch.cat([hidden[-1], hidden[-2]], dim=-1)
