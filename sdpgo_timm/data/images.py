"""Image folders that name the files they skip, count them per epoch, and refuse an unreadable class or a
folder whose walk would not end.

timm's ImageDataset replaces an image that fails to load with the next sample and logs its
index. `CheckedImageDataset` does the same but logs the file and records the sample in
`SkippedImages` (shared memory, so skips in loader worker processes count too), which
train.py reports as `train_skipped`. `check_readable_classes` stops a run before training
when a class has no readable image at all, which skipping would otherwise hide.
"""
import logging
import multiprocessing
import os
from collections import defaultdict
from typing import Any, Dict

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from timm.data import ImageDataset

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


class CheckedImageDataset(ImageDataset):
    """timm's ImageDataset (same reader, transforms and skipping) naming and counting the files it skips."""

    def __init__(self, dataset: ImageDataset):
        super().__init__(
            root=None, reader=dataset.reader, load_bytes=dataset.load_bytes, input_img_mode=dataset.input_img_mode,
            transform=dataset.transform, target_transform=dataset.target_transform,
            additional_features=dataset.additional_features)
        self.skipped = SkippedImages(len(self))

    def load(self, index: int):
        """(image, target, *features) of one sample, as timm reads it; OSError when it cannot be read."""
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
            except OSError as e:
                name = self.filename(index, absolute=True)
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
            except OSError as e:
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
