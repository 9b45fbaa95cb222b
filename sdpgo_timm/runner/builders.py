"""Builders that turn parsed train.py arguments into the objects of a timm training run.

Kept out of train.py so that they can be imported and tested: the task (plain timm
ClassificationTask or a self-distillation task), the training loader for each data path
(timm's create_loader; at half the batch in SDPGO `tensors` mode; the replay loader in
`views` mode; either one wrapped to resume mid-epoch) and the Mixup/CutMix object that goes
with it.
"""
import argparse
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import Dataset, default_collate

from timm.data import AugMixDataset, FastCollateMixup, Mixup, create_loader
from timm.task import TrainingTask

from ..methods import get_method, mixup_active
from ..protocol import SelfDistillationTask
from .errors import ConfigError
from .naflex import create_naflex_train_loader, model_patch_size
from .batches import epoch_batches, scheduled_loader_kwargs, seed_scheduled_order
from .recovery import ResumableLoader
from ..data.replay import ReplayMixup, create_indexed_loader, create_replay_loader
from ..task import half_batch_size


def check_aug_splits(args: argparse.Namespace) -> None:
    """A ConfigError for an AugMix option (--aug-splits, --jsd-loss, --split-bn, --resplit) that cannot be used
    as given: timm's train.py asserts the same."""
    if args.aug_splits == 1 or args.aug_splits < 0:
        raise ConfigError(f"--aug-splits must be 0 (off) or >= 2, got {args.aug_splits}: a split of 1 makes no sense")
    if args.jsd_loss and not args.aug_splits:
        raise ConfigError("--jsd-loss compares the augmentation splits: give --aug-splits N (N >= 2) too")
    if args.split_bn and not (args.aug_splits or args.resplit):
        raise ConfigError("--split-bn keeps BatchNorm layers per augmentation split: give --aug-splits N (N >= 2) "
                          "or --resplit too")
    if args.split_bn and args.sync_bn:
        raise ConfigError("--split-bn does not combine with --sync-bn (timm's train.py refuses it); drop one")
    if args.split_bn and not args.aug_splits and args.batch_size % 2:
        raise ConfigError(f"--split-bn with --resplit splits each batch in halves: --batch-size {args.batch_size} "
                          "must be even")
    if args.resplit and args.no_prefetcher and args.reprob > 0:
        raise ConfigError("--resplit spares the clean split from random erasing in timm's prefetcher only: with "
                          "--no-prefetcher every row is erased; drop --no-prefetcher or --resplit")
    if args.aug_splits and mixup_active(args):
        raise ConfigError("--aug-splits does not combine with --mixup/--cutmix (timm's train.py refuses it: Mixup "
                          "would mix rows of different splits); drop one")
    method = get_method(args.method)
    if method.self_distillation and (args.aug_splits or args.split_bn):
        flag = '--aug-splits' if args.aug_splits else '--split-bn'
        raise ConfigError(f"{flag} does not combine with {method.flag}: it makes "
                          "a batch's rows augmented copies (or BatchNorm splits) of its images, while self-"
                          "distillation pairs a replay half with a fresh half; drop one (--resplit alone combines)")


def resolve_feed(args: argparse.Namespace, dataset: Dataset) -> Optional[str]:
    """How the training loader feeds the task: None, plain batches; 'indexed', batches with sample indices;
    'views' / 'tensors', a replay mode (`Method.resolve_feed`)."""
    return get_method(args.method).resolve_feed(args, dataset)


def create_train_task(
        args: argparse.Namespace,
        model: nn.Module,
        feed: Optional[str],
        device: torch.device,
        num_samples: int = 0,
) -> TrainingTask:
    """The task of the run's method (`args.method`): timm's ClassificationTask with timm's loss choice, timm's
    distillation task from a teacher (--kd-model-name), or a self-distillation task (--sdpgo/--skd).

    `feed` comes from resolve_feed; `num_samples` (the training set size) sizes PS-KD's table.
    """
    return get_method(args.method).build_task(args, model, feed, device, num_samples)


def optimizer_module(task: TrainingTask, model: nn.Module) -> nn.Module:
    """The module whose parameters the optimizer updates: the task's trainable module, as in timm's train.py (for
    feature distillation the student and its projection), but the model itself for a self-distillation task: its
    tapping wrapper adds no parameter, and timm's weight-decay exclusions and layer-decay groups would not find the
    model's parameters under the wrapper's name prefix."""
    return model if isinstance(task, SelfDistillationTask) else task.get_trainable_module()


def create_mixup(
        args: argparse.Namespace, num_classes: int, feed: Optional[str]) -> Tuple[Optional[Mixup], Optional[Mixup]]:
    """Mixup/CutMix as (a batch transform the loop applies, a collate function for the loader); (None, None) off
    or mixed by the NaFlex loader.

    Plain training with timm's prefetcher mixes in the loader's collate (timm's FastCollateMixup, on uint8
    images) as timm's train.py does, so that a plain run draws and rounds what timm's does; without the prefetcher
    it is timm's Mixup in the loop. The replay data paths mix in the loop with ReplayMixup (the replayed half
    keeps its mix); PS-KD's indexed batches with timm's Mixup.
    """
    if not mixup_active(args) or args.naflex_loader:
        return None, None
    options = dict(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
        num_classes=num_classes)
    if feed in ('views', 'tensors'):
        return ReplayMixup(**options), None
    if feed is None and not args.no_prefetcher:
        return None, FastCollateMixup(**options)
    return Mixup(**options), None


