""" Replay data path of SDPGO's `views` mode

Step t of Sequential Iterative Learning trains on B_t = [R_t; N_t]: the replay half R_t holds
the samples of the previous fresh half N_{t-1}, in the same order, re-read from the dataset so
that they come back as new augmented views. This module supplies that batch order
(`ReplayBatchSampler`), a loader that also reports each batch's dataset indices
(`create_replay_loader`), and Mixup/CutMix that mixes a replay half exactly like its fresh
half was mixed one step earlier (`ReplayMixup`). `create_indexed_loader` is timm's own loader
with the same indices and no replay, for PS-KD's per-sample table.
"""
import copy
import math
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from timm.data import Mixup, create_loader, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.loader import PrefetchLoader, fast_collate
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target

from ..compat import timm_worker_init
from ..protocol import Batch
from ..task import half_batch_size

__all__ = ['ReplayBatchSampler', 'ReplayLoader', 'create_replay_loader', 'IndexedLoader', 'create_indexed_loader',
           'ReplayMixup']


class ReplayBatchSampler(Sampler[List[int]]):
    """Yield [indices of fresh chunk t-1] + [indices of fresh chunk t] for each step t.

    An epoch is one pass over this rank's fresh chunks of `batch_size // 2` indices. The
    order is a permutation seeded by `seed + epoch` (as torch's DistributedSampler), padded
    by wrapping (`drop_last=False`) or truncated (`drop_last=True`) to whole chunks on every
    rank, and sharded `rank::num_replicas`, so each rank runs the same number of steps.
    Step 0 of epoch e > 0 replays the last fresh chunk of epoch e - 1 (recomputed, so this
    holds after a resume); step 0 of epoch 0 yields its fresh chunk alone.

    Args:
        num_samples: Dataset length.
        batch_size: Model batch n per step and rank (`--batch-size`), replay + fresh; even.
        num_replicas: Number of ranks, from torch.distributed when initialized, else 1.
        rank: This rank, from torch.distributed when initialized, else 0.
        shuffle: Permute the samples each epoch.
        seed: Base seed of the permutation, the same on every rank.
        drop_last: Truncate to whole chunks instead of padding with repeated samples.
        num_batches: Steps per epoch instead of one pass (timm's --train-batches-per-epoch, --epoch-repeats);
            the order runs on through further permutations, each drawn anew (as timm cycles a RandomSampler).
    """

    def __init__(
            self,
            num_samples: int,
            batch_size: int,
            *,
            num_replicas: Optional[int] = None,
            rank: Optional[int] = None,
            shuffle: bool = True,
            seed: int = 0,
            drop_last: bool = True,
            num_batches: Optional[int] = None,
    ):
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is outside [0, {num_replicas}).')
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.fresh_size = half_batch_size(batch_size)
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_batches = num_batches
        samples_per_step = self.fresh_size * num_replicas
        if num_batches is not None:
            self.num_steps = num_batches
        elif drop_last:
            self.num_steps = num_samples // samples_per_step
        else:
            self.num_steps = math.ceil(num_samples / samples_per_step)
        if self.num_steps < 1:
            raise ValueError(
                f'{num_samples} samples do not fill one step of {num_replicas} x {self.fresh_size} fresh samples.')
        self.epoch = 0
        self._resume: Optional[Tuple[int, int]] = None  # (epoch, step) the next iteration starts at

    def fresh_chunks(self, epoch: int) -> torch.Tensor:
        """This rank's fresh indices of `epoch`, shaped (steps per epoch, batch_size // 2)."""
        total = self.num_steps * self.fresh_size * self.num_replicas
        # a fixed step count past one pass draws each further pass anew; padding repeats the pass (as torch's
        # DistributedSampler pads)
        passes = math.ceil(total / self.num_samples) if self.num_batches is not None else 1
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            order = torch.cat([torch.randperm(self.num_samples, generator=generator) for _ in range(passes)])
        else:
            order = torch.arange(self.num_samples).repeat(passes)
        order = order.repeat(math.ceil(total / len(order)))[:total]
        return order[self.rank::self.num_replicas].view(self.num_steps, self.fresh_size)

    def __iter__(self) -> Iterator[List[int]]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        chunks = self.fresh_chunks(self.epoch)
        if start > 0:
            replay = chunks[start - 1]
        elif self.epoch > 0:
            replay = self.fresh_chunks(self.epoch - 1)[-1]
        else:
            replay = chunks.new_empty(0)
        batches = []
        for fresh in chunks[start:]:
            batches.append(torch.cat((replay, fresh)).tolist())
            replay = fresh
        return iter(batches)

    def __len__(self) -> int:
        return self.num_steps

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next iteration (DistributedSampler protocol)."""
        self.epoch = epoch

    def start_at(self, step: int) -> None:
        """Begin the next iteration of the current epoch at `step` (mid-epoch resume), once."""
        if not 0 <= step <= self.num_steps:
            raise ValueError(f'step {step} is outside [0, {self.num_steps}].')
        self._resume = (self.epoch, step)

    def state_dict(self) -> Dict[str, int]:
        start_step = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        return {'epoch': self.epoch, 'start_step': start_step}

    def load_state_dict(self, state_dict: Dict[str, int]) -> None:
        self.set_epoch(state_dict['epoch'])
        self.start_at(state_dict['start_step'])


class _IndexedDataset(Dataset):
    """Return (image, target, index) so that the collate can hand each batch's indices on."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, index: int) -> Tuple[Any, Any, int]:
        img, target = self.dataset[index][:2]
        return img, target, index

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def transform(self) -> Any:
        """The wrapped dataset's transform, so that loaders which set it (timm's) reach the images."""
        return self.dataset.transform

    @transform.setter
    def transform(self, transform: Any) -> None:
        self.dataset.transform = transform


