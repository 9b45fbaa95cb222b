"""In-memory image datasets: uint8 images in one array, with optional label noise, a seeded share
of the samples and the small-image pad-and-crop augmentation.

The base of the `digits` and `fashion-mnist` benchmarks. Like timm's ImageDataset an item is
(PIL RGB image, int label) and `transform` may be set after construction (timm's loaders do).
"""
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .noise import apply_label_noise
from .splits import stratified_subset


class ArrayImageDataset(Dataset):
    """Images (N, H, W) uint8 and labels (N,) held in memory.

    Args:
        images: (N, H, W) uint8 grey images.
        targets: (N,) clean class indices.
        classes: Class names, index = label.
        transform: Applied to the PIL image (after the pad-and-crop).
        target_transform: Applied to the int label.
        fraction: Keep a class-stratified share of the samples, in (0, 1] (seeded by `fraction_seed`).
        label_noise: Share of labels to corrupt (see `apply_label_noise`), in [0, 1).
        noise_mode: 'sym' or 'asym'.
        noise_seed: Seed of the corruption.
        flip_map: Target of each class under 'asym' noise (None: class c -> c + 1).
        pad_crop: Zero-pad each image by this many pixels and take a random crop of the original
            size (the standard CIFAR / Fashion-MNIST augmentation; 0: off). Done here, before
            `transform`, because timm's transforms have no pad-and-crop.
    """

    def __init__(
            self,
            images: np.ndarray,
            targets: np.ndarray,
            classes: Sequence[str],
            transform: Optional[Callable] = None,
            target_transform: Optional[Callable] = None,
            fraction: float = 1.,
            fraction_seed: int = 0,
            label_noise: float = 0.,
            noise_mode: str = 'sym',
            noise_seed: int = 0,
            flip_map: Optional[Sequence[int]] = None,
            pad_crop: int = 0,
    ):
        if pad_crop < 0:
            raise ValueError(f'pad_crop must be >= 0 pixels, got {pad_crop}')
        if fraction != 1.:
            keep = stratified_subset(targets, fraction, fraction_seed)
            images, targets = images[keep], targets[keep]
        self.images = images
        self.classes: List[str] = list(classes)
        self.num_classes = len(self.classes)
        self.clean_targets = np.asarray(targets, dtype=np.int64)
        self.targets = apply_label_noise(
            self.clean_targets, self.num_classes, label_noise, seed=noise_seed, mode=noise_mode, flip_map=flip_map)
        self.pad_crop = pad_crop
        # padded once here, so that an item's crop is a slice (a PIL pad per item costs a third of a step)
        self._padded = np.pad(images, ((0, 0), (pad_crop, pad_crop), (pad_crop, pad_crop))) if pad_crop else images
        self.transform = transform
        self.target_transform = target_transform

    def __getitem__(self, index: int) -> Tuple[object, int]:
        pixels = self.images[index]
        if self.pad_crop:
            # torch's generator (as torchvision's RandomCrop), whose state checkpoints save and a resume restores
            y, x = torch.randint(0, 2 * self.pad_crop + 1, (2,)).tolist()
            h, w = pixels.shape
            pixels = self._padded[index, y:y + h, x:x + w]
        img = Image.fromarray(np.ascontiguousarray(pixels)).convert('RGB')
        target = int(self.targets[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __len__(self) -> int:
        return len(self.targets)
