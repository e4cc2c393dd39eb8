"""The two learned predictors of Dynamic-LLaVA. Both emit two logits per token: index 0 = keep."""

from __future__ import annotations

import torch
from torch import nn

KEEP = 0  # logit index meaning "keep", as in the authors' code (converted weights behave as trained)


def _mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with GELU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class ImagePredictor(nn.Module):
    """Scores the image tokens of each image from the residual stream entering layer K.

    LayerNorm -> Linear(H, dim) -> GELU, then pre-LN transformer blocks over the tokens of one image
    (no positional embedding). Half of the channels stay per token, the other half is mean-pooled
    over the image and broadcast back; the concatenation goes through an MLP to 2 logits.
    """

    def __init__(self, hidden_size: int, dim: int, heads: int, mlp_dim: int, blocks: int, head_dims: list[int]):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Sequential(nn.Linear(hidden_size, dim), nn.GELU())
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, mlp_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(blocks)
        )
        self.head = _mlp([dim, *head_dims, 2])

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: [images, tokens, H]; valid: [images, tokens] bool (None = all valid). Returns [images, tokens, 2]."""
        x = self.proj(self.norm(hidden))
        pad = None if valid is None else ~valid
        for block in self.blocks:
            x = block(x, src_key_padding_mask=pad)
        local, pooled = x.chunk(2, dim=-1)
        if valid is None:
            pooled = pooled.mean(dim=1, keepdim=True)
        else:
            w = valid.unsqueeze(-1).to(pooled.dtype)
            pooled = (pooled * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp(min=1)
        return self.head(torch.cat([local, pooled.expand_as(local)], dim=-1))


class TextPredictor(nn.Module):
    """Per-token MLP deciding whether a generated token stays in the context of layers >= K.

    No context mixing: a KV-cache decision must depend only on the current token.
    """

    def __init__(self, hidden_size: int, dims: list[int]):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.mlp = _mlp([hidden_size, *dims, 2])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., H]. Returns [..., 2] logits."""
        return self.mlp(self.norm(hidden))


def keep_log_prob(logits: torch.Tensor) -> torch.Tensor:
    """log P(keep) in fp32: the score by which each image keeps its top share."""
    return torch.log_softmax(logits.float(), dim=-1)[..., KEEP]


def sample_keep(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Hard Gumbel-Softmax keep mask (0/1 forward, straight-through gradient), sampled in fp32."""
    return nn.functional.gumbel_softmax(torch.log_softmax(logits.float(), dim=-1), tau=tau, hard=True)[..., KEEP]


def sample_top_share(logits: torch.Tensor, tau: float, choose) -> torch.Tensor:
    """Hard keep mask chosen as inference chooses: ``choose(log_prob)`` (bool, e.g. each image's top share) applied
    to the keep log-probability of the margin plus logistic noise (the difference of the two Gumbel draws of
    `sample_keep`); straight-through gradient from the noisy keep probability at temperature `tau`, as in
    `sample_keep`. Sampled in fp32."""
    logits = logits.float()
    margin = logits[..., KEEP] - logits[..., 1 - KEEP]
    u = torch.rand_like(margin).clamp(1e-6, 1 - 1e-6)
    noisy = margin + torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid(noisy / tau)
    return choose(torch.nn.functional.logsigmoid(noisy.detach())).to(soft.dtype) + soft - soft.detach()


__all__ = ["ImagePredictor", "TextPredictor", "KEEP", "keep_log_prob", "sample_keep", "sample_top_share"]
