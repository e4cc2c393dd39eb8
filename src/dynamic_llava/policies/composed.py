"""One policy built from three parts: an image scorer, a text gate and an evictor (no subclass per combination)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import TokenPolicy, check_policy


@dataclass
class ComposedPolicy(TokenPolicy):
    """Asks each question of the part that answers it: ``images`` scores image tokens, ``text`` decides which
    generated tokens enter layers >= K, ``evict`` which earlier ones leave. A part left None keeps every token
    of its kind.

    ``ComposedPolicy(images=FastVPolicy(), text=LearnedPolicy(), evict=StreamingLLMPolicy(window=64))`` ranks
    images by attention, gates text by the output-text predictor and keeps a window of generated tokens.

    Parameters
    ----------
    images, text, evict : TokenPolicy | None
        The parts (any `TokenPolicy`; only the named question is asked of each).
    image_keep_rate : float | None
        Share of each image's tokens kept (None: the image part's rate, else the model config's).
    """

    images: TokenPolicy | None = None
    text: TokenPolicy | None = None
    evict: TokenPolicy | None = None
    image_keep_rate: float | None = None

    def check(self) -> None:
        super().check()
        for part in (self.images, self.text, self.evict):
            if isinstance(part, ComposedPolicy):
                raise TypeError("ComposedPolicy parts must be single policies, not another ComposedPolicy.")
            check_policy(part)
        if self.image_keep_rate is None and self.images is not None:
            self.image_keep_rate = self.images.image_keep_rate

    # what the engine prepares follows the parts that run
    @property
    def evicts_text(self) -> bool:
        return self.evict is not None and self.evict.evicts_text

    @property
    def needs_attention(self) -> bool:
        return self.evict is not None and self.evict.needs_attention

    def image_scores(self, model, hidden, positions, context):
        return None if self.images is None else self.images.image_scores(model, hidden, positions, context)

    def text_keep(self, model, hidden, positions, threshold=None):
        if self.text is None:
            return None
        if threshold is None:
            return self.text.text_keep(model, hidden, positions)
        return self.text.text_keep(model, hidden, positions, threshold=threshold)

    def text_evict(self, model, slots):
        return None if self.evict is None else self.evict.text_evict(model, slots)


__all__ = ["ComposedPolicy"]
