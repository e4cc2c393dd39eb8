"""What a sparse forward kept and what the cache holds, readable by the caller without logs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ForwardRecord:
    """Filled by one forward pass of the sparse decoder loop."""

    kept_index: torch.Tensor | None = None  # [B, N'] input positions entering layers >= K (None: all)
    kept_valid: torch.Tensor | None = None  # [B, N'] False for filler slots of samples that kept fewer
    image_tokens: torch.Tensor | None = None  # [B] image tokens in this input
    image_kept: torch.Tensor | None = None  # [B] of those, kept for layers >= K
    text_tokens: torch.Tensor | None = None  # [B] generated tokens judged by the text policy
    text_kept: torch.Tensor | None = None  # [B] of those, kept
    text_decided: bool = False  # the text policy decided on this input's tokens (so some may be left out)
    text_evicted: torch.Tensor | None = None  # [B] earlier generated tokens evicted (cache) / hidden from the newest
    image_keep_mean: torch.Tensor | None = None  # training: [B] mean (differentiable) keep of image tokens
    text_keep_mean: torch.Tensor | None = None  # training: [B] mean keep of the eligible answer tokens


@dataclass
class SparsityStats:
    """Per-sample savings over one `generate()` (or several forwards). Pass it as `sparsity_stats=`.

    Attributes
    ----------
    image_tokens, image_tokens_kept : [B] image tokens in the prompt and kept for layers >= K.
    generated_tokens, generated_tokens_kept : [B] generated tokens judged by the output-text policy,
        and how many of them enter the context of layers >= K. With a cache every token fed back is
        judged (N new tokens -> N - 1 judged: the last one is never fed back); without a cache the
        newest token of a step is always kept, so the last step judges N - 2.
    generated_tokens_evicted : [B] of the kept ones, how many an eviction policy (e.g. a StreamingLLM
        window) later removed from layers >= K: evicted from the cache, or, without a cache, hidden
        from the newest token of the last step. None when the policy evicts nothing.
    kv_lengths : per layer, [B] tokens held in the KV cache (after the last step; empty without cache).
        Layers < K hold the padded batch length, layers >= K only each sample's kept tokens.
    kv_bytes : per layer, bytes held by the K/V tensors.
    dense_kv_bytes : bytes a dense cache of the same batch would hold (every layer at full length).
    forward_calls : forward passes seen.
    """

    image_tokens: torch.Tensor | None = None
    image_tokens_kept: torch.Tensor | None = None
    generated_tokens: torch.Tensor | None = None
    generated_tokens_kept: torch.Tensor | None = None
    generated_tokens_evicted: torch.Tensor | None = None
    kv_lengths: list[torch.Tensor] = field(default_factory=list)
    kv_bytes: list[int] = field(default_factory=list)
    dense_kv_bytes: int = 0
    forward_calls: int = 0

    def update(self, record: ForwardRecord, cache=None, accumulate_text: bool = True) -> None:
        """Fold one forward's record in; text counts add up with a cache and are replaced without one."""
        self.forward_calls += 1
        if record.image_tokens is not None and bool(record.image_tokens.any()):
            self.image_tokens, self.image_tokens_kept = record.image_tokens, record.image_kept
        if record.text_tokens is not None:
            if accumulate_text and self.generated_tokens is not None:
                self.generated_tokens = self.generated_tokens + record.text_tokens
                self.generated_tokens_kept = self.generated_tokens_kept + record.text_kept
            else:
                self.generated_tokens, self.generated_tokens_kept = record.text_tokens, record.text_kept
        if record.text_evicted is not None:
            if accumulate_text and self.generated_tokens_evicted is not None:
                self.generated_tokens_evicted = self.generated_tokens_evicted + record.text_evicted
            else:
                self.generated_tokens_evicted = record.text_evicted
        if cache is not None:
            self.kv_lengths = cache.layer_lengths()
            self.kv_bytes = cache.layer_nbytes()
            self.dense_kv_bytes = cache.dense_nbytes()

    @property
    def total_kv_bytes(self) -> int:
        return sum(self.kv_bytes)

    def summary(self) -> dict:
        """Plain numbers for printing or JSON."""

        def lst(t):
            return None if t is None else t.tolist()

        return {
            "image_tokens": lst(self.image_tokens),
            "image_tokens_kept": lst(self.image_tokens_kept),
            "generated_tokens": lst(self.generated_tokens),
            "generated_tokens_kept": lst(self.generated_tokens_kept),
            "generated_tokens_evicted": lst(self.generated_tokens_evicted),
            "kv_bytes": self.total_kv_bytes,
            "dense_kv_bytes": self.dense_kv_bytes,
            "kv_lengths": [lst(t) for t in self.kv_lengths],
        }


__all__ = ["ForwardRecord", "SparsityStats"]
