"""Builders that turn parsed train.py arguments into the objects of a timm training run.

Kept out of train.py so that they can be imported and tested: the task (plain timm
ClassificationTask, timm's teacher distillation tasks of the --kd-* flags, or a self-distillation
task) and the module its optimizer updates, the training loader for each data path (timm's
create_loader; at half the batch in SDPGO `tensors` mode; the replay loader in `views` mode;
either one wrapped to resume mid-epoch) and the Mixup/CutMix object that goes with it.
"""
import argparse
import os
import pickle
from typing import Optional
from urllib.parse import urlparse

import torch
import torch.nn as nn
from torch.utils.data import Dataset, IterableDataset

import timm
from timm.data import Mixup, create_loader
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import get_pretrained_cfg, parse_model_name
from timm.task import ClassificationTask, TrainingTask

from ..hub.pretrained import ensure_cached
from ..protocol import SelfDistillationTask
from ..skd import create_skd_task
from .errors import one_line
from .recovery import ResumableLoader
from ..data.replay import ReplayMixup, create_indexed_loader, create_replay_loader
from ..task import half_batch_size


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
    """ClassificationTask with timm's loss choice, or the self-distillation task of --sdpgo/--skd.

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
        if args.kd_model_name:
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


def teacher_label(args: argparse.Namespace) -> Optional[str]:
    """'<type> distillation from <teacher>' for a teacher distillation run (--kd-model-name), else None."""
    if not getattr(args, 'kd_model_name', None):
        return None
    return f"{args.kd_distill_type} distillation from {args.kd_model_name}"


def check_teacher_args(args: argparse.Namespace, method: Optional[str]) -> None:
    """A ValueError for teacher distillation flags that cannot train: with self-distillation, or without a teacher."""
    teacher = getattr(args, 'kd_model_name', None)
    if teacher and method:
        given = '--sdpgo' if args.sdpgo else f"--skd {args.skd}"
        raise ValueError(f"--kd-model-name {teacher} and {given}: teacher distillation and self-distillation are "
                         "alternatives; drop one")
    if getattr(args, 'kd_checkpoint', None) and not teacher:
        raise ValueError(f"--kd-checkpoint {args.kd_checkpoint} needs --kd-model-name, the teacher's architecture")


def check_teacher_weights(name: str, checkpoint: Optional[str]) -> None:
    """A ValueError unless the teacher's weights are on this machine: the --kd-checkpoint file, else timm's
    pretrained weights of `name` in the Hugging Face (or torch hub) cache. A run never downloads its teacher."""
    source, _ = parse_model_name(name)
    if source != 'hf-hub' and not timm.is_model(name.split('.')[0]):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise ValueError(f"unknown teacher --kd-model-name {name!r}; similar timm models: {close}")
    if checkpoint:
        if source == 'hf-hub':  # timm loads a Hub model's own weights before any file
            raise ValueError(f"--kd-checkpoint needs the teacher's timm architecture in --kd-model-name, not the Hub "
                             f"model {name!r}")
        if not os.path.isfile(checkpoint):
            raise ValueError(f"--kd-checkpoint {checkpoint!r} is not a file; pass the teacher's weights file")
        return
    fix = f"pass --kd-checkpoint PATH, or load the weights once (timm.create_model({name!r}, pretrained=True))"
    cfg = get_pretrained_cfg(name) if source != 'hf-hub' else None
    if source != 'hf-hub' and (cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file)):
        raise ValueError(f"timm has no pretrained weights for teacher --kd-model-name {name!r}: pass --kd-checkpoint "
                         "PATH with the teacher's weights")
    try:
        ensure_cached(name, offline=True)
    except FileNotFoundError as e:
        raise ValueError(f"teacher weights not found: {e} A run never downloads its teacher: {fix}") from None
    if cfg is not None and not cfg.hf_hub_id and cfg.url and not cfg.file:  # timm fetches these through torch.hub
        cached = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(urlparse(cfg.url).path))
        if not os.path.isfile(cached):
            raise ValueError(f"teacher weights not found: {cfg.url} is not in the torch hub cache ({cached!r}). A "
                             f"run never downloads its teacher: {fix}")


def create_teacher_task(
        args: argparse.Namespace,
        model: nn.Module,
        criterion: nn.Module,
        device: torch.device,
) -> TrainingTask:
    """timm's teacher distillation task of --kd-distill-type (logit, feature or token), as timm's train.py builds it
    from the --kd-* flags, training `model` with the plain run's `criterion` plus the distillation term.

    The teacher is --kd-model-name with the weights of --kd-checkpoint (timm's `teacher_pretrained_path`) or timm's
    pretrained ones, which must be local (`check_teacher_weights`). The task's `loss_parts` name the two terms of
    its output for the training log and summary.csv.
    """
    # imported here: timm's teacher tasks take a teacher by name and `teacher_pretrained_path` only in recent timm
    # releases (1.0.31 checked), which a run without a teacher does not need
    from timm.task import FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask
    name, checkpoint = args.kd_model_name, args.kd_checkpoint
    check_teacher_weights(name, checkpoint)
    common = dict(
        student_model=model, teacher_model=name, criterion=criterion, teacher_pretrained_path=checkpoint or None,
        distill_loss_weight=args.distill_loss_weight, task_loss_weight=args.task_loss_weight, device=device,
        verbose=getattr(args, 'rank', 0) == 0)
    if args.kd_distill_type == 'logit':
        cls, kd_part = LogitDistillationTask, 'kd_loss'
        options = dict(loss_type=args.kd_loss_type, temperature=args.kd_temperature)
    elif args.kd_distill_type == 'feature':
        cls, kd_part = FeatureDistillationTask, 'kd_loss'
        options = dict(student_feature_dim=args.kd_student_feature_dim,
                       teacher_feature_dim=args.kd_teacher_feature_dim)
    else:
        cls, kd_part = TokenDistillationTask, 'distill_loss'
        options = dict(distill_type=args.kd_token_distill_type, temperature=args.kd_temperature)
    num_classes = model.num_classes
    try:
        # a train.py checkpoint keeps its args as a Namespace, which timm's data-only load must be allowed to read
        with torch.serialization.safe_globals([argparse.Namespace]):
            task = cls(**common, **options)
    except (RuntimeError, pickle.UnpicklingError) as e:
        if not checkpoint:
            raise
        raise ValueError(f"--kd-checkpoint {checkpoint!r} does not load as teacher --kd-model-name {name!r} with "
                         f"{num_classes} classes: {one_line(e)}") from None
    teacher_classes = task.teacher.model.pretrained_cfg.get('num_classes')
    if teacher_classes is not None and teacher_classes != num_classes:  # timm would have re-initialised its head
        raise ValueError(f"teacher --kd-model-name {name!r} was pretrained on {teacher_classes} classes, the student "
                         f"has {num_classes}: its head would be random. Pass --kd-checkpoint with a teacher trained "
                         "on these classes")
    if args.kd_distill_type == 'feature':
        check_feature_dims(args, model, task.teacher.model)
    task.loss_parts = ('task_loss', kd_part)
    return task


def check_feature_dims(args: argparse.Namespace, student: nn.Module, teacher: nn.Module) -> None:
    """A ValueError for a --kd-*-feature-dim that differs from the model's pooled feature width timm reports: the
    projection would not fit, and timm's task would fail only at the first step."""
    for flag, value, model, who in (
            ('--kd-student-feature-dim', args.kd_student_feature_dim, student, f'student {args.model!r}'),
            ('--kd-teacher-feature-dim', args.kd_teacher_feature_dim, teacher, f'teacher {args.kd_model_name!r}')):
        found = getattr(model, 'head_hidden_size', None) or getattr(model, 'num_features', None)
        if value is not None and found is not None and value != found:
            raise ValueError(f"{flag} {value}, but the {who} has {found} pooled features; leave it out (found "
                             "from the model)")


def optimizer_module(task: TrainingTask, model: nn.Module) -> nn.Module:
    """The module whose parameters the optimizer updates: the task's trainable module, as in timm's train.py (for
    feature distillation the student and its projection), but the model itself for a self-distillation task: its
    tapping wrapper adds no parameter, and timm's weight-decay exclusions and layer-decay groups would not find the
    model's parameters under the wrapper's name prefix."""
    return model if isinstance(task, SelfDistillationTask) else task.get_trainable_module()


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
