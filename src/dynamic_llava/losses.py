"""The budget term of sparsification-aware training (Dynamic-LLaVA, ICLR 2025)."""

from __future__ import annotations

import torch

from .stats import ForwardRecord


def budget_loss(record: ForwardRecord, image_target: float, text_target: float) -> torch.Tensor:
    """R_I + R_OT: squared gaps between the realised keep ratios and their targets.

    R_I averages (r_I - mean keep of a sample's image tokens)^2 over the samples that have images;
    R_OT sums (r_OT - mean keep of the last answer's tokens)^2 over the eligible samples and divides
    by the batch size (ineligible samples count as 0), as in the authors' code.
    """
    total = torch.zeros((), device=record.image_keep_mean.device if record.image_keep_mean is not None else None)
    if record.image_keep_mean is not None:
        has_images = record.image_tokens > 0
        if bool(has_images.any()):
            total = total + ((image_target - record.image_keep_mean[has_images]) ** 2).mean()
    if record.text_keep_mean is not None:
        eligible = record.text_tokens > 0
        gaps = (text_target - record.text_keep_mean) ** 2
        total = total + torch.where(eligible, gaps, torch.zeros_like(gaps)).sum() / gaps.shape[0]
    return total


__all__ = ["budget_loss"]
