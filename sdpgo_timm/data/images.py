"""Image folders that name the files they skip, count them per epoch, and refuse an unreadable class or a
folder whose walk would not end.

timm's ImageDataset replaces an image that fails to load with the next sample and logs its
index. `CheckedImageDataset` does the same but logs the file and records the sample in
`SkippedImages` (shared memory, so skips in loader worker processes count too), which
train.py reports as `train_skipped`. `check_readable_classes` stops a run before training
when a class has no readable image at all, which skipping would otherwise hide;
`check_image_headers` when an evaluation file's header does not read.
"""
import logging
import multiprocessing
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from timm.data import ImageDataset
from timm.data.readers.reader_image_folder import ReaderImageFolder

_logger = logging.getLogger(__name__)


class SkippedImages:
    """The samples that failed to load since the last `pop_count()`, in memory shared with worker processes."""

    def __init__(self, num_samples: int):
        self._flags = multiprocessing.RawArray('b', num_samples)

    def _view(self) -> np.ndarray:
        return np.frombuffer(self._flags, dtype=np.int8)

    def mark(self, index: int) -> None:
        self._flags[index] = 1

    def pop_count(self, distributed: bool = False) -> int:
        """Number of samples skipped since the last call, summed over ranks (collective when distributed)."""
        count = torch.tensor(int(self._view().sum()), dtype=torch.int64)
        if distributed:
            dist.all_reduce(count)
        self._view()[:] = 0
        return int(count)

    def state_dict(self) -> Dict[str, Any]:
        return dict(indices=torch.from_numpy(np.flatnonzero(self._view())))

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._view()[:] = 0
        self._view()[state['indices'].numpy()] = 1


# what PIL raises for a file it cannot decode: OSError (UnidentifiedImageError, truncation), SyntaxError and
# ValueError from some format plugins, and DecompressionBombError (not an OSError) for an image of absurd size
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class UnreadableImageError(ValueError):
    """An evaluation image that cannot be read: scoring another image in its place would be a wrong result."""

    def __init__(self, message: str):
        # torch's DataLoader re-raises a worker's exception as its type, built from a message holding the worker's
        # traceback; the error is our last line of it
        if '\n' in message:
            message = message.strip().splitlines()[-1].split(': ', 1)[-1]
        super().__init__(message)


class CheckedImageDataset(ImageDataset):
    """timm's ImageDataset (same reader, transforms and skipping) naming and counting the files it skips; with
    `strict` (evaluation) an unreadable file is an UnreadableImageError instead: a score must not count another
    image in its place."""

    def __init__(self, dataset: ImageDataset, strict: bool = False):
        super().__init__(
            root=None, reader=dataset.reader, load_bytes=dataset.load_bytes, input_img_mode=dataset.input_img_mode,
            transform=dataset.transform, target_transform=dataset.target_transform,
            additional_features=dataset.additional_features)
        self.skipped = SkippedImages(len(self))
        self.strict = strict

    def load(self, index: int):
        """(image, target, *features) of one sample, as timm reads it; one of UNREADABLE when it cannot be read."""
        img, target, *features = self.reader[index]
        if self.load_bytes:
            img = img.read()
        else:
            img = Image.open(img)
            if self.input_img_mode:
                img = img.convert(self.input_img_mode)  # decodes the pixels, so decode errors surface here
        return img, target, *features

    def __getitem__(self, index: int):
        for _ in range(self._max_retries):
            try:
                img, target, *features = self.load(index)
                break
            except UNREADABLE as e:
                name = self.filename(index, absolute=True)
                if self.strict:
                    raise UnreadableImageError(
                        f"evaluation image {name!r} cannot be read ({' '.join(str(e).split())}); it is not skipped, "
                        "since a score must not count another image in its place: replace or remove it") from None
                _logger.warning(f"Skipped unreadable image {name!r} (sample {index}): {e}")
                self.skipped.mark(index)
                index = (index + 1) % len(self.reader)
        else:
            raise RuntimeError(f"Failed to load {self._max_retries} consecutive samples, the last "
                               f"{self.filename(index, absolute=True)!r}")
        if self.transform is not None:
            img = self.transform(img)
        if target is None:
            target = -1
        elif self.target_transform is not None:
            target = self.target_transform(target)
        return (img, target) if self.additional_features is None else (img, target, *features)


