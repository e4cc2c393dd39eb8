"""The interface every token-selection policy implements, and what the engine hands it.

The engine (`modeling.py`: gather, cache, masks) asks a policy three questions at layer K:

* `image_scores`: how much each image token deserves to stay; the engine keeps each image's top
  ``floor(rate * tokens)``.
* `text_keep`: does a generated token enter the context of layers >= K at all (decided once, when
  it is inserted).
* `text_evict`: which earlier generated tokens leave that context now (decided at every step; an
  evicted token stays evicted). With a cache the engine removes them from `DynamicLlavaCache`;
  without one it hides them from every query that comes after their eviction, so both give the
  same tokens.

A method returning ``None`` keeps every token of that kind. The helpers at the bottom compute one
layer's attention probabilities for a few queries only, for policies that rank tokens by
attention without switching the model to eager attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

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

    def text_keep(self, model, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """hidden [M, H], positions [M] -> bool [M]: which new generated tokens enter layers >= K."""
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


def layer_keys(layer, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Keys of a Llama decoder `layer` for the hidden states entering it: [B, kv_heads, N, head_dim], after RoPE."""
    attn = layer.self_attn
    batch, seq, _ = hidden.shape
    keys = attn.k_proj(layer.input_layernorm(hidden)).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    return _rope(keys, *position_embeddings)


def query_attention(layer, hidden: torch.Tensor, position_embeddings, keys: torch.Tensor, allowed: torch.Tensor):
    """Attention probabilities of a few queries in `layer`, averaged over heads: [B, Q, T].

    hidden [B, Q, H] entering the layer at the queries, position_embeddings their (cos, sin), keys
    [B, kv_heads, T, head_dim] after RoPE, allowed [B, Q, T] bool. Same arithmetic as eager attention
    (scaled QK^T, softmax in fp32), but only these rows: the layer itself keeps its own implementation.
    """
    attn = layer.self_attn
    batch, queries, _ = hidden.shape
    q = attn.q_proj(layer.input_layernorm(hidden)).view(batch, queries, -1, attn.head_dim).transpose(1, 2)
    q = _rope(q, *position_embeddings)
    scores = torch.matmul(q, repeat_kv(keys, attn.num_key_value_groups).transpose(2, 3)) * attn.scaling
    scores = scores.float().masked_fill(~allowed.unsqueeze(1), float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' `apply_rotary_pos_emb` on one tensor (the empty second operand costs nothing)."""
    return apply_rotary_pos_emb(x, x[:, :0], cos, sin)[0]


__all__ = [
    "PolicyContext",
    "TextSlots",
    "TokenPolicy",
    "check_optional_rate",
    "check_policy",
    "layer_keys",
    "refuse_uneven_images",
    "query_attention",
]
