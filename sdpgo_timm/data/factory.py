"""Datasets for train.py and validate.py: the in-memory benchmarks (digits, fashion-mnist) or
timm's create_dataset (image folders checked for unreadable classes and counting skipped images)."""
import argparse
import hashlib
import os
from typing import Any, Dict, List, Optional, Sequence

from torch.utils.data import Dataset

from timm.data import ImageDataset, create_dataset
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.utils import natural_key

from .benchmarks import IN_MEMORY, resolve_data_dir
from .digits import DigitsDataset
from .fashion_mnist import FashionMNISTDataset
from .images import CheckedImageDataset, check_folder_links, check_readable_classes, drop_hidden

_EVAL_SPLITS = ('validation', 'val', 'valid', 'eval', 'evaluation')
_TRAIN_SPLITS = ('train', 'training')


def _check_slice(split: str, fix: str) -> None:
    """A ValueError for a sliced split ('train[:10%]'): timm slices hfds/tfds/wds data sets only, and reads the whole
    split of any other, so the slice would be ignored without a word."""
    if '[' in split:
        raise ValueError(f"split {split!r}: a slice applies to --dataset hfds/, tfds/ and wds/ data sets only; this "
                         f"one would read the whole split. Name the split alone{fix}")


def _check_folder_split(root: str, split: str) -> None:
    """timm falls back to the root for a missing split folder, and ignores a slice; make both errors instead."""
    _check_slice(split, '')
    name = split
    if os.path.isdir(os.path.join(root, name)):
        return
    synonyms = _EVAL_SPLITS if name in _EVAL_SPLITS else _TRAIN_SPLITS if name in _TRAIN_SPLITS else ()
    if any(os.path.isdir(os.path.join(root, s)) for s in synonyms):
        return
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    raise ValueError(f"split {split!r} not found in {root!r} (sub-folders: {found}); set --train-split/--val-split")


_IN_MEMORY_SPLITS = {'digits': ('train', 'validation'), 'fashion-mnist': ('train', 'validation', 'trainval', 'test')}


def _in_memory_split(benchmark: str, split: str) -> str:
    """The split of an in-memory benchmark a split name (or a synonym, as timm accepts for folders) selects."""
    _check_slice(split, ' (to train on a share of it: --train-fraction)')
    name = split
    name = 'train' if name in _TRAIN_SPLITS else 'validation' if name in _EVAL_SPLITS else name
    if name not in _IN_MEMORY_SPLITS[benchmark]:
        known = ', '.join(repr(s) for s in _IN_MEMORY_SPLITS[benchmark])
        raise ValueError(f"split {split!r} not found in {benchmark!r} (splits: {known})")
    return name


def check_evaluation_split(args: argparse.Namespace) -> None:
    """A ValueError when --val-split is the training split or lies within it (fashion-mnist's `trainval` holds the
    `validation` images): its scores would be training scores, reported as evaluation ones."""
    train, val = args.train_split, args.val_split
    if not val:
        return
    in_memory = args.data in _IN_MEMORY_SPLITS
    if in_memory:  # split names as the benchmark reads them ('val' is 'validation')
        train, val = _in_memory_split(args.data, train), _in_memory_split(args.data, val)
    inside = in_memory and train == 'trainval' and val in ('train', 'validation')
    if val == train or inside:
        raise ValueError(f"--val-split {args.val_split!r} {'is' if val == train else 'lies within'} the training "
                         f"split {args.train_split!r}: its scores would be training scores; evaluate on another split "
                         "(with fashion-mnist's trainval: --val-split test), or pass --val-split '' to train without "
                         "evaluation")


def _create_in_memory(args: argparse.Namespace, split: str, is_training: bool) -> Dataset:
    """A split of digits or fashion-mnist, with the training-only options read with defaults (validate.py lacks
    them)."""
    options = dict(pad_crop=getattr(args, 'pad_crop', 0), fraction=getattr(args, 'train_fraction', 1.0),
                   fraction_seed=0, label_noise=getattr(args, 'label_noise', 0.0),
                   noise_mode=getattr(args, 'label_noise_mode', 'sym'),
                   noise_seed=getattr(args, 'seed', 42)) if is_training else {}
    name = _in_memory_split(args.data, split)
    if args.data == 'digits':
        return DigitsDataset(name, **options)
    return FashionMNISTDataset(name, root=args.data_dir, **options)


