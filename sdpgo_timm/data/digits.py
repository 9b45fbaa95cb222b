""" Embedded 8x8 handwritten digits

scikit-learn's bundled copy of the UCI optical digits (1,797 grey 8x8 images, 10 classes),
shipped inside the package so that tests, examples and smoke benchmarks run offline.

`digits.npz` holds `images` (1797, 8, 8) uint8 in 0..255 (the original 0..16 scale times
255/16, rounded) and `labels` (1797,) int64. It was written, with scikit-learn 1.9.1 on the
path, by:

    python -c "import numpy as np; from sklearn.datasets import load_digits; d = load_digits(); np.savez_compressed('sdpgo_timm/data/digits.npz', images=np.round(d.images * 255 / 16).astype(np.uint8), labels=d.target.astype(np.int64))"

scikit-learn is not needed at run time.
"""
import os
from typing import Callable, Optional

import numpy as np

from .arrays import ArrayImageDataset
from .splits import split_off

_DIGITS_FILE = os.path.join(os.path.dirname(__file__), 'digits.npz')
_SPLITS = ('train', 'validation')
_VAL_FRACTION = 0.2
_SPLIT_SEED = 0


class DigitsDataset(ArrayImageDataset):
    """Indexable digits dataset returning (PIL RGB image, int label), like timm's ImageDataset.

    Args:
        split: 'train' (1,438 images) or 'validation' (359 images), stratified and fixed.
        transform: Applied to the PIL image.
        target_transform: Applied to the int label.
        label_noise: Share of train labels to corrupt (see `apply_label_noise`), in [0, 1).
        noise_mode: 'sym' or 'asym' (class c -> c + 1).
        noise_seed: Seed of the corruption.
        **kwargs: `ArrayImageDataset`'s `fraction`, `fraction_seed` and `pad_crop`.
    """

    def __init__(
            self,
            split: str = 'train',
            transform: Optional[Callable] = None,
            target_transform: Optional[Callable] = None,
            label_noise: float = 0.,
            noise_mode: str = 'sym',
            noise_seed: int = 0,
            **kwargs,
    ):
        if split not in _SPLITS:
            raise ValueError(f'Unknown digits split {split!r}, expected one of {_SPLITS}.')
        if label_noise and split != 'train':
            raise ValueError('Label noise applies to the train split only; validation stays clean.')
        with np.load(_DIGITS_FILE) as data:
            images, labels = data['images'], data['labels']
        train, validation = split_off(labels, _VAL_FRACTION, _SPLIT_SEED)
        index = train if split == 'train' else validation
        super().__init__(
            images[index], labels[index], [str(c) for c in range(10)], transform=transform,
            target_transform=target_transform, label_noise=label_noise, noise_mode=noise_mode,
            noise_seed=noise_seed, **kwargs)
        self.split = split
