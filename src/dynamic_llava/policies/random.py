"""Random selection: the baseline every other policy must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_integer, check_rate
from .base import TokenPolicy


def _position_hash(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform-looking numbers in [0, 1) that depend only on (position, seed): batch-invariant randomness."""
    x = (positions.double() + 1.0) * 12.9898 + seed * 78.233
    return torch.frac(torch.sin(x) * 43758.5453).abs()


@dataclass
class RandomPolicy(TokenPolicy):
    """Random selection at fixed rates, the control of every token-pruning paper (e.g. the random
    baselines of Dynamic-LLaVA, Huang et al., ICLR 2025, and FastV, Chen et al., ECCV 2024).

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

    def check(self) -> None:
        super().check()
        if self.text_keep_rate is not None:
            check_rate("text_keep_rate", self.text_keep_rate, "None keeps every generated token")
        check_integer("seed", self.seed)

    def image_scores(self, model, hidden, positions, context):
        return _position_hash(positions, self.seed)

    def text_keep(self, model, hidden, positions, threshold=None):
        if self.text_keep_rate is None:
            return None
        return _position_hash(positions, self.seed + 1) < self.text_keep_rate


__all__ = ["RandomPolicy"]
