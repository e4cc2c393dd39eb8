"""Benchmark runners and metrics."""

from .metrics import chrf, exact_match, normalize, perplexity
from .world import answer_perplexity, answer_questions, evaluate_world, first_turns

__all__ = [
    "answer_perplexity", "answer_questions", "chrf", "evaluate_world", "exact_match", "first_turns", "normalize",
    "perplexity",
]
