"""Understanding with the prefix KV and vision caches, checked against transformers' `generate` (its own
Qwen3ForCausalLM, holding the same weights) over a full prefill of the whole conversation (the path without any
cache), on the tiny model in fp32."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from lite.model.processing import Turn, tokenize_with_images, understanding_prompt
from lite.runtime.decode import Sampling, forward_last
from lite.runtime.kv_cache import longest_prefix, new_cache
from lite.runtime.pipeline import OvisPipeline, RunStats
from lite.runtime.understanding import answer_tokens, build_prompt


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    pipe = OvisPipeline.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32, progress=False)
    # the tiny checkpoint's small weights make every greedy token the same: widen them (seeded) so that
    # answers vary from token to token and a wrong KV position changes them
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in pipe.model.llm.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.2, generator=gen)
    return pipe


def _image(seed: int, size: tuple[int, int] = (56, 84)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _transformers_llm(pipe):
    """transformers' own Qwen3ForCausalLM holding the pipeline LLM's weights (ours is `lite.model.modeling_qwen3`)."""
    if not hasattr(pipe, "_transformers_llm"):
        from transformers import Qwen3ForCausalLM

        reference = Qwen3ForCausalLM(pipe.model.llm.config).eval()
        reference.load_state_dict(pipe.model.llm.state_dict())
        pipe._transformers_llm = reference
    return pipe._transformers_llm


def _reference(pipe, prompt: str, images, n: int, sampling: Sampling | None = None) -> list[int]:
    """transformers' generate over the whole prompt (no cache kept between calls)."""
    with torch.no_grad():
        embeds = pipe._llm_inputs(prompt, images, generation=False)
        kwargs = dict(temperature=None, top_p=None, top_k=None)
        if sampling is not None and sampling.do_sample:
            torch.manual_seed(sampling.seed)
            kwargs = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        out = _transformers_llm(pipe).generate(inputs_embeds=embeds, max_new_tokens=n, use_cache=True,
                                               attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                               eos_token_id=pipe.model.config.eos_token_id,
                                               pad_token_id=pipe.tokenizer.pad_token_id, **kwargs)
    return out[0].tolist()


def _ours(pipe, prompt: str, images, n: int, sampling: Sampling | None = None) -> tuple[list[int], RunStats]:
    stats = RunStats(task="understand")
    ids = list(answer_tokens(pipe, prompt, images, sampling or Sampling(), n, stats, time.perf_counter()))
    return ids, stats


def _text(pipe, ids: list[int]) -> str:
    return pipe.tokenizer.decode(ids, skip_special_tokens=True)


def test_multi_turn_multi_image_greedy_is_token_identical_and_reuses_the_prefix(pipe) -> None:
    pipe.caches.clear()
    img1, img2, img3 = _image(1), _image(2, (84, 56)), _image(3)
    history: list[Turn] = []
    images: list[Image.Image] = []
    turns = [("Compare them.", [img1, img2]), ("And this one?", [img3]), ("Say more.", [])]
    reused = []
    for question, new in turns:
        images += new
        prompt = understanding_prompt(question, len(new), history)
        ids, stats = _ours(pipe, prompt, images, 10)
        assert ids == _reference(pipe, prompt, images, 10)
        assert len(set(ids)) > 2  # the answers vary, so a wrong position would show
        reused.append(stats.cache["prefix_tokens_reused"])
        history.append(Turn(question, _text(pipe, ids), len(new)))
    assert reused[0] == 0 and reused[1] > 0 and reused[2] > reused[1]
    # every image was encoded once: three misses, and the later turns' images were hits
    assert pipe.caches.vision.stats()["misses"] >= 3 and pipe.caches.vision.stats()["hits"] >= 5


def test_repeated_question_reuses_all_but_the_last_position(pipe) -> None:
    pipe.caches.clear()
    img = _image(4)
    prompt = understanding_prompt("What is it?", 1)
    first, _ = _ours(pipe, prompt, [img], 8)
    again, stats = _ours(pipe, prompt, [img], 8)
    n_positions = len(build_prompt(pipe, prompt, [img], {}).positions)
    assert again == first == _reference(pipe, prompt, [img], 8)
    assert stats.cache["prefix_tokens_reused"] == n_positions - 1 and stats.cache["prefill_tokens"] == 1


def test_sampling_matches_generate_seed_for_seed_with_a_warm_cache(pipe) -> None:
    pipe.caches.clear()
    img = _image(5)
    prompt = understanding_prompt("Describe it.", 1)
    sampling = Sampling(True, temperature=0.7, top_p=0.9, seed=11)
    cold, _ = _ours(pipe, prompt, [img], 12, sampling)
    warm, stats = _ours(pipe, prompt, [img], 12, Sampling(True, 0.7, 0.9, 11))
    assert stats.cache["prefix_tokens_reused"] > 0
    assert cold == warm == _reference(pipe, prompt, [img], 12, sampling)
    other, _ = _ours(pipe, prompt, [img], 12, Sampling(True, 0.7, 0.9, 12))
    assert other != cold


