"""The interface every token-selection policy implements, and what the engine hands it.

The engine (`decoder.py`: gather, cache, masks) asks a policy three questions at layer K:

* `image_scores`: how much each image token deserves to stay; the engine keeps each image's top
  ``floor(rate * tokens)``.
* `text_keep`: does a generated token enter the context of layers >= K at all (decided once, when
  it is inserted).
* `text_evict`: which earlier generated tokens leave that context now (decided at every step; an
  evicted token stays evicted). With a cache the engine removes them from `DynamicLlavaCache`;
  without one it hides them from every query that comes after their eviction, so both give the
  same tokens.

A method returning ``None`` keeps every token of that kind. `attention_probe` runs one layer's own
attention module with a probe registered in transformers' `AttentionInterface` (its keys, and the
probabilities of a few queries), for policies that rank tokens by attention without switching the model
to eager attention or re-implementing any family's attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import AttentionInterface
from transformers.models.llama.modeling_llama import repeat_kv

from ..validation import check_rate


@dataclass
class PolicyContext:
    """What the engine knows at layer K besides the hidden states entering it (one forward pass).

    Attributes
    ----------
    hidden_before : [B, N, H] hidden states entering layer K - 1.
    position_embeddings : rotary (cos, sin), each [B, N, head_dim], at the tokens' original positions.
    padding_mask : [B, N] bool, False for (left) padding.
    image_token_mask : [B, N] bool, True for image tokens.
    prompt_end : index in this input of the last prompt token.
    past : tokens cached before this input (0 at prefill and without cache).
    inputs_embeds : [B, N, H] the decoder's input (word embeddings; projected image features at image
        tokens), for selections made before the language model (None if the caller has none).
    hidden : [B, N, H] hidden states entering layer K for every token (None if the caller has none).
    image_layout : where each image's tokens are (`decoder.ImageLayout`; set by the engine before
        `image_scores`): ``image_layout.gather(x)`` takes a [B, N, ...] tensor to the [images, tokens, ...]
        that `image_scores` receives; ``image_layout.valid`` is False for padding when images differ in size.
    image_keep_counts : how many tokens each image keeps (set by the engine before `image_scores`).
    """

    hidden_before: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    padding_mask: torch.Tensor
    image_token_mask: torch.Tensor
    prompt_end: int
    past: int = 0
    inputs_embeds: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    image_layout: object | None = None
    image_keep_counts: list[int] | None = None


@dataclass
class TextSlots:
    """Generated tokens a query might still see in layers >= K, as `text_evict` receives them.

    With a cache: the stored slots ([B, T]) seen from the newest query; without one: every key
    seen from every query ([B, Q, T]). A rule that only reads `ages` elementwise serves both.

    Attributes
    ----------
    ages : long, query column - key column: how many tokens after the key the query comes (0: itself).
    generated : bool, the key is a generated token (only these may be evicted; other entries are meaningless).
    attention : [B, T] float, attention each stored token has received so far (with a cache, for
        policies with ``needs_attention``; None otherwise).
    """

    ages: torch.Tensor
    generated: torch.Tensor
    attention: torch.Tensor | None = None


class TokenPolicy:
    """Interface: return ``None`` from a method to keep every token of that kind.

    Class flags tell the engine what to prepare: ``evicts_text`` (call `text_evict` at every
    step) and ``needs_attention`` (accumulate the attention stored tokens receive in layer K).
    """

    image_keep_rate: float | None = None  # None: use the model config's rate
    evicts_text: ClassVar[bool] = False
    needs_attention: ClassVar[bool] = False

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise `TypeError` / `ValueError` for parameters that cannot work (at construction and before each use)."""
        check_optional_rate("image_keep_rate", self.image_keep_rate)

    def image_scores(
        self, model, hidden: torch.Tensor, positions: torch.Tensor, context: PolicyContext
    ) -> torch.Tensor | None:
        """hidden [images, tokens, H] entering layer K, positions [images, tokens] -> scores [images, tokens]
        (higher = keep). Images are in the order of `context.image_token_mask`; when they differ in size,
        `tokens` is the largest and `context.image_layout.valid` marks the padding (its scores are ignored)."""
        return None

    def text_keep(self, model, hidden: torch.Tensor, positions: torch.Tensor,
                  threshold: torch.Tensor | None = None) -> torch.Tensor | None:
        """hidden [M, H], positions [M] -> bool [M]: which new generated tokens enter layers >= K.

        `threshold` ([M] float, from per-request settings, or the float -inf when every request keeps every token;
        None: the model's own rule) is the keep-minus-drop logit margin a token must exceed: a gate that scores
        tokens (the learned one) honours it, others ignore it.
        """
        return None

    def text_evict(self, model, slots: TextSlots) -> torch.Tensor | None:
        """bool, shaped like `slots.ages`: generated tokens that leave the context of layers >= K.

        Must be monotone: a token evicted for a query stays evicted for every later query.
        """
        return None


