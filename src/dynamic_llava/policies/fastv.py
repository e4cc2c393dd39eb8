"""FastV: rank image tokens by the attention the last prompt token pays them, training-free."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import TokenPolicy, attention_probe


@dataclass
class FastVPolicy(TokenPolicy):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
    Acceleration for Large Vision-Language Models", ECCV 2024).

    An image token's score is the attention it receives from the last prompt token in layer K - 1,
    averaged over heads; the engine keeps each image's top ``floor(image_keep_rate * tokens)`` and
    layers >= K run without the rest (K is the model's ``sparse_layer``; the paper prunes after
    K = 2 with R = 50% dropped). Layer K - 1's own attention module runs once more on the hidden
    states entering it, with a probe (`attention_probe`) that computes only that one row's
    probabilities (causal and padding masks, softmax in fp32), so every layer keeps its configured
    attention implementation (SDPA stays SDPA) and any family's norms and RoPE apply. Needs no
    predictor; generated tokens are all kept.

    Parameters
    ----------
    image_keep_rate : float | None
        Share of each image's tokens kept, 1 - R in the paper (None: the model config's rate).
    """

    image_keep_rate: float | None = None

    def image_scores(self, model, hidden, positions, context):
        if context.past > 0:
            raise NotImplementedError("FastVPolicy scores images at prefill; the prompt must not follow cached tokens.")
        return context.image_layout.gather(self.received_attention(model, context))

    @staticmethod
    def received_attention(model, context) -> torch.Tensor:
        """[B, N]: attention each token receives from the last prompt token in layer K - 1, mean over heads."""
        layer = model.layers[model.sparsity.sparse_layer - 1]
        hidden, (cos, sin), last = context.hidden_before, context.position_embeddings, context.prompt_end
        seen = torch.arange(hidden.shape[1], device=hidden.device) <= last
        allowed = (context.padding_mask & seen).unsqueeze(1)
        return attention_probe(layer, hidden, (cos, sin), allowed=allowed, rows=slice(last, last + 1))[1][:, 0]


__all__ = ["FastVPolicy"]
