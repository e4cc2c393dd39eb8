"""Answer metrics: exact match, chrF similarity of long answers, perplexity."""

from __future__ import annotations

import math


def normalize(text: str) -> str:
    """Lower case, single spaces, no trailing period: how short answers are compared."""
    return " ".join(text.lower().replace(".", " ").split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def chrf(predictions: list[str], references: list[str]) -> float:
    """Corpus chrF++ (sacrebleu, works offline): the similarity score of generated long answers."""
    from sacrebleu.metrics import CHRF

    return CHRF(word_order=2).corpus_score(predictions, [references]).score


def perplexity(total_nll: float, tokens: int) -> float:
    return math.exp(total_nll / max(tokens, 1))


__all__ = ["chrf", "exact_match", "normalize", "perplexity"]
