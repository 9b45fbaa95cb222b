"""Export an in-memory benchmark, or a class subset of it, to an ImageFolder on disk.

`python -m sdpgo_timm.data export fashion-mnist OUT --classes 0 2 4 6 8 --train-per-class 100` writes
OUT/<split>/<class>/<index>.png for each split, the folder layout timm's ImageFolder reader (and so
`train.py OUT ...`) takes. Splitting a benchmark by classes makes a transfer task from data that is
installed: pretrain on some classes, fine-tune on the others, held the way users hold their own images.

What was exported (benchmark, classes, counts, seed) is recorded in OUT/export.json; the images are the
benchmark's own pixels as lossless grey PNGs, each named by its index in the benchmark's split so that a
file can be traced back. The export is written to a temporary folder beside OUT and renamed when complete:
an interrupted export leaves no half-written OUT.
"""
import argparse
import json
import os
import re
import shutil
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from .arrays import ArrayImageDataset
from .digits import DigitsDataset
from .fashion_mnist import FashionMNISTDataset

__all__ = ['EXPORTABLE', 'class_folder_name', 'choose_indices', 'export_image_folder', 'main']

# benchmark -> (its splits, a function building a split); `data_dir` is where fashion-mnist's files are
EXPORTABLE = {
    'digits': (('train', 'validation'), lambda split, data_dir: DigitsDataset(split)),
    'fashion-mnist': (('train', 'validation', 'test'),
                      lambda split, data_dir: FashionMNISTDataset(split, root=data_dir)),
}
_TRAINING_SPLITS = ('train', 'trainval')


def class_folder_name(index: int, name: str) -> str:
    """A folder name for class `index` called `name`: the index first (so timm's sorted folder order is the
    benchmark's label order), then the name with anything but letters and digits made '_' ('0_t_shirt_top')."""
    return f"{index}_{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}"


def choose_indices(labels: np.ndarray, classes: Sequence[int], per_class: Optional[int], seed: int) -> np.ndarray:
    """Sorted indices of the samples of `classes`; with `per_class`, that many of each, drawn with `seed`
    (NumPy's legacy RandomState: the same draw on every machine). A ValueError when a class has fewer."""
    rng = np.random.RandomState(seed)
    chosen = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if per_class is not None:
            if per_class > len(members):
                raise ValueError(f"class {c} has {len(members)} images, fewer than --train-per-class {per_class}")
            members = rng.permutation(members)[:per_class]
        chosen.append(members)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _check_classes(classes: Optional[Sequence[int]], dataset: ArrayImageDataset) -> List[int]:
    """`classes` (None: all of the dataset's), checked: 2 or more distinct class indices of the dataset."""
    chosen = list(range(dataset.num_classes)) if classes is None else list(classes)
    if any(not 0 <= c < dataset.num_classes for c in chosen) or len(set(chosen)) != len(chosen) or len(chosen) < 2:
        raise ValueError(f"--classes {' '.join(map(str, chosen))}: give 2 or more distinct class indices in "
                         f"0..{dataset.num_classes - 1} ({', '.join(dataset.classes)})")
    return chosen


def _write_split(dataset: ArrayImageDataset, indices: np.ndarray, folder: str,
                 names: Dict[int, str]) -> Dict[str, int]:
    """Each chosen image as folder/<class folder>/<index>.png (`names`: label -> class folder); returns the count per
    class folder."""
    for name in names.values():
        os.makedirs(os.path.join(folder, name))
    counts = dict.fromkeys(names.values(), 0)
    width = len(str(len(dataset.images) - 1))
    for i in indices:
        name = names[int(dataset.clean_targets[i])]
        Image.fromarray(dataset.images[i]).save(os.path.join(folder, name, f'{i:0{width}d}.png'))
        counts[name] += 1
    return counts


def export_image_folder(benchmark: str, out: str, classes: Optional[Sequence[int]] = None,
                        splits: Optional[Sequence[str]] = None, train_per_class: Optional[int] = None,
                        seed: int = 0, data_dir: Optional[str] = None) -> Dict:
    """Write `benchmark`'s `splits` (default: all) restricted to `classes` (default: all) as an ImageFolder at `out`.

    `train_per_class` keeps that many images of each class in the training splits only (a small target task);
    validation and test keep every image of the chosen classes. Returns what export.json records.
    A ValueError, naming the fix, for an unknown benchmark, split or class, or an `out` that already exists.
    """
    if benchmark not in EXPORTABLE:
        raise ValueError(f"cannot export {benchmark!r}: known benchmarks are {', '.join(EXPORTABLE)}")
    known_splits, build = EXPORTABLE[benchmark]
    splits = list(splits or known_splits)
    unknown = [s for s in splits if s not in known_splits]
    if unknown or len(set(splits)) != len(splits):
        raise ValueError(f"--splits {' '.join(splits)}: each of {', '.join(known_splits)} at most once")
    if train_per_class is not None and train_per_class < 1:
        raise ValueError(f"--train-per-class must be >= 1, got {train_per_class}")
    if os.path.exists(out):
        raise ValueError(f"{out!r} exists; export into a new folder (or remove it first)")
    staging = f'{out.rstrip(os.sep)}.tmp-{os.getpid()}'
    record: Dict = dict(benchmark=benchmark, classes=None, train_per_class=train_per_class, seed=seed, splits={})
    names: Dict[int, str] = {}  # label -> class folder
    try:
        for split in splits:
            dataset = build(split, data_dir)
            if not names:  # every split of a benchmark has the same classes
                names = {c: class_folder_name(c, dataset.classes[c]) for c in _check_classes(classes, dataset)}
                record['classes'] = {name: c for c, name in names.items()}
            per_class = train_per_class if split in _TRAINING_SPLITS else None
            indices = choose_indices(dataset.clean_targets, list(names), per_class, seed)
            record['splits'][split] = _write_split(dataset, indices, os.path.join(staging, split), names)
        with open(os.path.join(staging, 'export.json'), 'w', encoding='utf-8') as f:
            json.dump(record, f, indent=2)
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m sdpgo_timm.data', description='Tools for the in-memory benchmarks.')
    commands = parser.add_subparsers(dest='command', required=True)
    export = commands.add_parser(
        'export', help='write a benchmark (or some of its classes) as an ImageFolder: OUT/<split>/<class>/*.png',
        description=__doc__.split('\n\n')[0])
    export.add_argument('benchmark', choices=sorted(EXPORTABLE), help='the in-memory benchmark to export')
    export.add_argument('out', help='the folder to create (must not exist)')
    export.add_argument('--classes', type=int, nargs='+', default=None, metavar='C',
                        help='class indices to keep (default: all), e.g. 0 2 4 6 8')
    export.add_argument('--splits', nargs='+', default=None, metavar='SPLIT',
                        help='splits to write (default: all the benchmark has)')
    export.add_argument('--train-per-class', type=int, default=None, metavar='N',
                        help='keep N images of each class in the training split (default: all); validation and test '
                             'keep all')
    export.add_argument('--seed', type=int, default=0, help='seed of the --train-per-class draw (default 0)')
    export.add_argument('--data-dir', default=None, help="fashion-mnist's IDX files (default: as train.py finds them)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; bad input is one `error:` line and exit status 2."""
    args = _parser().parse_args(argv)
    try:
        record = export_image_folder(args.benchmark, args.out, args.classes, args.splits, args.train_per_class,
                                     args.seed, args.data_dir)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    for split, counts in record['splits'].items():
        print(f"{args.out}/{split}: {sum(counts.values())} images in {len(counts)} classes")
    return 0
