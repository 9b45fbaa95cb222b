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
from typing import Callable, Optional, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .noise import apply_label_noise

_DIGITS_FILE = os.path.join(os.path.dirname(__file__), 'digits.npz')
_SPLITS = ('train', 'validation')
_VAL_FRACTION = 0.2
_SPLIT_SEED = 0


def _split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of one split: per class, a seeded 20% goes to validation, the rest to train.

    Legacy `RandomState` keeps the split identical across machines and NumPy versions.
    """
    rng = np.random.RandomState(_SPLIT_SEED)
    chosen = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        num_val = round(_VAL_FRACTION * len(members))
        chosen.append(members[:num_val] if split == 'validation' else members[num_val:])
    return np.sort(np.concatenate(chosen))


class DigitsDataset(Dataset):
    """Indexable digits dataset returning (PIL RGB image, int label), like timm's ImageDataset.

    `transform` may be set after construction, as timm's `create_loader` does.

    Args:
        split: 'train' (1,438 images) or 'validation' (359 images), stratified and fixed.
        transform: Applied to the PIL image.
        target_transform: Applied to the int label.
        label_noise: Share of train labels to corrupt (see `apply_label_noise`), in [0, 1).
        noise_mode: 'sym' or 'asym'.
        noise_seed: Seed of the corruption.
    """
    num_classes = 10

    def __init__(
            self,
            split: str = 'train',
            transform: Optional[Callable] = None,
            target_transform: Optional[Callable] = None,
            label_noise: float = 0.,
            noise_mode: str = 'sym',
            noise_seed: int = 0,
    ):
        if split not in _SPLITS:
            raise ValueError(f'Unknown digits split {split!r}, expected one of {_SPLITS}.')
        if label_noise and split != 'train':
            raise ValueError('Label noise applies to the train split only; validation stays clean.')
        with np.load(_DIGITS_FILE) as data:
            images, labels = data['images'], data['labels']
        index = _split_indices(labels, split)
        self.split = split
        self.images = images[index]
        self.clean_targets = labels[index]
        self.targets = apply_label_noise(
            self.clean_targets, self.num_classes, label_noise, seed=noise_seed, mode=noise_mode)
        self.classes = [str(c) for c in range(self.num_classes)]
        self.transform = transform
        self.target_transform = target_transform

    def __getitem__(self, index: int) -> Tuple[object, int]:
        img = Image.fromarray(self.images[index]).convert('RGB')
        target = int(self.targets[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __len__(self) -> int:
        return len(self.targets)