def create_train_loader(
        args: argparse.Namespace,
        dataset: Dataset,
        data_config: dict,
        device: torch.device,
        feed: Optional[str],
        collate_fn: Optional[Callable] = None,
        model: Optional[nn.Module] = None,
) -> ResumableLoader:
    """The training loader, resumable mid-epoch; `collate_fn` (plain batches only) is create_mixup's collate.
    With --naflex-loader timm's NaFlex loader at `model`'s patch size (it cannot resume mid-epoch).

    With --aug-splits N each batch holds N splits of its images, split-major (clean rows first, then each
    augmented copy; targets repeated), as timm's loader gives them.
    """
    # timm's training augmentation, and worker set-up, of every training loader (the NaFlex one's too)
    augment = dict(
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, re_split=args.resplit,
        train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, color_jitter_prob=args.color_jitter_prob,
        grayscale_prob=args.grayscale_prob or 0., gaussian_blur_prob=args.gaussian_blur_prob or 0.,
        auto_augment=args.aa,
        # timm's: the data config's interpolation without augmentation or a training one
        interpolation=data_config['interpolation'] if args.no_aug or not args.train_interpolation
        else args.train_interpolation, num_workers=args.workers, worker_seeding=args.worker_seeding,
        # fresh workers each epoch (timm keeps them): their seeds come from the RNG states the epoch begins with,
        # which a resumed run restores, so a resume is exact
        persistent_workers=False)
    if args.naflex_loader:
        return ResumableLoader(create_naflex_train_loader(
            args, dataset, data_config, device, model_patch_size(model, args.model), augment))
    common = dict(
        input_size=data_config['input_size'], is_training=True, mean=data_config['mean'], std=data_config['std'],
        pin_memory=args.pin_mem, device=device, use_prefetcher=not args.no_prefetcher,
        img_dtype=getattr(torch, args.model_dtype or 'float32'), **augment)
    check_replay_batches(args, feed)
    if feed in ('views', 'tensors') and mixup_active(args) and half_batch_size(args.batch_size) % 2:
        raise ValueError(f"Mixup/CutMix of a replay half and a fresh half needs even halves: --batch-size "
                         f"{args.batch_size} must be a multiple of 4 (use {args.batch_size + 2})")
    if feed == 'views':
        loader = create_replay_loader(
            dataset, batch_size=args.batch_size, seed=args.seed,
            num_replicas=args.world_size, rank=args.rank,
            num_batches=epoch_batches(args, dataset, half_batch_size(args.batch_size)), **common)
        return ResumableLoader(loader)
    batch_size = half_batch_size(args.batch_size) if feed == 'tensors' else args.batch_size
    if args.aug_splits:
        dataset = AugMixDataset(dataset, num_splits=args.aug_splits)
        common['num_aug_splits'] = args.aug_splits
        if args.no_prefetcher:  # timm's default collate would give a list of split tensors
            common['collate_fn'] = _concat_splits
    if collate_fn is not None and feed is None:
        common['collate_fn'] = collate_fn
    create = create_indexed_loader if feed == 'indexed' else create_loader
    loader = create(
        dataset, batch_size=batch_size, distributed=args.distributed, num_aug_repeats=args.aug_repeats,
        use_multi_epochs_loader=args.use_multi_epochs_loader,
        **scheduled_loader_kwargs(args, dataset, data_config['input_size'], batch_size), **common)
    if hasattr(dataset, '__len__') and len(loader) == 0:  # timm drops the partial batch: an epoch would train nothing
        share = f" ({args.world_size} processes)" if args.world_size > 1 else ''
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(dataset)} training images{share}: "
                         "an epoch would have no full batch and train nothing; use a smaller --batch-size")
    seed_scheduled_order(loader, args.seed)
    return ResumableLoader(loader)


def _concat_splits(batch):
    """Collate AugMix samples (a tuple of N tensors each) as timm's fast_collate does, without the prefetcher:
    one tensor, split-major, with the targets repeated N times."""
    splits, target = default_collate(batch)
    return torch.cat(splits), target.repeat(len(splits))


def check_replay_batches(args: argparse.Namespace, feed: Optional[str]) -> None:
    """ValueErrors for timm's loader flags that the replay data paths (SDPGO, DLB) cannot follow.

    A replay half is the previous step's fresh half at its resolution and size, so batches of scheduled
    resolutions or sizes cannot be replayed, and the replay sampler restarts each epoch (it replays the
    previous epoch's last chunk), which timm's multi-epochs loader, running on across epochs, would not do.
    """
    if feed not in ('views', 'tensors'):
        return
    flag = get_method(args.method).flag
    if args.train_img_sizes is not None:
        raise ValueError(f"--train-img-sizes does not combine with {flag}: "
                         "the replay half repeats the previous batch, which a batch of another resolution or size "
                         "cannot; drop --train-img-sizes (or the self-distillation)")
    if feed == 'views' and args.use_multi_epochs_loader:
        raise ValueError("--use-multi-epochs-loader does not combine with views replay (its sampler restarts each "
                         "epoch to replay the last one's final chunk); drop it or use --sdpgo-replay tensors")
