"""Result values: an answer stream over any token source holds its text and finished stats once exhausted;
an image result saves its image with its metadata and never overwrites."""

from __future__ import annotations

import pytest
from PIL import Image

from lite.errors import OutputError
from lite.runtime.metadata import read_metadata
from lite.runtime.results import AnswerStream, ImageResult, RunStats


def test_an_answer_stream_finishes_its_stats_once_the_source_ends():
    finished: list[RunStats] = []
    stats = RunStats("understand")
    stream = AnswerStream(iter(["a ", "red ", "fox"]), stats,
                          lambda s: (finished.append(s), s.add_phase("answer", 1.5)))
    assert next(stream) == "a " and not stream.done and finished == []
    assert list(stream) == ["red ", "fox"]
    assert stream.done and finished == [stats] and stream.text == "a red fox" == str(stream.result)
    assert stream.stats.phases == {"answer": 1.5}
    assert list(stream) == [] and len(finished) == 1  # finished once


def test_a_closed_stream_closes_its_source_and_stays_unfinished():
    closed: list[bool] = []

    def source():
        try:
            yield "a"
            yield "b"
        finally:
            closed.append(True)

    stream = AnswerStream(source(), RunStats("understand"), lambda s: pytest.fail("finished a closed stream"))
    assert next(stream) == "a"
    stream.close()
    assert closed == [True] and not stream.done and stream.text == "a"


def test_an_image_result_saves_with_its_metadata_and_never_overwrites(tmp_path):
    stats = RunStats("t2i", steps=2, nfe=4, images=2, width=8, height=8, settings={"prompt": "a fox", "seed": 5})
    images = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    result = ImageResult(images, [5, 6], stats, "tiny", "cpu")
    assert result.image is images[0] and len(result) == 2 and list(result) == images
    path = result.save(tmp_path / "b.png", index=1)
    meta = read_metadata(path)
    assert meta["seed"] == 6 and meta["prompt"] == "a fox" and meta["nfe"] == 4 and meta["preset"] == "cpu"
    assert Image.open(path).getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(OutputError, match="already exists"):
        result.save(path)