def check_policy(policy) -> None:
    """Raise `TypeError` unless ``policy`` is None or a `TokenPolicy` instance (not a name, not a class), and
    whatever its own `check` raises."""
    if isinstance(policy, TokenPolicy):
        policy.check()  # its parameters may have been changed since it was made
        return
    if policy is None:
        return
    if isinstance(policy, type) and issubclass(policy, TokenPolicy):
        raise TypeError(f"sparsity_policy={policy.__name__}: expected an instance; pass {policy.__name__}().")
    raise TypeError(
        f"sparsity_policy={policy!r}: expected a TokenPolicy instance (LearnedPolicy(), FastVPolicy(), "
        "CDPrunerPolicy(), DARTPolicy(), RandomPolicy(...), StreamingLLMPolicy(...), H2OPolicy(...)), not a "
        f"{type(policy).__name__}."
    )


def refuse_uneven_images(policy, context: PolicyContext) -> None:
    """Raise `NotImplementedError` for a policy that assumes every image has the same number of tokens."""
    if context.image_layout is not None and getattr(context.image_layout, "valid", None) is not None:
        raise NotImplementedError(
            f"{type(policy).__name__} needs every image to have the same number of tokens; these differ in size "
            "(use LearnedPolicy, FastVPolicy or RandomPolicy, or images of one size)."
        )


def check_optional_rate(name: str, value) -> None:
    """A policy's keep rate: None (the model config's) or a finite number in (0, 1]."""
    if value is not None:
        check_rate(name, value, "None uses the model config's rate")


PROBE_ATTENTION = "dynamic_llava_probe"


@dataclass
class _Probe:
    """What one probing pass of a layer's attention asks for and gets back."""

    allowed: torch.Tensor | None = None  # [B, Q, T] bool: compute these query rows' probabilities
    rows: slice | None = None  # which queries (None: all)
    keys: torch.Tensor | None = None  # [B, kv_heads, T, head_dim], after the layer's own norms and RoPE
    probs: torch.Tensor | None = None  # [B, Q, T], mean over heads


def _probe_attention(module, query, key, value, attention_mask, scaling=None, probe=None, **kwargs):
    """`AttentionInterface` entry: records the keys (and the probabilities of some rows); its output is unused."""
    probe.keys = key
    if probe.allowed is not None:
        q = query if probe.rows is None else query[:, :, probe.rows]
        scores = torch.matmul(q, repeat_kv(key, module.num_key_value_groups).transpose(2, 3)) * scaling
        scores = scores.float().masked_fill(~probe.allowed.unsqueeze(1), float("-inf"))
        probe.probs = scores.softmax(dim=-1).mean(dim=1)
    return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None


AttentionInterface.register(PROBE_ATTENTION, _probe_attention)


class _Peek:
    """Stands in for a cache for one call: the layer's new keys follow the stored ones, nothing is stored."""

    def __init__(self, keys: torch.Tensor):
        self.keys = keys

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        values = value_states.new_zeros(*self.keys.shape[:-1], value_states.shape[-1])
        return torch.cat([self.keys, key_states], dim=2), torch.cat([values, value_states], dim=2)


def attention_probe(layer, hidden: torch.Tensor, position_embeddings, allowed: torch.Tensor | None = None,
                    rows: slice | None = None, past_keys: torch.Tensor | None = None):
    """Run decoder `layer`'s own attention module (its projections, q/k norms and RoPE, whatever the family) on
    `hidden` entering the layer, with the probe attention registered in transformers' `AttentionInterface`.

    Returns (keys [B, kv_heads, T, head_dim], probs [B, Q, T] or None): the keys after RoPE (`past_keys`, stored
    ones, first) and, with `allowed` [B, Q, T], the attention probabilities of the query `rows` (softmax in fp32,
    mean over heads), as eager attention computes them. The layer's configured implementation is restored after.
    """
    attn = layer.self_attn
    probe = _Probe(allowed=allowed, rows=rows)
    config = attn.config
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = PROBE_ATTENTION
    try:
        attn(hidden_states=layer.input_layernorm(hidden), position_embeddings=position_embeddings, attention_mask=None,
             past_key_values=None if past_keys is None else _Peek(past_keys), probe=probe)
    finally:
        config._attn_implementation_internal = previous
    return probe.keys, probe.probs


def layer_keys(layer, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Keys of decoder `layer` for the hidden states entering it: [B, kv_heads, N, head_dim], after RoPE."""
    return attention_probe(layer, hidden, position_embeddings)[0]


__all__ = [
    "PolicyContext",
    "TextSlots",
    "TokenPolicy",
    "check_optional_rate",
    "attention_probe",
    "check_policy",
    "layer_keys",
    "refuse_uneven_images",
]
