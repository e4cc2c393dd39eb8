"""Who decides which tokens layers >= K keep. The engine (gather, cache, masks) is in `modeling.py`.

A policy answers two questions from the hidden states entering layer K: how much does each image
token deserve to stay (the engine keeps each image's top ``floor(rate * tokens)``), and does each
generated token stay in the context of the deeper layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .predictors import KEEP, keep_log_prob


class TokenPolicy:
    """Interface: return ``None`` from a method to keep every token of that kind."""

    image_keep_rate: float | None = None  # None: use the model config's rate

    def image_scores(self, model, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """hidden [images, tokens, H], positions [images, tokens] -> scores [images, tokens] (higher = keep)."""
        return None

    def text_keep(self, model, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """hidden [M, H], positions [M] -> bool [M]: which generated tokens stay visible in layers >= K."""
        return None


class LearnedPolicy(TokenPolicy):
    """Dynamic-LLaVA (Huang et al., ICLR 2025): the model's trained image and output-text predictors."""

    def image_scores(self, model, hidden, positions):
        if model.image_predictor is None:
            return None
        return keep_log_prob(model.image_predictor(hidden))

    def text_keep(self, model, hidden, positions):
        if model.text_predictor is None or model.sparsity.text_keep_rate >= 1.0:
            return None
        logits = model.text_predictor(hidden)
        return logits[..., KEEP] > logits[..., 1 - KEEP]


def _position_hash(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform-looking numbers in [0, 1) that depend only on (position, seed): batch-invariant randomness."""
    x = (positions.double() + 1.0) * 12.9898 + seed * 78.233
    return torch.frac(torch.sin(x) * 43758.5453).abs()


@dataclass
class RandomPolicy(TokenPolicy):
    """Random selection at fixed rates: the baseline any learned policy must beat.

    Decisions depend only on a token's position and the seed, so a batch decides exactly as its
    samples would one by one.

    Parameters
    ----------
    image_keep_rate : float | None
        Share of each image's tokens kept (None: the model config's rate).
    text_keep_rate : float | None
        Probability that a generated token stays (None: keep every generated token).
    seed : int
        Changes the pattern.
    """

    image_keep_rate: float | None = None
    text_keep_rate: float | None = None
    seed: int = 0

    def image_scores(self, model, hidden, positions):
        return _position_hash(positions, self.seed)

    def text_keep(self, model, hidden, positions):
        if self.text_keep_rate is None:
            return None
        return _position_hash(positions, self.seed + 1) < self.text_keep_rate


__all__ = ["TokenPolicy", "LearnedPolicy", "RandomPolicy"]
