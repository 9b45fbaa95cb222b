"""Seeded, class-stratified index subsets of an in-memory dataset.

Used to carve a validation split out of the training data (so that settings are chosen
without touching a test set) and to take a share of the training split (the data-fraction
study of the poster's Table 10). NumPy's legacy `RandomState` is used on purpose: its stream
is frozen, so the same seed selects the same samples on every machine and NumPy version.
"""
from typing import Sequence

import numpy as np


def stratified_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of round(fraction * N_c) samples of each class c, chosen with `seed`.

    The complement, `np.setdiff1d(np.arange(len(labels)), subset)`, is the rest of the split.
    """
    if not 0. < fraction <= 1.:
        raise ValueError(f'fraction must be in (0, 1], got {fraction}')
    rng = np.random.RandomState(seed)
    chosen = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        chosen.append(members[:round(fraction * len(members))])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def split_off(labels: np.ndarray, fraction: float, seed: int = 0):
    """(rest, held_out): a stratified `fraction` of the indices held out, the rest kept, both sorted."""
    held_out = stratified_subset(labels, fraction, seed)
    return np.setdiff1d(np.arange(len(labels)), held_out), held_out


def check_split(benchmark: str, split: str, splits: Sequence[str], noisy_splits: Sequence[str],
                label_noise: float) -> None:
    """ValueError for a split the benchmark lacks, or for label noise on a split that stays clean (the held-out
    ones: noise is a training condition, never part of what a model is scored on)."""
    if split not in splits:
        raise ValueError(f'Unknown {benchmark} split {split!r}, expected one of {tuple(splits)}.')
    if label_noise and split not in noisy_splits:
        noisy = f'{noisy_splits[0]} split' if len(noisy_splits) == 1 else 'training splits'
        clean = [s for s in splits if s not in noisy_splits]
        raise ValueError(f"Label noise applies to the {noisy} only; {' and '.join(clean)} "
                         f"{'stays' if len(clean) == 1 else 'stay'} clean.")
