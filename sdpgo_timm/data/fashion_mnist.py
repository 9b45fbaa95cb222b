""" Fashion-MNIST, read from its four original IDX files

Zalando's Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 60,000 training and 10,000 test grey
28x28 images of 10 kinds of clothing. The files are read directly (gzip + NumPy) from a folder:
`--data-dir`, else `$FASHION_MNIST_DIR`, else where Debian's `dataset-fashion-mnist` package
puts them. Nothing is ever downloaded.

Splits: 'train' (55,000: the training file less a class-stratified, seeded 5,000 held out),
'validation' (those 5,000, for choosing settings), 'trainval' (all 60,000) and 'test' (the
official 10,000, for the reported number only).
"""
import gzip
import os
from typing import Optional, Tuple

import numpy as np

from .arrays import ArrayImageDataset
from .splits import check_split, split_off

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
ENV_VAR = 'FASHION_MNIST_DIR'
FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 60000),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz', 10000),
}
CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
# class-flip ('asym') noise between the confusable pairs T-shirt/top <-> Shirt, Pullover <-> Coat and
# Sandal <-> Sneaker, the pairs the classes' confusion matrices show; the other four classes stay clean
FLIP_MAP = (6, 1, 4, 3, 2, 7, 0, 5, 8, 9)
SPLITS = ('train', 'validation', 'trainval', 'test')
_VAL_FRACTION = 5000 / 60000
_SPLIT_SEED = 0
_MISSING_HINT = (f"install Debian's package (apt-get install dataset-fashion-mnist, into {DEBIAN_DIR}) or put the "
                 f"four IDX files in a folder and pass --data-dir DIR or set {ENV_VAR}")


def _read_idx(path: str, dims: Tuple[int, ...]) -> np.ndarray:
    """One gzipped IDX file of unsigned bytes with the given shape; ValueError if it is not exactly that."""
    try:
        with gzip.open(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip raises EOFError for a truncated file
        raise ValueError(f"Fashion-MNIST file {path!r} cannot be read ({e}); it is damaged or truncated: "
                         f"reinstall it ({_MISSING_HINT})") from None
    header = 4 + 4 * len(dims)
    expected = (b'\x00\x00\x08' + bytes([len(dims)]) + b''.join(int(d).to_bytes(4, 'big') for d in dims))
    size = header + int(np.prod(dims))
    if data[:header] != expected or len(data) != size:
        found = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(data[3] if len(data) > 3 else 0))
        raise ValueError(f"Fashion-MNIST file {path!r} holds {len(data)} bytes of shape {found}, expected {size} bytes "
                         f"of shape {dims}; it is damaged or truncated: reinstall it ({_MISSING_HINT})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def fashion_mnist_dir(data_dir: Optional[str] = None) -> str:
    """The folder to read: `data_dir`, else $FASHION_MNIST_DIR, else Debian's; ValueError naming the fix if absent."""
    root = data_dir or os.environ.get(ENV_VAR) or DEBIAN_DIR
    missing = [name for images, labels, _ in FILES.values() for name in (images, labels)
               if not os.path.isfile(os.path.join(root, name))]
    if missing:
        raise ValueError(f"Fashion-MNIST not found: {root!r} lacks {', '.join(missing)}; {_MISSING_HINT}")
    return root


def load_fashion_mnist(root: str, part: str) -> Tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of the 'train' or 'test' file pair, checked."""
    images_file, labels_file, count = FILES[part]
    images = _read_idx(os.path.join(root, images_file), (count, 28, 28))
    labels = _read_idx(os.path.join(root, labels_file), (count,)).astype(np.int64)
    if labels.max() >= len(CLASSES):
        raise ValueError(f"Fashion-MNIST file {labels_file!r} holds label {labels.max()}, expected 0..9; reinstall it "
                         f"({_MISSING_HINT})")
    return images, labels


class FashionMNISTDataset(ArrayImageDataset):
    """Fashion-MNIST as (PIL RGB 28x28 image, int label), like timm's ImageDataset.

    Args:
        split: 'train', 'validation', 'trainval' or 'test' (see the module docstring).
        root: Folder of the four IDX files (None: $FASHION_MNIST_DIR, else Debian's folder).
        **kwargs: `ArrayImageDataset`'s `transform`, `target_transform`, label noise (`label_noise`,
            `noise_mode` 'sym' or 'asym' (along FLIP_MAP), `noise_seed`; the training splits only), `fraction`,
            `fraction_seed` and `pad_crop`.
    """

    def __init__(self, split: str = 'train', root: Optional[str] = None, **kwargs):
        check_split('fashion-mnist', split, SPLITS, ('train', 'trainval'), kwargs.get('label_noise', 0.))
        root = fashion_mnist_dir(root)
        images, labels = load_fashion_mnist(root, 'test' if split == 'test' else 'train')
        if split in ('train', 'validation'):
            train, validation = split_off(labels, _VAL_FRACTION, _SPLIT_SEED)
            index = train if split == 'train' else validation
            images, labels = images[index], labels[index]
        super().__init__(images, labels, CLASSES, flip_map=FLIP_MAP, **kwargs)
        self.split = split
        self.root = root
