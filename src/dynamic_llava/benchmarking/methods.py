"""The methods a benchmark compares, each one model setting plus a token-selection policy at a budget."""

from __future__ import annotations

from dataclasses import dataclass

from ..policies import FastVPolicy, LearnedPolicy, RandomPolicy, TokenPolicy


@dataclass
class ForcedTextPolicy(LearnedPolicy):
    """The image predictor ranks image tokens (same compute as Dynamic-LLaVA), generated tokens stay at a
    fixed rate (position hash, as `RandomPolicy`). For untrained predictors, whose text decisions mean
    nothing, so that a random-weight model still keeps the share of generated tokens a trained one would."""

    text_keep_rate: float = 0.5
    seed: int = 0

    def text_keep(self, model, hidden, positions, threshold=None):
        return RandomPolicy(text_keep_rate=self.text_keep_rate, seed=self.seed).text_keep(model, hidden, positions)


@dataclass(frozen=True)
class Method:
    """One column of a benchmark: the config keep rates to set and the policy to pass (None: learned)."""

    name: str
    image_keep_rate: float  # set on model.config
    text_keep_rate: float  # set on model.config
    policy: TokenPolicy | None = None


def methods_at_budget(image_keep_rate: float = 0.2, text_keep_rate: float = 0.5, trained: bool = True,
                      seed: int = 0) -> list[Method]:
    """dense, Dynamic-LLaVA, FastV and random at one image-token budget (and, where the method prunes generated
    tokens, one text budget). With ``trained=False`` Dynamic-LLaVA's text decisions are forced to the rate."""
    dynamic = None if trained else ForcedTextPolicy(image_keep_rate=image_keep_rate, text_keep_rate=text_keep_rate,
                                                    seed=seed)
    return [
        Method("dense", 1.0, 1.0),
        Method("dynamic-llava", image_keep_rate, text_keep_rate, dynamic),
        Method("fastv", 1.0, 1.0, FastVPolicy(image_keep_rate=image_keep_rate)),
        Method("random", 1.0, 1.0, RandomPolicy(image_keep_rate, text_keep_rate, seed=seed)),
    ]


def apply(model, method: Method) -> TokenPolicy | None:
    """Set the method's keep rates on the model config; return the policy to pass to forward / generate."""
    model.config.image_keep_rate = method.image_keep_rate
    model.config.text_keep_rate = method.text_keep_rate
    return method.policy


__all__ = ["ForcedTextPolicy", "Method", "apply", "methods_at_budget"]
