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




class _BalancedMaskGradient(torch.autograd.Function):
    """Identity forward; backward centres the gradient over each sample's tokens of each group and rescales it
    to a per-token RMS of ``scale / (tokens * batch)``, the size of a mean loss's gradient."""

    @staticmethod
    def forward(ctx, keep, groups, scale):
        ctx.save_for_backward(groups)
        ctx.scale = scale
        return keep.view_as(keep)

    @staticmethod
    def backward(ctx, grad):
        (groups,) = ctx.saved_tensors  # [G, B, N] bool
        out = grad.clone()
        batch = grad.shape[0]
        for group in groups:
            count = group.sum(dim=1, keepdim=True)
            if not bool(count.any()):
                continue
            n = count.clamp(min=1).to(grad.dtype)
            mean = (grad * group).sum(dim=1, keepdim=True) / n
            centred = (grad - mean) * group
            rms = ((centred**2).sum(dim=1, keepdim=True) / n).sqrt()
            balanced = centred / rms.clamp(min=torch.finfo(grad.dtype).tiny) * (ctx.scale / (n * batch))
            out = torch.where(group, balanced, out)
        return out, None, None


def balance_mask_gradient(keep: torch.Tensor, groups: list[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """The keep mask [B, N] as the attention should see it under ``mask_gradient="balanced"``.

    The LM loss's straight-through gradient on a keep decision can be orders of magnitude larger than the budget
    term's (a dropped key that held most of a row's attention), so left raw it decides how many tokens are kept
    and the keep ratios never reach their targets. Centred over each sample's tokens of a group (``groups``:
    [B, N] bool masks, the image tokens and the droppable answer tokens) it can only move tokens against each
    other: which are kept; *how many* is left to the budget term. It is also rescaled to a per-token RMS of
    ``scale / (tokens * batch)``: the model passes ``budget_weight`` (times ``1 / accumulation steps``), the size
    of the budget term's per-token gradient ``2 * budget_weight * gap / (tokens * batch)`` at a gap of one half,
    so the two stay comparable however large the LM's gradient is.
    """
    groups = [g for g in groups if g is not None]
    if not groups or not keep.requires_grad:
        return keep
    return _BalancedMaskGradient.apply(keep, torch.stack([g.bool() for g in groups]), float(scale))


def per_answer_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean over the batch's answers of each answer's mean cross-entropy: a one-word answer weighs as much as a
    70-token description. An answer is a run of labelled tokens (its end token included); labels are unshifted,
    as the stock causal-LM loss takes them."""
    targets = labels[:, 1:]
    valid = targets != ignore_index
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets.clamp(min=0),
                                            reduction="none") * valid
    starts = valid & ~torch.nn.functional.pad(valid[:, :-1], (1, 0))
    answers = int(starts.sum())
    if answers == 0:
        return logits.sum() * 0.0  # nothing labelled: a zero that keeps the graph
    span = torch.cumsum(starts.flatten(), 0).view_as(starts) - 1  # each labelled token's answer index
    span = torch.where(valid, span, torch.full_like(span, answers))  # unlabelled tokens: a spare bin
    lengths = torch.zeros(answers + 1, device=logits.device).scatter_add_(0, span.flatten(), valid.flatten().float())
    return (nll / lengths[span].clamp(min=1)).sum() / answers


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      ignore_index: int = -100) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, averaged over the labelled (answer) tokens: the
    sparse model is pulled towards what the dense model it came from predicts. Labels are unshifted, as in
    `per_answer_loss`; both logits are [B, N, V] over the same tokens."""
    valid = labels[:, 1:] != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    student = torch.log_softmax(logits[:, :-1][valid].float(), dim=-1)
    teacher = torch.log_softmax(teacher_logits[:, :-1][valid].float(), dim=-1)
    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")


def hidden_distillation_loss(hidden: torch.Tensor, teacher_hidden: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Relative squared error ||h - h_teacher||^2 / ||h_teacher||^2 of the last hidden states (what the LM head
    reads), averaged over the positions in `where` [B, N] (the text tokens): the sparse model is pulled towards
    the dense model's representation of the question and the answer, not only its next-token guesses."""
    if hidden.shape != teacher_hidden.shape or hidden.shape[:-1] != where.shape:
        raise ValueError(f"hidden states {list(hidden.shape)} and {list(teacher_hidden.shape)} and positions "
                         f"{list(where.shape)} do not line up: the student and the teacher must see the same tokens.")
    if not bool(where.any()):
        return hidden.sum() * 0.0
    student, teacher = hidden[where].float(), teacher_hidden[where].float()
    return (((student - teacher) ** 2).sum(-1) / (teacher**2).sum(-1).clamp(min=1e-6)).mean()


__all__ = ["balance_mask_gradient", "budget_loss", "distillation_loss", "hidden_distillation_loss", "per_answer_loss"]
