""" Synthetic label noise

Corrupts a fixed, seeded share of the training labels so that robustness to noisy labels
(SDPGO poster, Table 9) can be measured on any dataset whose targets are class indices.
NumPy's legacy `RandomState` is used on purpose: its stream is frozen, so the same seed
corrupts the same samples on every machine and NumPy version. The run knows which labels it
flipped, so it can also score how a per-sample weight (SDPGO's α) relates to them.
"""
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

NOISE_MODES = ('sym', 'asym')


def apply_label_noise(
        targets: Union[Sequence[int], np.ndarray],
        num_classes: int,
        eta: float,
        seed: int = 0,
        mode: str = 'sym',
        flip_map: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """Return a noisy copy of `targets` (int64), leaving `targets` untouched.

    Args:
        targets: Clean class indices in [0, num_classes).
        num_classes: Number of classes.
        eta: Noise rate in [0, 1).
        seed: Seed of the corruption; equal seeds corrupt equal samples.
        mode: 'sym': exactly round(eta * N) samples, chosen uniformly, get a label drawn
            uniformly from the other classes. 'asym': in each class c that `flip_map` sends
            to another class, exactly round(eta * N_c) samples are relabelled flip_map[c].
        flip_map: Target class of each class under 'asym' noise; a class mapped to itself
            stays clean. None: class c -> (c + 1) % num_classes.
    """
    if mode not in NOISE_MODES:
        raise ValueError(f'Unknown label noise mode {mode!r}, expected one of {NOISE_MODES}.')
    if not 0. <= eta < 1.:
        raise ValueError(f'Label noise rate must be in [0, 1), got {eta}.')
    if num_classes < 2:
        raise ValueError(f'Label noise needs at least 2 classes, got {num_classes}.')
    if flip_map is None:
        flip_map = [(c + 1) % num_classes for c in range(num_classes)]
    if len(flip_map) != num_classes or any(not 0 <= t < num_classes for t in flip_map):
        raise ValueError(f'flip_map must give a class in [0, {num_classes}) for each of the {num_classes} classes.')
    clean = np.asarray(targets, dtype=np.int64)
    if clean.size and (clean.min() < 0 or clean.max() >= num_classes):
        raise ValueError(f'Targets must be class indices in [0, {num_classes}).')

    noisy = clean.copy()
    rng = np.random.RandomState(seed)
    if mode == 'sym':
        flip = rng.choice(len(clean), size=round(eta * len(clean)), replace=False)
        # a non-zero shift modulo num_classes is uniform over the other classes
        noisy[flip] = (clean[flip] + rng.randint(1, num_classes, size=len(flip))) % num_classes
    else:
        for c in range(num_classes):
            if flip_map[c] == c:
                continue
            members = np.flatnonzero(clean == c)
            flip = rng.choice(members, size=round(eta * len(members)), replace=False)
            noisy[flip] = flip_map[c]
    return noisy


def noisy_label_mask(dataset) -> Optional[np.ndarray]:
    """Which samples of `dataset` carry a corrupted label (bool per dataset index), for the in-memory datasets that
    keep their clean labels beside the noisy ones; None for any other dataset, or when no label was changed."""
    clean, noisy = getattr(dataset, 'clean_targets', None), getattr(dataset, 'targets', None)
    if clean is None or noisy is None:
        return None
    mask = np.asarray(noisy) != np.asarray(clean)
    return mask if mask.any() else None


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` for telling `positive` samples from the rest: the probability that a
    random positive scores above a random negative, ties counting half (Mann-Whitney U over mid-ranks); NaN when
    either group is empty."""
    positive = positive.bool()
    num_pos, num_neg = int(positive.sum()), int((~positive).sum())
    if not num_pos or not num_neg:
        return float('nan')
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    upper = counts.cumsum(0).double()
    ranks = (upper - (counts.double() - 1) / 2)[inverse]  # 1-based mid-ranks of tied scores
    return ((ranks[positive].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)).item()


def weight_noise_metrics(index: torch.Tensor, weight: torch.Tensor, noisy: np.ndarray) -> Dict[str, float]:
    """How per-sample self-teacher weights relate to label noise: their mean over samples whose label was flipped
    (`alpha_flipped`) and over clean ones (`alpha_clean`), and the ROC AUC of the weight for picking out the
    flipped ones (`alpha_auc`: 0.5 is chance; above it, flipped labels get more trust in the self-teacher)."""
    flipped = torch.from_numpy(noisy)[index.long()]
    return dict(alpha_flipped=_mean(weight[flipped]), alpha_clean=_mean(weight[~flipped]),
                alpha_auc=roc_auc(weight, flipped))


def _mean(values: torch.Tensor) -> float:
    return values.mean().item() if len(values) else float('nan')
