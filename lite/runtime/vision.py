"""Visual embeddings (ViT + visual head + VTE) per image, kept in the vision cache by a digest of the
image's pixels as preprocessed: a chat's earlier images and an edit's source image (in its `cond` and
`no_txt` conditions) are encoded once.

Each image only ever attends to itself in the ViT, so encoding the missing ones together and the
cached ones earlier gives the same embeddings as encoding all of them at once.
"""

from __future__ import annotations

import hashlib

import torch

from lite.model.processing import VisionInput, concat_vision
from lite.runtime.caches import ByteLRU


def image_digest(vision: VisionInput) -> str:
    """A digest of one preprocessed image: its patch pixels (float32 bytes) and its grid."""
    h = hashlib.blake2b(digest_size=16)
    h.update(vision.grid_thws.to(torch.int64).numpy().tobytes())
    h.update(vision.pixel_values.to(torch.float32).contiguous().numpy().data)
    return h.hexdigest()


def visual_embeddings(model: torch.nn.Module, inputs: list[VisionInput], device: torch.device,
                      cache: ByteLRU) -> tuple[list[torch.Tensor], list[str]]:
    """One [N_i/4, H] embedding per preprocessed image, and the images' digests (used as their identity
    in the prefix KV cache); images missing from `cache` are encoded together, then kept."""
    digests = [image_digest(vision) for vision in inputs]
    found: dict[str, torch.Tensor] = {}
    for digest in dict.fromkeys(digests):
        hit = cache.get(digest)
        if hit is not None:
            found[digest] = hit
    missing = [i for i, digest in enumerate(digests) if digest not in found and digests.index(digest) == i]
    if missing:
        batch = concat_vision([inputs[i] for i in missing])
        vit_dtype = model.visual_tokenizer.backbone.preprocessor.patchifier.proj.weight.dtype
        encoded = model.visual_embeddings(batch.pixel_values.to(device, vit_dtype), batch.grid_thws.to(device))
        for i, embedding in zip(missing, encoded):
            found[digests[i]] = embedding
            cache.put(digests[i], embedding.clone() if len(missing) > 1 else embedding)  # not a view of the batch
    return [found[digest] for digest in digests], digests
