"""Builders that turn parsed train.py arguments into the objects of a timm training run.

Kept out of train.py so that they can be imported and tested: the task (plain timm
ClassificationTask or a self-distillation task), the training loader for each data path
(timm's create_loader; at half the batch in SDPGO `tensors` mode; the replay loader in
`views` mode; either one wrapped to resume mid-epoch) and the Mixup/CutMix object that goes
with it.
"""
import argparse
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.data import Dataset, IterableDataset

from timm.data import Mixup, create_loader
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.task import ClassificationTask, TrainingTask

from ..skd import create_skd_task
from .recovery import ResumableLoader
from ..data.replay import ReplayMixup, create_indexed_loader, create_replay_loader
from ..task import half_batch_size
from .teacher import check_teacher_args, create_teacher_task


def skd_method(args: argparse.Namespace) -> Optional[str]:
    """'sdpgo', 'dlb', ... or None for plain supervised training."""
    if args.sdpgo and args.skd not in (None, 'sdpgo'):
        raise ValueError(f"--sdpgo and --skd {args.skd} both given; pick one")
    return 'sdpgo' if args.sdpgo else args.skd


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None


def resolve_feed(args: argparse.Namespace, dataset: Dataset) -> Optional[str]:
    """How the training loader feeds the task.

    None: plain batches (CE). 'indexed': batches with sample indices (PS-KD's per-sample table).
    'views' / 'tensors': the replay mode of SDPGO and DLB (`--sdpgo-replay`; auto picks views
    for indexable datasets, tensors for streaming ones). DLB's two-forward form re-augments
    its replay half, so it needs views.
    """
    method = skd_method(args)
    if method is None:
        return None
    iterable = isinstance(dataset, IterableDataset)
    if method == 'pskd':
        if iterable:
            raise ValueError("--skd pskd keeps a table per sample and needs an indexable dataset, but this one streams")
        return 'indexed'
    if method == 'dlb2' and args.sdpgo_replay == 'tensors':
        raise ValueError("--skd dlb2 re-augments its replay half: use --sdpgo-replay views (or auto)")
    if args.sdpgo_replay == 'views' or (method == 'dlb2' and iterable):
        if iterable:
            raise ValueError(
                "--sdpgo-replay views needs an indexable dataset, but this one streams; use --sdpgo-replay tensors")
        return 'views'
    if args.sdpgo_replay == 'auto':
        return 'tensors' if iterable else 'views'
    return args.sdpgo_replay


def create_train_task(
        args: argparse.Namespace,
        model: nn.Module,
        feed: Optional[str],
        device: torch.device,
        num_samples: int = 0,
) -> TrainingTask:
    """ClassificationTask with timm's loss choice (or timm's distillation task from a teacher, --kd-model-name),
    or the self-distillation task of --sdpgo/--skd.

    `feed` comes from resolve_feed; `num_samples` (the training set size) sizes PS-KD's table.
    """
    method = skd_method(args)
    check_teacher_args(args, method)
    mixup = mixup_active(args)
    # timm's train.py uses BCE only where targets are soft (Mixup/CutMix) or smoothed
    bce = args.bce_loss and (mixup or args.smoothing)
    bce_options = dict(target_threshold=args.bce_target_thresh, pos_weight=args.bce_pos_weight)
    if method is None:
        if bce:
            criterion = BinaryCrossEntropy(smoothing=0.0 if mixup else args.smoothing, sum_classes=args.bce_sum,
                                           **bce_options)
        elif mixup:
            criterion = SoftTargetCrossEntropy()
        elif args.smoothing:
            criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
        else:
            criterion = nn.CrossEntropyLoss()
        if args.kd_model_name:  # timm's teacher distillation, with the criterion of a plain run
            return create_teacher_task(args, model, criterion, device)
        return ClassificationTask(model, criterion=criterion, device=device)
    smoothing = 0.0 if mixup else args.smoothing
    if method == 'pskd' and bce:
        raise ValueError("--bce-loss does not combine with --skd pskd (its soft targets are trained with timm's "
                         "SoftTargetCrossEntropy); drop one of them")
    if method == 'pskd':
        return create_skd_task(
            model, 'pskd', num_samples=num_samples, epochs=args.epochs, alpha_t=args.pskd_alpha_t,
            smoothing=smoothing, device=device)
    options = dict(
        temperature=args.sdpgo_temperature, topk=args.sdpgo_topk, beta=args.sdpgo_beta, layers=args.sdpgo_layers,
        alpha_mode=args.sdpgo_alpha_mode, alpha=args.sdpgo_alpha, alpha_min=args.sdpgo_alpha_min,
        alpha_max=args.sdpgo_alpha_max, alpha_warmup=args.sdpgo_alpha_warmup, weighting=args.sdpgo_weighting,
        replay=feed, smoothing=smoothing)
    if bce:  # the replay and fresh halves' task loss is timm's BCE, per sample
        options['criterion'] = PerSampleBCE(BinaryCrossEntropy(smoothing=smoothing, reduction='none', **bce_options))
    return create_skd_task(model, method, device=device, **options)


class PerSampleBCE(nn.Module):
    """timm's BinaryCrossEntropy as one loss per sample, summed over classes (timm's `--bce-sum`).

    Always the sum, for a self-distillation task: its distillation term τ²·KL is on cross-entropy's scale,
    and the class mean (timm's default) is C times smaller, so the distillation term would swamp it (on digits
    SDPGO then predicts one class; with the sum it trains as with CE). docs/METHOD.md section 5.
    """

    def __init__(self, bce: BinaryCrossEntropy):
        super().__init__()
        self.bce = bce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.bce(logits, target).sum(-1)


def create_mixup(args: argparse.Namespace, num_classes: int, replay_aware: bool) -> Optional[Mixup]:
    """timm's Mixup (plain training) or ReplayMixup (replay data paths), None when off."""
    if not mixup_active(args):
        return None
    cls = ReplayMixup if replay_aware else Mixup
    return cls(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
        num_classes=num_classes)


def create_train_loader(
        args: argparse.Namespace,
        dataset: Dataset,
        data_config: dict,
        device: torch.device,
        feed: Optional[str],
) -> ResumableLoader:
    """The training loader, resumable mid-epoch."""
    common = dict(
        input_size=data_config['input_size'], is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
        re_mode=args.remode, re_count=args.recount, train_crop_mode=args.train_crop_mode, scale=args.scale,
        ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob or 0.,
        gaussian_blur_prob=args.gaussian_blur_prob or 0., auto_augment=args.aa,
        interpolation=args.train_interpolation, mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, pin_memory=args.pin_mem, device=device, use_prefetcher=not args.no_prefetcher,
        worker_seeding=args.worker_seeding,
        # fresh workers each epoch: their seeds then follow the per-epoch reseed, so a resume is exact
        persistent_workers=False)
    if feed == 'views':
        loader = create_replay_loader(
            dataset, batch_size=args.batch_size, seed=args.seed,
            num_replicas=args.world_size, rank=args.rank, **common)
        return ResumableLoader(loader)
    batch_size = half_batch_size(args.batch_size) if feed == 'tensors' else args.batch_size
    if feed == 'tensors' and mixup_active(args) and batch_size % 2:
        raise ValueError(f"Mixup/CutMix in tensors mode needs an even half batch: --batch-size {args.batch_size} "
                         "must be a multiple of 4")
    create = create_indexed_loader if feed == 'indexed' else create_loader
    loader = create(
        dataset, batch_size=batch_size, distributed=args.distributed, num_aug_repeats=args.aug_repeats, **common)
    return ResumableLoader(loader)
