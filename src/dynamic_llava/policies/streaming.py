"""StreamingLLM-style generated-text KV: keep the prompt (the sinks) and a window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

from ..validation import check_integer
from .base import TokenPolicy


@dataclass
class StreamingLLMPolicy(TokenPolicy):
    """StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024)
    for generated text: layers >= K see the prompt plus only the ``window`` most recent generated tokens.

    The attention sinks are the whole prompt here (this library never drops prompt text). A query
    sees the generated tokens at most ``window - 1`` tokens before it, and itself; with a cache the
    older ones are evicted, so after each step layers >= K hold min(window, generated) generated
    tokens per sample. Images are not pruned.

    Parameters
    ----------
    window : int
        Generated tokens kept in the context of layers >= K (>= 1), the newest included.
    """

    window: int = 256
    evicts_text = True

    def check(self) -> None:
        super().check()
        check_integer("window", self.window, 1, hint="the newest token always sees itself")

    def text_evict(self, model, slots):
        return slots.ages >= self.window


__all__ = ["StreamingLLMPolicy"]
