"""Masked-softmax attention for training layers >= K, where gradients must reach the keep mask.

SDPA cannot take a differentiable multiplicative key mask, so layers >= K compute attention here
(Dynamic-LLaVA, section 3): scores with the causal and padding bias, minus the row max, exponentiated in
fp32, multiplied by the key mask G (G[i, j] = keep[j] for j != i, G[i, i] = 1: a token always sees
itself), renormalised. With a hard 0/1 mask this equals removing the dropped keys, which is what
inference does; dropped tokens are still computed as queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

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


def masked_layer_forward(layer, hidden, position_embeddings, allowed, key_keep) -> torch.Tensor:
    """One `LlamaDecoderLayer` with `masked_softmax_attention`, using the layer's own modules (LoRA-wrapped or not)."""
    attn = layer.self_attn
    residual = hidden
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    query = attn.q_proj(x).view(shape).transpose(1, 2)
    key = attn.k_proj(x).view(shape).transpose(1, 2)
    value = attn.v_proj(x).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    out = masked_softmax_attention(
        query, key, value, allowed, key_keep, attn.scaling, attn.attention_dropout, attn.training
    )
    hidden = residual + attn.o_proj(out.reshape(*x.shape[:-1], -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


__all__ = ["allowed_keys", "masked_softmax_attention", "masked_layer_forward"]
