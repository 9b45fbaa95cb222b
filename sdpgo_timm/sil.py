"""Sequential Iterative Learning (SIL): soft labels, KL and per-sample loss weighting.

Pure tensor functions, no model or data knowledge. A replayed sample distils from the
softened prediction its own model made one step earlier (the self-teacher), restricted to
its target classes plus the top-k most confusable other classes (the poster's "customised
soft label"), and the distillation term is balanced against cross-entropy by a per-sample α.
See docs/METHOD.md, section 1.
"""
from typing import Optional

import torch
import torch.nn.functional as F

WEIGHTINGS = ('complementary', 'additive')


def per_sample_cross_entropy(
        logits: torch.Tensor,
        target: torch.Tensor,
        smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of each sample, for class-index or soft (mixed/smoothed) targets.

    Computed in fp32 so that AMP autocast does not change the loss values.
    """
    return F.cross_entropy(logits.float(), target, reduction='none', label_smoothing=smoothing)


def target_class_mask(target: torch.Tensor, num_classes: int, rel_tol: float = 1e-6) -> torch.Tensor:
    """Boolean (B, C) mask of each sample's target classes T_i.

    Rule: a class-index target gives {y_i}. A soft target (label smoothing, Mixup, CutMix)
    gives the classes whose mass lies above the smoothing floor, the smallest entry of the
    row: one class for a smoothed label, both classes of a mixed pair (one if the pair
    shares its class). A row with no mass above its floor (uniform) falls back to its argmax.
    """
    if target.ndim == 1:
        return F.one_hot(target.long(), num_classes).bool()
    target = target.float()
    floor = target.min(dim=1, keepdim=True).values
    scale = target.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    mask = (target - floor) > rel_tol * scale
    empty = ~mask.any(dim=1)
    if empty.any():
        mask[empty] = F.one_hot(target[empty].argmax(dim=1), num_classes).bool()
    return mask


def topk_soft_label(teacher_prob: torch.Tensor, target_mask: torch.Tensor, topk: int) -> torch.Tensor:
    """Customised soft label q_i: p_i kept on T_i plus its top-k other classes, renormalised.

    topk < 0 keeps the full distribution (DLB's target).
    """
    if topk < 0:
        return teacher_prob
    keep = target_mask.clone()
    if topk > 0:
        others = teacher_prob.masked_fill(target_mask, -1.0)
        idx = others.topk(topk, dim=1).indices
        keep.scatter_(1, idx, True)
    q = teacher_prob * keep
    return q / q.sum(dim=1, keepdim=True).clamp_min(1e-12)


def per_sample_kl(q: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(q_i || softmax(z_i / τ)) per sample, in fp32; entries with q = 0 contribute 0."""
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    return (torch.xlogy(q, q) - q * log_p).sum(dim=1)


def weight_losses(
        ce: torch.Tensor,
        kl: torch.Tensor,
        alpha: torch.Tensor,
        temperature: float,
        weighting: str = 'complementary',
) -> torch.Tensor:
    """Per-sample loss of replayed samples.

    complementary: (1 − α)·CE + α·τ²·KL  (default; α balances the two losses)
    additive:      CE + α·τ²·KL          (DLB's form)
    """
    kd = alpha * (temperature ** 2) * kl
    if weighting == 'complementary':
        return (1.0 - alpha) * ce + kd
    if weighting == 'additive':
        return ce + kd
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def teacher_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Self-teacher p_i = softmax(z_i / τ), fp32 and detached (cached for the next step)."""
    return F.softmax(logits.detach().float() / temperature, dim=1)


def sil_loss(
        logits: torch.Tensor,
        ce: torch.Tensor,
        target: torch.Tensor,
        teacher_prob: Optional[torch.Tensor],
        alpha: Optional[torch.Tensor],
        *,
        temperature: float,
        topk: int,
        weighting: str,
) -> dict:
    """Loss of one model batch whose first len(teacher_prob) rows are replayed samples.

    `ce` holds the per-sample task loss of every row. Returns the mean loss over the
    batch and its parts: mean CE over the batch and mean τ²·KL over the replay half
    (0 without one).
    """
    num_replay = 0 if teacher_prob is None else teacher_prob.shape[0]
    if num_replay == 0:
        return dict(loss=ce.mean(), loss_ce=ce.mean().detach(), loss_sil=ce.new_zeros(()))
    mask = target_class_mask(target[:num_replay], logits.shape[1])
    q = topk_soft_label(teacher_prob, mask, topk)
    kl = per_sample_kl(q, logits[:num_replay], temperature)
    replay_loss = weight_losses(ce[:num_replay], kl, alpha, temperature, weighting)
    loss = torch.cat([replay_loss, ce[num_replay:]]).mean()
    return dict(
        loss=loss,
        loss_ce=ce.mean().detach(),
        loss_sil=((temperature ** 2) * kl).mean().detach(),
    )
