"""What Ovis-U1 *is*, declared once: components, their module paths, block lists, tied keys, the layers the
quantizing presets keep in bf16, and the special token ids. `OvisU1` declares it as `OvisU1.architecture`
(as transformers' models declare `_tied_weights_keys` and `_no_split_modules`); everything else reads it.

It is kept free of torch and of the modeling code, so that config arithmetic (`presets`, `plan`) and
prompt processing can read it without importing the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping


def _frozen(d: dict) -> Mapping:
    return MappingProxyType(d)


@dataclass(frozen=True)
class Architecture:
    #: component -> qualified module path in the model (its state-dict prefix, without the dot)
    components: Mapping[str, str]
    #: component -> the ModuleLists of repeated blocks inside it (paths relative to the component)
    block_lists: Mapping[str, tuple[str, ...]]
    #: parameters that alias another and are absent from (or ignored in) the checkpoint
    tied_weights_keys: tuple[str, ...]
    #: the token embedding and the LM head that shares its weight
    embed_module: str
    head_module: str
    #: the visual embedding table (a soft lookup: probabilities @ table)
    vte_module: str
    #: Yak layers kept in bf16 by every quantizing preset (relative to the Yak root)
    yak_keep_bf16: tuple[str, ...]
    #: Yak's adaLN modulation Linears: bf16 in the 4-bit presets, int8 in the 8 GB ones
    yak_modulation: tuple[str, ...]
    #: LLM Linears a preset may quantize (relative to the LLM root: decoder layers only)
    llm_quantizable: tuple[str, ...]
    #: special ids that never reach the tokenizer's table
    image_atom_id: int
    image_start_id: int
    image_end_id: int
    #: ids -301..-304: embedded by vte rows V-5..V-2 (spec §3.3 step 6)
    indicator_ids: tuple[int, ...]
    #: guidance passes per image evaluation: cond + no_both (t2i); cond + no_both + no_txt (edit)
    cfg_passes: Mapping[str, int]

    def component_of(self, name: str) -> str:
        """Which component a state-dict key or module path belongs to."""
        for component, path in self.components.items():
            if name == path or name.startswith(path + "."):
                return component
        raise KeyError(name)

    def component_modules(self, model: Any) -> dict[str, Any]:
        """component -> its root module in a built model."""
        return {c: model.get_submodule(path) for c, path in self.components.items()}

    def prefix(self, component: str) -> str:
        return self.components[component] + "."

    @property
    def image_placeholder(self) -> tuple[int, int, int]:
        """What `<image>` becomes in the ids: start, atom, end (spec §3.4)."""
        return (self.image_start_id, self.image_atom_id, self.image_end_id)


OVIS_U1 = Architecture(
    components=_frozen({
        "llm": "llm",
        "vision": "visual_tokenizer.backbone",
        "visual_head": "visual_tokenizer.head",
        "vte": "vte",
        "yak": "visual_generator.backbone",
        "vae": "visual_generator.vae",
    }),
    block_lists=_frozen({"llm": ("model.layers",), "vision": ("trunk.blocks",),
                         "yak": ("double_blocks", "single_blocks")}),
    tied_weights_keys=("llm.lm_head.weight",),
    embed_module="llm.model.embed_tokens",
    head_module="llm.lm_head",
    vte_module="vte",
    yak_keep_bf16=("img_in", "time_in.*", "vector_in.*", "txt_in.input_embedder", "txt_in.c_embedder.*",
                   "final_layer.*"),
    yak_modulation=("*_mod.lin", "*.modulation.lin", "*adaLN_modulation.*"),
    llm_quantizable=("model.layers.*",),
    image_atom_id=-300,
    image_start_id=-301,
    image_end_id=-302,
    indicator_ids=(-301, -302, -303, -304),
    cfg_passes=_frozen({"t2i": 2, "edit": 3}),
)
COMPONENTS: tuple[str, ...] = tuple(OVIS_U1.components)
