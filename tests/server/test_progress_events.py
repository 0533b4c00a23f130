"""The job progress events the page's bar is computed from: `image` and `step` both count from 1."""

from __future__ import annotations

from pathlib import Path

from lite.server.jobs import Job
from lite.server.openai_schema import ImageRequest
from lite.server.tasks import image_job


def test_progress_counts_images_and_steps_from_1(tiny_dir: Path) -> None:
    from lite import OvisPipeline

    pipe = OvisPipeline.from_pretrained(tiny_dir, device="cpu", preset="cpu", progress=False)
    req = ImageRequest(task="t2i", prompt="a fox", width=32, height=32, n=2, seed=3, steps=3, negative_prompt="",
                       txt_cfg=None, img_cfg=None, solver=None, spacing=None)
    job = Job(task="t2i", run=image_job(pipe, req))
    seen: list[tuple[int, int, int, int]] = []
    job.progress = lambda step, total, **extra: seen.append((extra["image"], extra["images"], step, total))
    job.run(job)
    assert seen == [(image, 2, step, 3) for image in (1, 2) for step in (1, 2, 3)]
    # The page's bar: value (image - 1) * total + step of max total * images rises 1..6, one per step.
    assert [(image - 1) * total + step for image, _, step, total in seen] == [1, 2, 3, 4, 5, 6]