def create_split_dataset(args: argparse.Namespace, split: str, is_training: bool) -> Dataset:
    """One split of the data named by args.data / --data-dir / --dataset.

    Training-only options (label noise, --seed, --train-num-samples, ...) are read with defaults:
    validate.py's args do not have them.
    """
    data_dir = resolve_data_dir(args.data, args.data_dir)
    if data_dir is None:
        return _create_in_memory(args, split, is_training)
    seed = getattr(args, 'seed', 42)
    for name, off in (('label_noise', 0.0), ('train_fraction', 1.0), ('pad_crop', 0)):
        if getattr(args, name, off) != off:
            flag = '--' + name.replace('_', '-')
            raise ValueError(f"{flag} is supported on the in-memory benchmarks only ({', '.join(IN_MEMORY)})")
    prefix, _, name = args.dataset.partition('/')
    torch_folder = prefix.lower() == 'torch' and name.lower() in ('image_folder', 'folder')
    if prefix.lower() == 'torch' and name.lower() not in TORCH_DATASETS:
        raise ValueError(f"--dataset {args.dataset!r}: timm knows no torchvision data set {name!r}; use one of "
                         f"{', '.join('torch/' + n for n in TORCH_DATASETS)}")
    if (not args.dataset or torch_folder) and not any(os.scandir(data_dir)):
        raise ValueError(f"data folder {data_dir!r} is empty; it must hold class sub-folders (ImageFolder)")
    if not args.dataset or torch_folder:
        _check_folder_split(data_dir, split)
        check_folder_links(data_dir)
    class_map = _class_map_path(args.class_map, data_dir)
    num_samples = getattr(args, 'train_num_samples' if is_training else 'val_num_samples', None)
    # timm repeats streaming datasets itself; the training loader repeats indexable ones (runner.batches)
    repeats = getattr(args, 'epoch_repeats', 0) if is_training else 0
    try:
        dataset = create_dataset(
            args.dataset, root=data_dir, split=split, is_training=is_training, class_map=class_map,
            download=args.dataset_download, batch_size=args.batch_size, seed=seed, repeats=repeats,
            num_samples=num_samples, input_img_mode=args.input_img_mode or 'RGB', input_key=args.input_key,
            target_key=args.target_key, trust_remote_code=args.dataset_trust_remote_code)
    except Exception as e:  # torchvision, datasets, webdataset, ...: each fails in its own way on missing data
        if not args.dataset:
            raise
        reason = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        raise ValueError(f"--dataset {args.dataset!r} split {split!r} cannot be loaded from {data_dir!r} ({reason}); "
                         f"{_dataset_fix(prefix.lower())}") from None
    if hasattr(dataset, '__len__') and len(dataset) == 0:
        raise ValueError(f"split {split!r} of {data_dir!r} holds no images")
    if isinstance(dataset, ImageDataset) and isinstance(dataset.reader, ReaderImageFolder):
        dataset.reader.samples, dataset.reader.class_to_idx = drop_hidden(
            dataset.reader.samples, dataset.reader.class_to_idx, dataset.reader.root, natural_key,
            keep_classes=bool(class_map))
    elif torch_folder:
        dataset.samples, dataset.class_to_idx = drop_hidden(dataset.samples, dataset.class_to_idx, dataset.root,
                                                             lambda name: name)
        dataset.imgs, dataset.targets = dataset.samples, [target for _, target in dataset.samples]
        dataset.classes = sorted(dataset.class_to_idx, key=dataset.class_to_idx.get)
    if isinstance(dataset, ImageDataset):
        dataset = CheckedImageDataset(dataset, strict=not is_training)
        check_readable_classes(dataset)
    elif prefix.lower() == 'torch':
        _check_channels(args, dataset)
    return dataset


# timm's torchvision data sets (`--dataset torch/NAME`, timm.data.create_dataset)
TORCH_DATASETS = ('cifar10', 'cifar100', 'mnist', 'kmnist', 'fashion_mnist', 'qmnist', 'inaturalist', 'inat',
                  'places365', 'imagenet', 'image_folder', 'folder')


def _class_map_path(class_map: str, data_dir: str) -> str:
    """--class-map as timm finds it (as given, else under the data folder); a ValueError where timm would assert."""
    if not class_map:
        return class_map
    path = class_map if os.path.exists(class_map) else os.path.join(data_dir, class_map)
    if not os.path.isfile(path):
        raise ValueError(f"--class-map {class_map!r} is not a file (nor under {data_dir!r}); pass a .txt of class "
                         "names, one a line, or leave it out")
    if os.path.splitext(path)[1].lower() not in ('.txt', '.pkl'):
        raise ValueError(f"--class-map {class_map!r} must be a .txt (class names, one a line) or a .pkl file")
    return path


