"""H2O-style generated-text KV: keep the heavy hitters (most attention received) and a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_integer
from .base import TokenPolicy


@dataclass
class H2OPolicy(TokenPolicy):
    """H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
    Language Models", NeurIPS 2023) for generated text in layers >= K.

    A generated token stays while it is among the ``recent`` newest generated tokens or among the
    ``heavy`` older ones that have received the most attention so far; the rest are evicted, so
    layers >= K hold at most heavy + recent generated tokens besides the prompt. H2O scores per layer
    and head; here one decision holds for every layer >= K (as all of this library's decisions), so
    the score is the attention a token receives in layer K, averaged over heads and summed over the
    decoding steps. The engine computes just that row for each new token (layers keep their
    attention implementation). The scores live in the KV cache: H2O needs ``use_cache=True``.

    Parameters
    ----------
    heavy : int
        Older generated tokens kept by accumulated attention.
    recent : int
        Newest generated tokens always kept (>= 1: the newest token always sees itself).
    """

    heavy: int = 128
    recent: int = 128
    evicts_text = True
    needs_attention = True

    def check(self) -> None:
        super().check()
        check_integer("heavy", self.heavy, 0)
        check_integer("recent", self.recent, 1, hint="the newest token always sees itself")

    def text_evict(self, model, slots):
        if slots.attention is None:
            raise ValueError(
                "H2OPolicy ranks tokens by the attention accumulated in the KV cache: generate with use_cache=True, "
                "one token per step."
            )
        older = slots.generated & (slots.ages >= self.recent)
        scores = slots.attention.masked_fill(~older, float("-inf"))
        top = scores.topk(min(self.heavy, scores.shape[-1]), dim=-1).indices
        heavy = torch.zeros_like(older).scatter(-1, top, True) & older
        return older & ~heavy


__all__ = ["H2OPolicy"]