class _IndexedCollate:
    """Collate (image, target, index) samples to (input, stack((target, index))).

    timm's PrefetchLoader carries exactly (input, target) to the device; the indices travel
    as the second row of the target tensor and are split off again by `ReplayLoader`.
    """

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, batch: List[Tuple[Any, Any, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        input, target = self.collate_fn([sample[:2] for sample in batch])
        if target.ndim != 1 or target.is_floating_point():
            raise TypeError('views replay needs class-index targets, got dense targets.')
        index = torch.tensor([sample[2] for sample in batch], dtype=torch.int64)
        return input, torch.stack((target.long(), index))


class ReplayLoader:
    """Iterate `Batch`es (input, target, index, fresh_start) in `ReplayBatchSampler` order.

    `index` holds the int64 dataset indices of the batch rows, on the device of `target`; the rows before
    `fresh_start` replay the previous step's fresh half (none in the very first batch).
    The loader counts the batches it hands out, so `state_dict()` is the position to resume
    from after the last batch received (a finished epoch reads as the start of the next).
    """

    def __init__(self, loader: Union[DataLoader, PrefetchLoader], sampler: ReplayBatchSampler):
        self.loader = loader
        self.sampler = sampler
        self._position = sampler.state_dict()

    def __iter__(self) -> Iterator[Batch]:
        epoch, step = self.sampler.epoch, self.sampler.state_dict()['start_step']
        self._position = {'epoch': epoch, 'start_step': step}
        for input, packed in self.loader:
            step += 1
            if step == len(self.sampler):
                self._position = {'epoch': epoch + 1, 'start_step': 0}
            else:
                self._position = {'epoch': epoch, 'start_step': step}
            yield Batch(input, packed[0], packed[1], fresh_start=len(input) - self.sampler.fresh_size)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def batch_sampler(self) -> ReplayBatchSampler:
        return self.sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> Dict[str, int]:
        return dict(self._position)

    def load_state_dict(self, state_dict: Dict[str, int]) -> None:
        self.sampler.load_state_dict(state_dict)
        self._position = self.sampler.state_dict()


def create_replay_loader(
        dataset: Dataset,
        input_size: Union[int, Tuple[int, int], Tuple[int, int, int]],
        batch_size: int,
        *,
        is_training: bool = True,
        no_aug: bool = False,
        re_prob: float = 0.,
        re_mode: str = 'const',
        re_count: int = 1,
        re_split: bool = False,
        train_crop_mode: Optional[str] = None,
        scale: Optional[Tuple[float, float]] = None,
        ratio: Optional[Tuple[float, float]] = None,
        hflip: float = 0.5,
        vflip: float = 0.,
        color_jitter: float = 0.4,
        color_jitter_prob: Optional[float] = None,
        grayscale_prob: float = 0.,
        gaussian_blur_prob: float = 0.,
        auto_augment: Optional[str] = None,
        interpolation: str = 'bilinear',
        mean: Tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
        std: Tuple[float, ...] = IMAGENET_DEFAULT_STD,
        num_workers: int = 1,
        crop_pct: Optional[float] = None,
        crop_mode: Optional[str] = None,
        crop_border_pixels: Optional[int] = None,
        pin_memory: bool = False,
        img_dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device('cpu'),
        use_prefetcher: bool = True,
        persistent_workers: bool = True,
        worker_seeding: str = 'all',
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        num_batches: Optional[int] = None,
) -> ReplayLoader:
    """Build the `views`-mode training loader: timm's create_loader with a ReplayBatchSampler.

    Arguments not listed below mean what they mean in `timm.data.create_loader`; the
    transform, fast collate, prefetcher normalisation and random erasing are timm's own.

    Args:
        batch_size: Model batch n (replay + fresh) per step and rank; even.
        re_split: Random erasing spares the first half of each batch, its replay half (timm's --resplit).
        seed: Seed of the sample order, the same on every rank.
        shuffle, drop_last, num_replicas, rank, num_batches: See `ReplayBatchSampler`.
    """
    dataset.transform = create_transform(
        input_size, is_training=is_training, no_aug=no_aug, train_crop_mode=train_crop_mode, scale=scale,
        ratio=ratio, hflip=hflip, vflip=vflip, color_jitter=color_jitter, color_jitter_prob=color_jitter_prob,
        grayscale_prob=grayscale_prob, gaussian_blur_prob=gaussian_blur_prob, auto_augment=auto_augment,
        interpolation=interpolation, mean=mean, std=std, crop_pct=crop_pct, crop_mode=crop_mode,
        crop_border_pixels=crop_border_pixels, re_prob=re_prob, re_mode=re_mode, re_count=re_count,
        use_prefetcher=use_prefetcher)
    sampler = ReplayBatchSampler(len(dataset), batch_size, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                 seed=seed, drop_last=drop_last, num_batches=num_batches)
    loader = DataLoader(
        _IndexedDataset(dataset), batch_sampler=sampler, num_workers=num_workers,
        collate_fn=_IndexedCollate(fast_collate if use_prefetcher else default_collate), pin_memory=pin_memory,
        worker_init_fn=timm_worker_init(worker_seeding), persistent_workers=persistent_workers and num_workers > 0)
    if use_prefetcher:
        channels = input_size[0] if isinstance(input_size, (tuple, list)) and len(input_size) == 3 else len(mean)
        loader = PrefetchLoader(
            loader, mean=mean, std=std, channels=channels, device=device, img_dtype=img_dtype,
            re_prob=re_prob if is_training and not no_aug else 0., re_mode=re_mode, re_count=re_count,
            re_num_splits=2 if re_split else 0)  # as timm's create_loader: the first half (replay) is not erased
    return ReplayLoader(loader, sampler)


class IndexedLoader:
    """Iterate `Batch`es (input, target, index) of a timm loader built over indexed samples."""

    def __init__(self, loader: Union[DataLoader, PrefetchLoader]):
        self.loader = loader

    def __iter__(self) -> Iterator[Batch]:
        for input, packed in self.loader:
            yield Batch(input, packed[0], packed[1])

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self) -> Any:
        """The loader's sampler (a DistributedSampler under DDP: call its set_epoch)."""
        return self.loader.sampler


def create_indexed_loader(
        dataset: Dataset,
        input_size: Union[int, Tuple[int, int], Tuple[int, int, int]],
        batch_size: int,
        **kwargs: Any,
) -> IndexedLoader:
    """timm's `create_loader` whose batches also carry their int64 dataset indices.

    `kwargs` are `timm.data.create_loader`'s (not `collate_fn`, which carries the indices, nor
    scheduled input sizes); the indices arrive on the device of the targets, as in
    `create_replay_loader`, and targets must be class indices.
    """
    collate = fast_collate if kwargs.get('use_prefetcher', True) else default_collate
    loader = create_loader(
        _IndexedDataset(dataset), input_size, batch_size, collate_fn=_IndexedCollate(collate), **kwargs)
    return IndexedLoader(loader)


# {'mode', 'size', 'lam': [λ per draw], 'boxes': [[yl, yh, xl, xh] or None per draw]}; one draw per
# half in 'batch' mode, per row in 'elem', per mirrored pair in 'pair'. Plain Python values, so a
# checkpoint holding them loads with torch.load(weights_only=True).
MixParams = Dict[str, Any]


def _mix_half(x: torch.Tensor, params: MixParams) -> Union[float, torch.Tensor]:
    """Mix `x` in place with recorded parameters, pairing row i with row len(x) - 1 - i.

    Mirrors the arithmetic of timm's `Mixup._mix_batch/_mix_pair/_mix_elem`, so a fresh half
    comes out as timm would mix it. Returns the λ for `mixup_target`.
    """
    mode, boxes = params['mode'], params['boxes']
    if mode == 'batch':
        lam, box = params['lam'][0], boxes[0]
        if box is not None:
            yl, yh, xl, xh = box
            x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
        elif lam != 1.:
            x_flipped = x.flip(0).mul_(1. - lam)
            x.mul_(lam).add_(x_flipped)
        return lam

    lams = np.asarray(params['lam'], dtype=np.float32)
    x_orig = x.clone()
    for i, (lam, box) in enumerate(zip(lams, boxes)):
        j = len(x) - i - 1
        for a, b in ((i, j), (j, i)) if mode == 'pair' else ((i, j),):
            if box is not None:
                yl, yh, xl, xh = box
                x[a][:, yl:yh, xl:xh] = x_orig[b][:, yl:yh, xl:xh]
            elif lam != 1.:
                x[a] = x[a] * lam + x_orig[b] * (1 - lam)
    if mode == 'pair':
        lams = np.concatenate((lams, lams[::-1]))
    return torch.tensor(lams, device=x.device, dtype=x.dtype).unsqueeze(1)


class ReplayMixup(Mixup):
    """timm's Mixup/CutMix for [replay; fresh] batches, mixing each replay view like its teacher's input.

    Takes timm `Mixup`'s arguments. Each call mixes the fresh half (rows `replay_size:`) with
    timm's logic and records its parameters (λ, CutMix boxes, mode; partners are mirrored
    within the half), then mixes the replay half (rows `:replay_size`) with the parameters
    recorded at the previous call. Halves are mixed separately, so a replay sample is never
    paired with a fresh one. With `mixup_enabled = False` fresh halves are left unmixed (targets
    still smoothed) and record no mixing; the replay half still gets its recorded mixing.
    `tensors` mode calls it with `replay_size=0`, which is plain timm Mixup.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.mode not in ('batch', 'pair', 'elem'):
            raise ValueError(f"Unknown mixup mode {self.mode!r}, expected 'batch', 'pair' or 'elem'.")
        self.recorded: Optional[MixParams] = None

    def _draw(self, img_shape: Tuple[int, ...], size: int) -> MixParams:
        """Draw one half's parameters, consuming NumPy's RNG in the order timm's Mixup does."""
        if self.mode == 'batch':
            lam, use_cutmix = self._params_per_batch()
            draws = [(lam, use_cutmix)]
        else:
            draws = zip(*self._params_per_elem(size if self.mode == 'elem' else size // 2))
        lams, boxes = [], []
        for lam, use_cutmix in draws:
            box = None
            if lam != 1. and use_cutmix:
                box, lam = cutmix_bbox_and_lam(
                    img_shape, lam, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam)
                box = [int(v) for v in box]
            lams.append(float(lam))
            boxes.append(box)
        return {'mode': self.mode, 'size': size, 'lam': lams, 'boxes': boxes}

    def __call__(
            self,
            x: torch.Tensor,
            target: torch.Tensor,
            replay_size: int = 0,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        fresh_size = len(x) - replay_size
        if fresh_size % 2:
            raise ValueError(f'The fresh half must have an even size for mixing, got {fresh_size}.')
        targets = []
        if replay_size:
            if self.recorded is None or self.recorded['size'] != replay_size:
                raise ValueError(
                    f'No mixing parameters recorded for a replay half of {replay_size} samples; '
                    f'the previous call must mix the fresh half that is replayed now.')
            lam = _mix_half(x[:replay_size], self.recorded)
            targets.append(mixup_target(
                target[:replay_size], self.num_classes, lam, self.label_smoothing, self.multi_label))
        self.recorded = self._draw(x.shape, fresh_size)
        lam = _mix_half(x[replay_size:], self.recorded)
        targets.append(mixup_target(
            target[replay_size:], self.num_classes, lam, self.label_smoothing, self.multi_label))
        return x, torch.cat(targets)

    def state_dict(self) -> Dict[str, Optional[MixParams]]:
        return {'recorded': copy.deepcopy(self.recorded)}

    def load_state_dict(self, state_dict: Dict[str, Optional[MixParams]]) -> None:
        self.recorded = copy.deepcopy(state_dict['recorded'])
