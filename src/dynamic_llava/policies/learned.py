"""The learned policy: the model's own image and output-text predictors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..predictors import KEEP, keep_log_prob
from .base import TokenPolicy
from .cdpruner import diverse_ranks


def learned_image_scores(sparsity, log_prob: torch.Tensor, features: torch.Tensor, valid: torch.Tensor | None,
                         k: int) -> torch.Tensor:
    """[images, T] scores whose top share is what the learned selection keeps. ``image_selection="top"``: the keep
    log-probabilities themselves (the paper's top-k). ``"diverse"``: greedy DPP over the layer-K features with
    quality ``image_relevance * p' + (1 - image_relevance)`` (p' the keep probability min-max normalised per
    image), so near-duplicate tokens (several patches of one object) give way to distinct ones; `k` is the
    largest share any image keeps."""
    if sparsity.image_selection == "top":
        return log_prob
    p = log_prob.double().exp()
    if valid is not None:
        low = p.masked_fill(~valid, float("inf")).min(1, keepdim=True).values
        high = p.masked_fill(~valid, float("-inf")).max(1, keepdim=True).values
    else:
        low, high = p.min(1, keepdim=True).values, p.max(1, keepdim=True).values
    theta = sparsity.image_relevance
    quality = theta * (p - low) / (high - low).clamp(min=1e-12) + (1 - theta)
    return diverse_ranks(quality, features, k, valid)


@dataclass
class LearnedPolicy(TokenPolicy):
    """Dynamic-LLaVA (Huang et al., "Dynamic-LLaVA: Efficient Multimodal Large Language Models via
    Dynamic Vision-language Context Sparsification", ICLR 2025): the trained predictors decide.

    Image tokens are ranked by the image predictor's keep log-probability (or, under
    ``image_selection="diverse"``, chosen by greedy DPP with it as the quality: `learned_image_scores`); a
    generated token stays iff the output-text predictor's keep logit beats its drop logit (by a request's
    margin, when per-request settings give one: `control.SparsityRequest.text_keep_threshold`). A model without a predictor (or
    with ``text_keep_rate`` 1.0) keeps every token of that kind. This is the default policy.

    Parameters
    ----------
    image_keep_rate : float | None
        Share of each image's tokens kept (None: the model config's rate).
    """

    image_keep_rate: float | None = None

    def image_scores(self, model, hidden, positions, context):
        if model.image_predictor is None:
            return None
        valid = context.image_layout.valid if context.image_layout is not None else None
        log_prob = keep_log_prob(model.image_predictor(hidden, valid))
        k = max(context.image_keep_counts) if context.image_keep_counts else hidden.shape[1]
        return learned_image_scores(model.sparsity, log_prob, hidden, valid, k)

    def text_keep(self, model, hidden, positions, threshold=None):
        if model.text_predictor is None or (threshold is None and model.sparsity.text_keep_rate >= 1.0):
            return None
        if isinstance(threshold, float) and threshold == float("-inf"):  # every request keeps every token
            return None
        logits = model.text_predictor(hidden)
        margin = logits[..., KEEP] - logits[..., 1 - KEEP]
        return margin > (0.0 if threshold is None else threshold.to(margin.dtype))


__all__ = ["LearnedPolicy", "learned_image_scores"]
