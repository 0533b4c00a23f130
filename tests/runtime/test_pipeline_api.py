"""The Python API: a preset sets its sampler, batches and seeds, the negative prompt, the step callback, the
reference's t2i canvas, and the reference's multi-turn conversation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lite.errors import DeviceError, InputError
from lite.model import processing
from lite.model.processing import T2I_PREFIX, UNCONDITIONAL_PROMPT, Turn
from lite.runtime.pipeline import OvisPipeline
from lite.runtime.presets import PRESETS

SRC = Image.fromarray(np.random.default_rng(5).integers(0, 255, (40, 56, 3), dtype=np.uint8))


def test_a_preset_sets_the_sampler_of_the_api(tiny_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = OvisPipeline.from_pretrained(tiny_dir, device="cpu", preset="balanced", progress=False)
    assert any("meant for cuda" in str(w.message) for w in caught)  # a CUDA preset on a CPU is said, not silent
    stats = p.generate("a fox", width=64, height=64).stats
    preset = PRESETS["balanced"]
    assert stats.steps == preset.steps and stats.settings["solver"] == preset.solver
    assert stats.nfe == preset.nfe("t2i", tokens=(64 // 16) ** 2)
    assert stats.settings["preset"] == "balanced"


def test_without_a_preset_the_reference_sampler_runs(pipe):
    stats = pipe.generate("a fox", width=32, height=32, steps=3).stats
    assert stats.settings["solver"] == "euler" and stats.nfe == 2 * 3


def test_an_accelerator_asked_for_by_name_must_exist(tiny_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        OvisPipeline.from_pretrained(tiny_dir, device="cuda", progress=False)


def test_num_images_uses_consecutive_seeds(pipe):
    batch = pipe.generate("a fox", width=32, height=32, steps=2, seed=7, num_images=3)
    assert len(batch.images) == 3 and batch.seeds == [7, 8, 9]
    assert batch.stats.settings["seeds"] == [7, 8, 9]
    for i, image in enumerate(batch.images):
        single = pipe.generate("a fox", width=32, height=32, steps=2, seed=7 + i).image
        assert np.array_equal(np.asarray(image), np.asarray(single)) and image.info["seed"] == 7 + i
        assert batch.metadata(i)["seed"] == 7 + i


def test_the_negative_prompt_replaces_the_unconditional_text(pipe, monkeypatch):
    seen: list[str] = []
    from lite.runtime.caches import RuntimeCaches

    caches = RuntimeCaches()
    caches.set_enabled(False)  # every condition computed here (the condition cache would reuse earlier ones)
    monkeypatch.setattr(pipe, "caches", caches)
    original = pipe.condition
    monkeypatch.setattr(pipe, "condition", lambda content, image: (seen.append(content), original(content, image))[1])
    pipe.generate("a fox", width=32, height=32, steps=1, negative_prompt="blurry")
    assert seen == [T2I_PREFIX + "a fox", "blurry"]
    seen.clear()
    pipe.edit(SRC, "add a hat", steps=1, negative_prompt="blurry")
    assert seen == ["add a hat", "blurry", "blurry"]  # cond, no_both, no_txt
    seen.clear()
    pipe.generate("a fox", width=32, height=32, steps=1)
    assert seen[1] == UNCONDITIONAL_PROMPT  # the reference's text by default


def test_the_step_callback_sees_every_step_and_can_stop(pipe):
    calls: list[tuple[int, int, tuple[int, ...]]] = []
    pipe.generate("a fox", width=32, height=48, steps=3, callback=lambda i, n, z: calls.append((i, n, tuple(z.shape))))
    assert calls == [(1, 3, (1, 4, 6, 4)), (2, 3, (1, 4, 6, 4)), (3, 3, (1, 4, 6, 4))]
    preview = pipe.preview(torch.zeros(1, 4, 6, 4))
    assert preview.size == (4, 6) and preview.mode == "RGB"


def test_a_callback_returning_false_stops_quietly_with_the_latent_decoded(pipe):
    """diffusers' interrupt: the result is marked cancelled and holds the latent reached, decoded; the images
    after the one it stopped in are not started."""
    seen: list[torch.Tensor] = []
    original = pipe.decode
    pipe.decode = lambda packed, rows, cols: (seen.append(packed.clone()), original(packed, rows, cols))[1]
    latents_at: list[torch.Tensor] = []
    try:
        result = pipe.generate("a fox", width=32, height=32, steps=3, seed=4, num_images=2,
                               callback=lambda i, n, z: (latents_at.append(z.clone()), i < 2)[1])
    finally:
        pipe.decode = original
    assert result.cancelled and len(result.images) == 1 and result.seeds == [4]
    assert len(latents_at) == 2 and result.stats.images == 1
    from lite.model import latents

    torch.testing.assert_close(latents.unpack(seen[0], 2, 2), latents_at[-1], atol=0, rtol=0)
    assert result.stats.nfe_total == 2 * 2  # two steps of two passes, then it stopped
    full = pipe.generate("a fox", width=32, height=32, steps=3, seed=4)
    assert not full.cancelled and not np.array_equal(np.asarray(full.image), np.asarray(result.image))


def test_the_t2i_canvas_is_built_at_the_requested_size(pipe, monkeypatch):
    """The reference builds the white canvas at W x H; only the latent is floored to /16. With the real
    preprocessor, 256x295 gives the ViT a 36x30 grid (not the 34x32 of a floored 256x288 canvas)."""
    from lite.model.config import PreprocessorConfig
    from lite.model.processing import generation_vision_input, white_canvas

    canvases: list[tuple[int, int]] = []
    original = pipe.condition
    monkeypatch.setattr(pipe, "condition", lambda content, image: (canvases.append(image.size),
                                                                   original(content, image))[1])
    image = pipe.generate("a fox", width=256, height=295, steps=1).image
    assert image.size == (256, 288)  # the floored latent size
    assert canvases == [(256, 295), (256, 295)]
    grid = generation_vision_input(white_canvas(256, 295), PreprocessorConfig()).grid_thws.tolist()[0]
    assert grid[1:] == [36, 30]
    floored = generation_vision_input(white_canvas(256, 288), PreprocessorConfig()).grid_thws.tolist()[0]
    assert floored[1:] == [34, 32]


def test_a_conversation_has_one_image_list_and_the_reference_template(pipe, monkeypatch):
    prompts: list[str] = []
    monkeypatch.setattr(processing, "tokenize_with_images", lambda tok, text: (prompts.append(text),
                        _TOKENIZE(tok, text))[1])
    import lite.runtime.pipeline as pipeline_module
    import lite.runtime.understanding as understanding_module

    monkeypatch.setattr(pipeline_module, "tokenize_with_images", processing.tokenize_with_images)
    monkeypatch.setattr(understanding_module, "tokenize_with_images", processing.tokenize_with_images)
    other = SRC.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    history = [Turn("What is it?", "a cat", num_images=1)]
    pipe.understand([SRC, other], "And this one?", max_new_tokens=2, history=history)
    expected = ("<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n</think>\n\na cat<|im_end|>\n"
                "<|im_start|>user\n<image>\nAnd this one?<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert prompts[-1] == expected
    with pytest.raises(InputError, match="history's turns have 1 image"):
        pipe.understand([], "And this one?", max_new_tokens=2, history=history)


_TOKENIZE = processing.tokenize_with_images
