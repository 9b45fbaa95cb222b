""" Synthetic label noise

Corrupts a fixed, seeded share of the training labels so that robustness to noisy labels
(SDPGO poster, Table 9) can be measured on any dataset whose targets are class indices.
NumPy's legacy `RandomState` is used on purpose: its stream is frozen, so the same seed
corrupts the same samples on every machine and NumPy version.
"""
from typing import Sequence, Union

import numpy as np

_NOISE_MODES = ('sym', 'asym')


def apply_label_noise(
        targets: Union[Sequence[int], np.ndarray],
        num_classes: int,
        eta: float,
        seed: int = 0,
        mode: str = 'sym',
) -> np.ndarray:
    """Return a noisy copy of `targets` (int64), leaving `targets` untouched.

    Args:
        targets: Clean class indices in [0, num_classes).
        num_classes: Number of classes.
        eta: Noise rate in [0, 1).
        seed: Seed of the corruption; equal seeds corrupt equal samples.
        mode: 'sym': exactly round(eta * N) samples, chosen uniformly, get a label drawn
            uniformly from the other classes. 'asym': in each class c, exactly
            round(eta * N_c) samples are relabelled (c + 1) % num_classes.
    """
    if mode not in _NOISE_MODES:
        raise ValueError(f'Unknown label noise mode {mode!r}, expected one of {_NOISE_MODES}.')
    if not 0. <= eta < 1.:
        raise ValueError(f'Label noise rate must be in [0, 1), got {eta}.')
    if num_classes < 2:
        raise ValueError(f'Label noise needs at least 2 classes, got {num_classes}.')
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
            members = np.flatnonzero(clean == c)
            flip = rng.choice(members, size=round(eta * len(members)), replace=False)
            noisy[flip] = (c + 1) % num_classes
    return noisy