def check_image_headers(dataset: CheckedImageDataset, threads: int = 8) -> None:
    """UnreadableImageError naming the first file of an image folder whose header does not read (empty, not an
    image, not readable, a decompression bomb): for the evaluation split before training, where the first
    evaluation would find it only after an epoch. Headers only (PIL's `Image.open`, ~40 µs a warm JPEG, so ~2 s
    for ImageNet's 50,000 validation images): decoding every image would take minutes at each start, so a file
    whose pixels do not decode (a truncated one) is still found at the first evaluation. Threads hide the latency
    of a network file system."""
    if not isinstance(dataset.reader, ReaderImageFolder):
        return

    def failure(path: str):
        try:
            with Image.open(path):
                return None
        except UNREADABLE as e:
            return path, e

    with ThreadPoolExecutor(threads) as pool:
        for found in pool.map(failure, [path for path, _ in dataset.reader.samples]):
            if found:
                path, e = found
                raise UnreadableImageError(
                    f"evaluation image {path!r} cannot be read ({' '.join(str(e).split())}); it is not skipped, "
                    "since a score must not count another image in its place: replace or remove it")


def check_readable_classes(dataset: CheckedImageDataset) -> None:
    """ValueError naming the first class whose images all fail to load (reads one good image per class)."""
    samples = getattr(dataset.reader, 'samples', None)
    class_to_idx = getattr(dataset.reader, 'class_to_idx', None) or {}
    if not samples:
        return
    members = defaultdict(list)
    for index, sample in enumerate(samples):
        members[sample[1]].append(index)
    names = {v: k for k, v in class_to_idx.items()}
    for target, indices in members.items():
        first_error = None
        for index in indices:
            try:
                dataset.load(index)
                break
            except UNREADABLE as e:
                name = dataset.filename(index, absolute=True)
                first_error = first_error or f"{name!r}: {' '.join(str(e).split())}"
        else:
            raise ValueError(
                f"class {names.get(target, target)!r} has no readable image: all {len(indices)} of its files fail to "
                f"load (first {first_error}); remove the class folder or replace its images")



def check_folder_links(root: str) -> None:
    """ValueError naming a linked folder that points back into the tree (timm's reader follows links: it would read
    the same images again and again, under a new class name each time) or at a folder already read."""
    seen = {os.path.realpath(root): root}
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # timm's reader reports unreadable folders itself
        for entry in sorted(entries, key=lambda e: e.name):
            if not entry.is_dir(follow_symlinks=True):
                continue
            real = os.path.realpath(entry.path)
            if real in seen:
                ancestor = os.path.commonpath([real, os.path.realpath(folder)]) == real
                kind = 'back to a folder above it (a loop)' if ancestor else 'to a folder that is read already'
                raise ValueError(f"{entry.path!r} is a link {kind}: {seen[real]!r}; its images would be read more "
                                 "than once, under other class names. Remove the link or copy the images")
            seen[real] = entry.path
            pending.append(entry.path)


def _hidden(path: str, root: str) -> bool:
    """Whether a file lies under (or is) a hidden entry of `root`: a dot name, or macOS's `__MACOSX` archive folder."""
    return any(part.startswith('.') or part == '__MACOSX' for part in os.path.relpath(path, root).split(os.sep))


def drop_hidden(samples: List[Tuple[str, int]], class_to_idx: Dict[str, int], root: str, sort_key: Callable,
                keep_classes: bool = False) -> Tuple[List[Tuple[str, int]], Dict[str, int]]:
    """`samples` and `class_to_idx` of an image folder without files in hidden folders (`.ipynb_checkpoints`,
    `__MACOSX`, ...) or with hidden names (`._cat.png`): a folder reader takes such a folder for a class of its own,
    or its copies for images of the class it is named after. Classes are indexed again as the reader indexes them
    (`sort_key` over the names left), unless they come from a class map (`keep_classes`). Logs what it leaves out."""
    kept = [s for s in samples if not _hidden(s[0], root)]
    if len(kept) == len(samples):
        return samples, class_to_idx
    first = next(s[0] for s in samples if _hidden(s[0], root))
    _logger.warning(f"Left out {len(samples) - len(kept)} file(s) in hidden folders or with hidden names (first "
                    f"{first!r}): they are no images of a class")
    if keep_classes:
        return kept, class_to_idx
    names = {index: name for name, index in class_to_idx.items()}
    classes = sorted({names[target] for _, target in kept}, key=sort_key)
    new_index = {name: i for i, name in enumerate(classes)}
    return [(path, new_index[names[target]]) for path, target in kept], new_index
