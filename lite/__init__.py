"""ovis-lite: a low-VRAM runtime for AIDC-AI/Ovis-U1-3B (understand, generate and edit images).

    from lite import OvisPipeline
    pipe = OvisPipeline.from_pretrained("path/to/Ovis-U1-3B")
    pipe.generate("a red fox in the snow").save("fox.png")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lite.version import __version__

__all__ = ["OvisPipeline", "__version__"]

if TYPE_CHECKING:
    from lite.runtime.pipeline import OvisPipeline


def __getattr__(name: str) -> Any:
    # Lazy: `import lite` must stay cheap (the CLI parses arguments before torch is imported).
    if name == "OvisPipeline":
        from lite.runtime.pipeline import OvisPipeline

        return OvisPipeline
    raise AttributeError(name)
