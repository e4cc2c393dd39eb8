"""CDPruner-style selection: relevance to the instruction and diversity among the kept tokens, before the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_number
from .base import TokenPolicy, refuse_uneven_images


def greedy_dpp(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP inference of a determinantal point process (Chen et al., NeurIPS 2018), batched:
    kernel [B, n, n] positive semi-definite -> long [B, k], the items in the order they were chosen (ties: the
    lowest index)."""
    batch, n, _ = kernel.shape
    k = min(k, n)
    chosen = torch.zeros(batch, k, dtype=torch.long, device=kernel.device)
    vectors = torch.zeros(batch, k, n, dtype=kernel.dtype, device=kernel.device)
    gains = kernel.diagonal(dim1=1, dim2=2).clone()  # the squared norm each item would add
    rows = torch.arange(batch, device=kernel.device)
    for j in range(k):
        # gains rounded to 1e-6: equal gains (a constant quality makes every first gain 1) go to the lowest
        # index whatever rounding noise the batch brings, so a batch picks as its samples would alone
        best = torch.round(gains * 1e6).argmax(dim=1)
        chosen[:, j] = best
        projection = torch.einsum("bj,bjn->bn", vectors[rows, :j, best], vectors[:, :j])
        e = (kernel[rows, best] - projection) / gains[rows, best].clamp(min=1e-12).sqrt().unsqueeze(1)
        vectors[:, j] = e
        gains = gains - e.square()
        gains[rows, best] = float("-inf")
    return chosen


def diverse_ranks(quality: torch.Tensor, features: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[images, T] float scores whose top ``k' <= k`` are the first k' tokens greedy DPP MAP inference picks from
    the kernel diag(q) S diag(q) (S: cosine similarity of `features` [images, T, C]; q: `quality` [images, T],
    > 0): the i-th chosen token scores k - i, the rest -1. `valid` (False: padding) is never chosen. Computed in
    float64, so a batch picks as its samples would alone."""
    images, tokens = quality.shape
    q = quality.double()
    if valid is not None:
        q = q.masked_fill(~valid, 0.0)
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    kernel = q.unsqueeze(2) * (unit @ unit.transpose(1, 2)) * q.unsqueeze(1)
    k = max(1, min(k, tokens))
    order = greedy_dpp(kernel, k)
    scores = torch.full((images, tokens), -1.0, dtype=torch.float32, device=quality.device)
    return scores.scatter_(1, order, torch.arange(k, 0, -1, dtype=torch.float32, device=quality.device)
                           .expand(images, -1).contiguous())


@dataclass
class CDPrunerPolicy(TokenPolicy):
    """After CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
    Pruning in MLLMs", 2025): a training-free selection made from the language model's *input* (the projected
    image features), before any decoder layer has run. Each image's kept set maximises the determinant of a
    conditional kernel L = diag(q) S diag(q): S is the cosine similarity of the image features (diversity),
    q_i = theta * r_i + (1 - theta) with r_i the min-max normalised cosine similarity of feature i to the mean
    instruction embedding (relevance). Greedy DPP MAP inference picks floor(rate * tokens) tokens per image.

    CDPruner reads CLIP's text encoder for relevance; a llava-hf model has none, so the instruction is the
    prompt's non-image tokens as the decoder embeds them. The engine still runs layers < K on every token
    (the selection is applied at layer K), so this compares which tokens are kept at equal budgets, not
    the extra prefill that pruning before layer 0 would save.

    Parameters
    ----------
    image_keep_rate : float | None
        Share of each image's tokens kept (None: the model config's rate).
    theta : float
        Weight of relevance in the kernel, in [0, 1] (0: diversity only).
    """

    image_keep_rate: float | None = None
    theta: float = 0.5

    def check(self) -> None:
        super().check()
        check_number("theta", self.theta, 0.0, 1.0, hint="0 ranks by diversity alone, 1 weighs relevance fully")

    def image_scores(self, model, hidden, positions, context):
        if context.inputs_embeds is None:
            raise ValueError("CDPrunerPolicy needs the decoder input (context.inputs_embeds).")
        refuse_uneven_images(self, context)
        if context.past > 0:
            raise NotImplementedError("CDPrunerPolicy scores images at prefill; the prompt must not follow cached tokens.")
        embeds, mask = context.inputs_embeds.double(), context.image_token_mask  # float64: the greedy order is exact
        images, tokens = positions.shape
        features = torch.nn.functional.normalize(embeds[mask].view(images, tokens, -1), dim=-1)
        text = ~mask & context.padding_mask
        text[:, context.prompt_end + 1 :] = False
        instruction = (embeds * text.unsqueeze(-1)).sum(1) / text.sum(1, keepdim=True).clamp(min=1)
        owner = mask.sum(1).div(tokens, rounding_mode="floor")  # images per sample
        instruction = torch.nn.functional.normalize(instruction, dim=-1).repeat_interleave(owner, dim=0)
        relevance = torch.einsum("itc,ic->it", features, instruction)
        low, high = relevance.min(1, keepdim=True).values, relevance.max(1, keepdim=True).values
        quality = self.theta * (relevance - low) / (high - low).clamp(min=1e-6) + (1 - self.theta)
        rate = self.image_keep_rate if self.image_keep_rate is not None else model.sparsity.image_keep_rate
        return diverse_ranks(quality, features, max(1, int(rate * tokens + 1e-6))).to(hidden.device)


__all__ = ["CDPrunerPolicy", "diverse_ranks", "greedy_dpp"]
