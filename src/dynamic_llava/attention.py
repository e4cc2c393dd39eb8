"""Masked-softmax attention for training layers >= K, where gradients must reach the keep mask.

SDPA cannot take a differentiable multiplicative key mask, so layers >= K compute attention here
(Dynamic-LLaVA, section 3): scores with the causal and padding bias, minus the row max, exponentiated in
fp32, multiplied by the key mask G (G[i, j] = keep[j] for j != i, G[i, i] = 1: a token always sees
itself), renormalised. With a hard 0/1 mask this equals removing the dropped keys, which is what
inference does; dropped tokens are still computed as queries.

It is registered with transformers' `AttentionInterface` as ``"dynamic_llava_masked"``, and
`masked_layer_forward` runs a decoder layer's own `forward` with it, so whatever the layer does
around attention (norms, projections, rotary, LoRA wrappers) is the layer's.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.models.llama.modeling_llama import repeat_kv

EPS = 1e-6


def allowed_keys(attention_mask: torch.Tensor | None, batch: int, seq: int, device) -> torch.Tensor:
    """[B, 1, N, N] bool: causal and not padding; the diagonal always (no row is empty)."""
    positions = torch.arange(seq, device=device)
    allowed = (positions[None, :] <= positions[:, None]).expand(batch, 1, seq, seq)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    return allowed | torch.eye(seq, dtype=torch.bool, device=device)


def masked_softmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    key_keep: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """query [B, H, N, d], key/value [B, H_kv, N, d], allowed [B, 1, N, N], key_keep [B, N] -> [B, N, H, d]."""
    key = repeat_kv(key, query.shape[1] // key.shape[1])
    value = repeat_kv(value, query.shape[1] // value.shape[1])
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    seq = query.shape[2]
    eye = torch.eye(seq, dtype=torch.bool, device=query.device)
    gate = torch.where(eye, torch.ones((), device=query.device), key_keep.float()[:, None, None, :])
    weights = weights * gate
    weights = weights / (weights.sum(dim=-1, keepdim=True) + EPS)
    weights = F.dropout(weights, p=dropout, training=training)
    out = torch.matmul(weights, value.float()).to(value.dtype)
    return out.transpose(1, 2).contiguous()


MASKED_ATTENTION = "dynamic_llava_masked"


def _masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, key_keep=None,
                      **kwargs):
    """`AttentionInterface` entry: `attention_mask` is the [B, 1, N, N] bool `allowed_keys`, `key_keep` [B, N]."""
    if key_keep is None:
        raise RuntimeError(f"{MASKED_ATTENTION} attention needs key_keep: run the layer through masked_layer_forward.")
    out = masked_softmax_attention(query, key, value, attention_mask, key_keep, scaling, dropout, module.training)
    return out, None


AttentionInterface.register(MASKED_ATTENTION, _masked_attention)


@contextmanager
def _masked_attention_in(layer):
    """Inside the block ``layer`` attends with `MASKED_ATTENTION` (its config is shared by the layers, so it is
    switched back after) and does not checkpoint itself: the caller checkpoints `masked_layer_forward` whole,
    so that the recomputation runs inside this block too."""
    config = layer.self_attn.config
    previous, checkpointing = config._attn_implementation_internal, getattr(layer, "gradient_checkpointing", False)
    config._attn_implementation_internal = MASKED_ATTENTION
    layer.gradient_checkpointing = False
    try:
        yield
    finally:
        config._attn_implementation_internal = previous
        layer.gradient_checkpointing = checkpointing


def masked_layer_forward(layer, hidden, position_embeddings, allowed, key_keep) -> torch.Tensor:
    """A decoder layer's own forward with the masked-softmax attention (checkpoint this function, not the layer)."""
    with _masked_attention_in(layer):
        return layer(hidden, attention_mask=allowed, position_embeddings=position_embeddings, key_keep=key_keep)


__all__ = ["MASKED_ATTENTION", "allowed_keys", "masked_softmax_attention", "masked_layer_forward"]
