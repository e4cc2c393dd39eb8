"""The learned policy: the model's own image and output-text predictors."""

from __future__ import annotations

from dataclasses import dataclass

from ..predictors import KEEP, keep_log_prob
from .base import TokenPolicy


@dataclass
class LearnedPolicy(TokenPolicy):
    """Dynamic-LLaVA (Huang et al., "Dynamic-LLaVA: Efficient Multimodal Large Language Models via
    Dynamic Vision-language Context Sparsification", ICLR 2025): the trained predictors decide.

    Image tokens are ranked by the image predictor's keep log-probability; a generated token stays
    iff the output-text predictor's keep logit beats its drop logit (by a request's margin, when per-request
    settings give one: `control.SparsityRequest.text_keep_threshold`). A model without a predictor (or
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
        return keep_log_prob(model.image_predictor(hidden, valid))

    def text_keep(self, model, hidden, positions, threshold=None):
        if model.text_predictor is None or (threshold is None and model.sparsity.text_keep_rate >= 1.0):
            return None
        if isinstance(threshold, float) and threshold == float("-inf"):  # every request keeps every token
            return None
        logits = model.text_predictor(hidden)
        margin = logits[..., KEEP] - logits[..., 1 - KEEP]
        return margin > (0.0 if threshold is None else threshold.to(margin.dtype))


__all__ = ["LearnedPolicy"]