def test_logits_after_a_reused_prefix_match_a_full_prefill(pipe) -> None:
    pipe.caches.clear()
    img = _image(6)
    history = [Turn("What is it?", "a thing", 1)]
    _ours(pipe, understanding_prompt("What is it?", 1), [img], 6)
    prompt = build_prompt(pipe, understanding_prompt("Why?", 0, history), [img], {})
    snap, shared = longest_prefix(pipe.caches.prefix_kv, prompt.positions)
    assert snap is not None and 0 < shared < len(prompt.positions)
    layers = pipe.model.llm.config.num_hidden_layers
    with torch.no_grad():
        full = forward_last(pipe.model.llm, new_cache(layers, 256), inputs_embeds=prompt.embeds)
        part = forward_last(pipe.model.llm, new_cache(layers, 256, snap, shared),
                            inputs_embeds=prompt.embeds[:, shared:])
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)


def test_divergence_edited_turn_new_image_and_a_cleared_chat_fall_back_to_the_common_prefix(pipe) -> None:
    pipe.caches.clear()
    img, other = _image(7), _image(8)
    first = understanding_prompt("What is it?", 1)
    ids, _ = _ours(pipe, first, [img], 6)
    history = [Turn("What is it?", _text(pipe, ids), 1)]
    ids_before_image = tokenize_with_images(pipe.tokenizer, first).tolist().index(pipe.model.architecture.image_atom_id)
    cases = {
        "edited": (understanding_prompt("Why?", 0, [Turn("What is that?", history[0].answer, 1)]), [img]),
        "new image": (understanding_prompt("Why?", 0, history), [other]),
        "cleared": (understanding_prompt("Hello", 0), []),
    }
    ids_first = tokenize_with_images(pipe.tokenizer, first).tolist()
    visual = len(build_prompt(pipe, first, [img], {}).positions) - (len(ids_first) - 1)
    expected_reuse = {  # the common prefix, counted from the token ids and the image's positions
        "edited": lambda n: ids_before_image + visual < n < len(ids_first) + visual,  # image kept, question cut
        "new image": lambda n: n == ids_before_image,  # stops where the other image's positions start
        "cleared": lambda n: 0 < n < ids_before_image,  # "<|im_start|>user" and little more
    }
    for name, (prompt, images) in cases.items():
        got, stats = _ours(pipe, prompt, images, 6)
        assert got == _reference(pipe, prompt, images, 6), name
        assert expected_reuse[name](stats.cache["prefix_tokens_reused"]), (name, stats.cache)


def test_eviction_under_a_small_budget_and_disabled_caches_stay_correct(pipe) -> None:
    pipe.caches.clear()
    img = _image(9)
    prompts = [understanding_prompt(q, 1) for q in ("One?", "Two?", "Three?")]
    expected = [_reference(pipe, p, [img], 6) for p in prompts]
    _, stats = _ours(pipe, prompts[0], [img], 6)
    one_entry = pipe.caches.prefix_kv.bytes
    pipe.caches.prefix_kv.set_budget(one_entry + one_entry // 2)  # room for about one conversation
    evictions = pipe.caches.prefix_kv.stats()["evictions"]
    for prompt, want in zip(prompts[1:], expected[1:]):
        got, _ = _ours(pipe, prompt, [img], 6)
        assert got == want
    assert len(pipe.caches.prefix_kv) == 1 and pipe.caches.prefix_kv.stats()["evictions"] >= evictions + 2
    pipe.caches.set_enabled(False)
    try:
        got, stats = _ours(pipe, prompts[0], [img], 6)
        assert got == expected[0] and stats.cache["prefix_tokens_reused"] == 0 and pipe.caches.bytes == 0
    finally:
        pipe.caches.set_enabled(True)
        pipe.caches.set_budget(pipe.caches.budget_bytes)


def test_public_api_streams_report_phases_and_match_non_streamed(pipe) -> None:
    pipe.caches.clear()
    img = _image(10)
    answer = pipe.understand(img, "What is it?", max_new_tokens=8)
    stream = pipe.understand(img, "What is it?", max_new_tokens=8, stream=True)
    assert "".join(stream) == answer.text
    stats = stream.stats
    assert {"vision", "prefill", "decode", "ttft"} <= set(stats.phases) and stats.tokens == 8
    assert stats.cache["prefix_tokens_reused"] > 0 and stats.cache["prefix_kv"]["reused_tokens"] > 0
