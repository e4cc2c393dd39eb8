"""DART-style selection: keep the image tokens least duplicated by a few pivot tokens, at layer K."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_integer
from .base import TokenPolicy, layer_keys, refuse_uneven_images


@dataclass
class DARTPolicy(TokenPolicy):
    """After DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
    Matters More", 2025), training-free: at layer K, pivots are the image tokens and the prompt's text tokens
    whose keys in layer K have the largest L2 norm (`image_pivots` + `text_pivots`); every other image token is
    scored by its highest cosine similarity (hidden states entering layer K) to any pivot, and the least
    duplicated ones are kept with the image pivots. No attention map is needed, so it runs with SDPA.

    Parameters
    ----------
    image_keep_rate : float | None
        Share of each image's tokens kept (None: the model config's rate).
    image_pivots, text_pivots : int
        Pivot tokens taken from each image and from the prompt text (DART: 4 and 4 for LLaVA-1.5).
    """

    image_keep_rate: float | None = None
    image_pivots: int = 4
    text_pivots: int = 4

    def check(self) -> None:
        super().check()
        check_integer("image_pivots", self.image_pivots, 1, hint="each image needs a pivot to measure duplication")
        check_integer("text_pivots", self.text_pivots, 0)

    def image_scores(self, model, hidden, positions, context):
        if context.hidden is None:
            raise ValueError("DARTPolicy needs the hidden states entering layer K (context.hidden).")
        refuse_uneven_images(self, context)
        if context.past > 0:
            raise NotImplementedError("DARTPolicy scores images at prefill; the prompt must not follow cached tokens.")
        layer = model.layers[model.sparsity.sparse_layer]
        norms = layer_keys(layer, context.hidden, context.position_embeddings).norm(dim=-1).mean(dim=1)  # [B, N]
        mask = context.image_token_mask
        images, tokens = positions.shape
        image_norms = norms[mask].view(images, tokens)
        pivots = image_norms.topk(min(self.image_pivots, tokens), dim=1).indices
        unit = torch.nn.functional.normalize(hidden.float(), dim=-1)
        pivot_vectors = unit.gather(1, pivots.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
        text = ~mask & context.padding_mask
        text[:, context.prompt_end + 1 :] = False
        if self.text_pivots > 0 and bool(text.any()):
            text_norms = norms.masked_fill(~text, float("-inf"))
            top = text_norms.topk(min(self.text_pivots, text_norms.shape[1]), dim=1)
            vectors = torch.nn.functional.normalize(context.hidden.float(), dim=-1)
            text_vectors = vectors.gather(1, top.indices.unsqueeze(-1).expand(-1, -1, vectors.shape[-1]))
            text_vectors = text_vectors * top.values.isfinite().unsqueeze(-1)  # samples with few text tokens
            per_image = mask.sum(1).div(tokens, rounding_mode="floor")
            pivot_vectors = torch.cat([pivot_vectors, text_vectors.repeat_interleave(per_image, dim=0)], dim=1)
        duplication = torch.einsum("itc,ipc->itp", unit, pivot_vectors).max(dim=-1).values
        scores = -duplication
        return scores.scatter(1, pivots, float("inf"))


__all__ = ["DARTPolicy"]
