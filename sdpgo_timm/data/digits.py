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

import numpy as np

from .arrays import ArrayImageDataset
from .splits import check_split, split_off

_DIGITS_FILE = os.path.join(os.path.dirname(__file__), 'digits.npz')
_SPLITS = ('train', 'validation')
_VAL_FRACTION = 0.2
_SPLIT_SEED = 0


class DigitsDataset(ArrayImageDataset):
    """Indexable digits dataset returning (PIL RGB image, int label), like timm's ImageDataset.

    Args:
        split: 'train' (1,438 images) or 'validation' (359 images), stratified and fixed.
        **kwargs: `ArrayImageDataset`'s `transform`, `target_transform`, label noise (`label_noise`,
            `noise_mode` 'sym' or 'asym' (class c -> c + 1), `noise_seed`; the train split only), `fraction`,
            `fraction_seed` and `pad_crop`.
    """

    def __init__(self, split: str = 'train', **kwargs):
        check_split('digits', split, _SPLITS, ('train',), kwargs.get('label_noise', 0.))
        with np.load(_DIGITS_FILE) as data:
            images, labels = data['images'], data['labels']
        train, validation = split_off(labels, _VAL_FRACTION, _SPLIT_SEED)
        index = train if split == 'train' else validation
        super().__init__(images[index], labels[index], [str(c) for c in range(10)], **kwargs)
        self.split = split
