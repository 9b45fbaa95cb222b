"""SIL formulas checked against direct, separate computations on hand-made tensors."""
import math

import pytest
import torch
from timm.data.mixup import mixup_target

from sdpgo_timm.sil import (
    per_sample_kl, sil_loss, target_class_mask, topk_soft_label, weight_losses, per_sample_cross_entropy)


def test_target_mask_hard_labels():
    mask = target_class_mask(torch.tensor([2, 0]), 4)
    assert mask.tolist() == [[False, False, True, False], [True, False, False, False]]


def test_target_mask_smoothed_labels_keep_only_the_label():
    target = mixup_target(torch.tensor([3, 1]), 5, lam=1.0, smoothing=0.1)
    assert target_class_mask(target, 5).tolist() == [
        [False, False, False, True, False], [False, True, False, False, False]]


def test_target_mask_mixed_labels_keep_both_classes():
    # timm pairs sample i with sample B-1-i: (2, 4) and (4, 2) with the middle sample (1, 1) alone
    target = mixup_target(torch.tensor([2, 1, 4]), 5, lam=0.7, smoothing=0.1)
    mask = target_class_mask(target, 5)
    assert mask[0].nonzero().flatten().tolist() == [2, 4]
    assert mask[1].nonzero().flatten().tolist() == [1]
    assert mask[2].nonzero().flatten().tolist() == [2, 4]


def _direct_topk(p, targets, k):
    """q by explicit Python loops: keep targets plus the k largest other classes."""
    out = []
    for row, tset in zip(p.tolist(), targets):
        others = sorted((c for c in range(len(row)) if c not in tset), key=lambda c: -row[c])[:k]
        keep = set(tset) | set(others)
        total = sum(row[c] for c in keep)
        out.append([row[c] / total if c in keep else 0.0 for c in range(len(row))])
    return torch.tensor(out)


def test_topk_soft_label_matches_direct_computation():
    p = torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15], [0.30, 0.05, 0.25, 0.20, 0.20]])
    mask = target_class_mask(torch.tensor([0, 2]), 5)
    q = topk_soft_label(p, mask, 2)
    expected = _direct_topk(p, [{0}, {2}], 2)
    torch.testing.assert_close(q, expected)
    assert (q[0] > 0).tolist() == [True, True, False, True, False]


def test_topk_soft_label_with_mixed_targets_keeps_both_targets_plus_k():
    p = torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15]])
    mask = torch.tensor([[True, False, True, False, False]])
    q = topk_soft_label(p, mask, 2)
    torch.testing.assert_close(q, _direct_topk(p, [{0, 2}], 2))


def test_topk_negative_keeps_full_distribution():
    p = torch.softmax(torch.randn(3, 6), 1)
    torch.testing.assert_close(topk_soft_label(p, target_class_mask(torch.tensor([0, 1, 2]), 6), -1), p)


def test_kl_matches_direct_formula_with_zero_entries():
    q = torch.tensor([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]])
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    tau = 2.0
    expected = []
    for qi, zi in zip(q.tolist(), logits.tolist()):
        denom = sum(math.exp(z / tau) for z in zi)
        expected.append(sum(qc * math.log(qc / (math.exp(z / tau) / denom)) for qc, z in zip(qi, zi) if qc > 0))
    torch.testing.assert_close(per_sample_kl(q, logits, tau), torch.tensor(expected))


@pytest.mark.parametrize('weighting', ['complementary', 'additive'])
def test_weighting_forms(weighting):
    ce, kl, alpha, tau = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.25]), torch.tensor([0.2, 0.8]), 3.0
    got = weight_losses(ce, kl, alpha, tau, weighting)
    if weighting == 'complementary':
        expected = [(1 - 0.2) * 1.0 + 0.2 * 9 * 0.5, (1 - 0.8) * 2.0 + 0.8 * 9 * 0.25]
    else:
        expected = [1.0 + 0.2 * 9 * 0.5, 2.0 + 0.8 * 9 * 0.25]
    torch.testing.assert_close(got, torch.tensor(expected))


def test_unknown_weighting_is_rejected():
    with pytest.raises(ValueError, match='weighting'):
        weight_losses(torch.ones(1), torch.ones(1), torch.ones(1), 1.0, 'multiplicative')


def test_sil_loss_is_mean_over_replay_and_fresh():
    torch.manual_seed(0)
    logits, target = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    teacher = torch.softmax(torch.randn(2, 5), 1)
    alpha = torch.tensor([0.3, 0.6])
    ce = per_sample_cross_entropy(logits, target)
    out = sil_loss(logits, ce, target, teacher, alpha, temperature=2.0, topk=2, weighting='complementary')
    q = topk_soft_label(teacher, target_class_mask(target[:2], 5), 2)
    kl = per_sample_kl(q, logits[:2], 2.0)
    manual = torch.cat([(1 - alpha) * ce[:2] + alpha * 4.0 * kl, ce[2:]]).mean()
    torch.testing.assert_close(out['loss'], manual)
    torch.testing.assert_close(out['loss_sil'], (4.0 * kl).mean())


def test_sil_loss_without_replay_is_plain_ce():
    logits, target = torch.randn(3, 4), torch.tensor([0, 3, 1])
    ce = per_sample_cross_entropy(logits, target)
    out = sil_loss(logits, ce, target, None, None, temperature=3.0, topk=2, weighting='complementary')
    torch.testing.assert_close(out['loss'], torch.nn.functional.cross_entropy(logits, target))
    assert out['loss_sil'].item() == 0.0
