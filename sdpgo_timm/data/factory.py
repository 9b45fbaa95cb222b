"""Datasets for train.py and validate.py: the embedded digits set or timm's create_dataset."""
import argparse
import os
from typing import Optional

from torch.utils.data import Dataset

from timm.data import create_dataset

from .benchmarks import resolve_data_dir
from .digits import DigitsDataset

_EVAL_SPLITS = ('validation', 'val', 'valid', 'eval', 'evaluation')


def _check_folder_split(root: str, split: str) -> None:
    """timm falls back to the root for a missing split folder; make that an error instead."""
    name = split.split('[')[0]
    if os.path.isdir(os.path.join(root, name)):
        return
    synonyms = _EVAL_SPLITS if name in _EVAL_SPLITS else ('train', 'training') if name in ('train', 'training') else ()
    if any(os.path.isdir(os.path.join(root, s)) for s in synonyms):
        return
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    raise ValueError(f"split {split!r} not found in {root!r} (sub-folders: {found}); set --train-split/--val-split")


def create_split_dataset(args: argparse.Namespace, split: str, is_training: bool) -> Dataset:
    """One split of the data named by args.data / --data-dir / --dataset."""
    data_dir = resolve_data_dir(args.data, args.data_dir)
    if data_dir is None:  # embedded digits
        noise = args.label_noise if is_training else 0.0
        return DigitsDataset(
            'train' if is_training else 'validation',
            label_noise=noise, noise_mode=args.label_noise_mode, noise_seed=args.seed)
    if args.label_noise:
        raise ValueError("--label-noise is supported on the embedded 'digits' benchmark only")
    if not args.dataset and not any(os.scandir(data_dir)):
        raise ValueError(f"data folder {data_dir!r} is empty; it must hold class sub-folders (ImageFolder)")
    if not args.dataset:
        _check_folder_split(data_dir, split)
    num_samples = args.train_num_samples if is_training else args.val_num_samples
    dataset = create_dataset(
        args.dataset, root=data_dir, split=split, is_training=is_training, class_map=args.class_map,
        download=args.dataset_download, batch_size=args.batch_size, seed=args.seed,
        num_samples=num_samples, input_img_mode=args.input_img_mode or 'RGB')
    if hasattr(dataset, '__len__') and len(dataset) == 0:
        raise ValueError(f"split {split!r} of {data_dir!r} holds no images")
    return dataset


def dataset_num_classes(dataset: Dataset) -> Optional[int]:
    """Number of classes a dataset declares, if it does."""
    if hasattr(dataset, 'num_classes'):
        return dataset.num_classes
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None)
    return len(class_to_idx) if class_to_idx else None