def _dataset_fix(prefix: str) -> str:
    """What to do when timm's create_dataset cannot load a `prefix/` data set."""
    if prefix == 'torch':
        return ("put torchvision's files for it in --data-dir, or add --dataset-download (needs the network), and "
                "check the split name")
    if prefix in ('hfds', 'hfids'):
        return ("it needs the `datasets` package and, offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), the data set in "
                "the Hugging Face cache; check the name and split")
    return "check the name, the split, --data-dir and that the data set's package is installed"


def _check_channels(args: argparse.Namespace, dataset: Dataset) -> None:
    """A ValueError for a torchvision data set of grey images trained by a colour model (or the reverse): torchvision
    gives its images as they are stored, and the model would fail at its first layer."""
    image = dataset[0][0]
    channels = len(image.getbands()) if hasattr(image, 'getbands') else None
    expected = args.input_size[0] if args.input_size else args.in_chans or 3  # timm: input_size wins
    if channels is not None and channels != expected:
        raise ValueError(f"--dataset {args.dataset!r} has {channels}-channel images, the model takes {expected}: pass "
                         f"--in-chans {channels} (and --mean/--std of {channels} values)")


def dataset_num_classes(dataset: Dataset) -> Optional[int]:
    """Number of classes a dataset declares, if it does."""
    if hasattr(dataset, 'num_classes'):
        return dataset.num_classes
    classes = dataset_classes(dataset)
    return len(classes) if classes else None


def dataset_classes(dataset: Dataset) -> Optional[List[str]]:
    """The class names of a dataset in label order, if it declares them."""
    if isinstance(getattr(dataset, 'classes', None), (list, tuple)):
        return list(dataset.classes)
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    return [name for name, _ in sorted(class_to_idx.items(), key=lambda item: item[1])] if class_to_idx else None


def class_difference(expected: Sequence[str], found: Sequence[str]) -> str:
    """How `found` class names differ from `expected` ('lacks [...], adds [...]'); '' when they are the same."""
    if list(expected) == list(found):
        return ''
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    return ', '.join(part for part in (f"lacks {missing}" if missing else '', f"adds {extra}" if extra else '')
                     if part) or 'the same names in another order'


def data_signature(dataset: Dataset) -> Dict[str, Any]:
    """What the processes of a distributed run must agree on about a split: its size, its class names and, for an
    image folder, a digest of its files (paths relative to the folder, and labels). Each process shards the data by
    index, so a split that differs between nodes would silently train on other images or with other labels."""
    try:
        size = len(dataset)
    except TypeError:  # a streaming data set
        size = None
    reader = getattr(dataset, 'reader', dataset)
    samples, root = getattr(reader, 'samples', None), getattr(reader, 'root', None)
    files = None
    if samples and isinstance(root, str):
        digest, prefix = hashlib.sha1(), os.path.join(root, '')
        for path, target in samples:  # relative paths: each node may keep the data elsewhere
            digest.update(f"{path[len(prefix):] if path.startswith(prefix) else path}\0{target}\n".encode())
        files = digest.hexdigest()
    return dict(size=size, classes=dataset_classes(dataset), files=files)


def check_same_classes(expected: Optional[Sequence[str]], dataset: Dataset, what: str, fix: str) -> None:
    """A ValueError if `dataset` names other classes than `expected`: its labels would index other classes, and
    every score would be silently wrong. Nothing is checked where either side does not name its classes."""
    found = dataset_classes(dataset)
    detail = class_difference(expected, found) if expected is not None and found is not None else ''
    if not detail:
        return
    raise ValueError(f"{what} has other classes than the model was trained on ({detail}), so its labels would be "
                     f"scored against the wrong classes; {fix}")


def check_training_classes(train: Dataset, evaluation: Dataset) -> None:
    """ValueErrors for training data of one class and for an evaluation split whose classes differ from training's."""
    classes = dataset_classes(train)
    if classes is not None and len(classes) < 2:
        raise ValueError(f"the training data has {len(classes)} class ({', '.join(map(repr, classes))}); "
                         "classification needs at least 2: put each class in its own sub-folder of the train split")
    check_same_classes(classes, evaluation, 'the validation split',
                       'make both splits hold the same class sub-folders (or pass --class-map)')
