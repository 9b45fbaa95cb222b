"""Teacher knowledge distillation (the method of --kd-model-name): timm's --kd-* flags built into timm's own tasks.

timm.task's LogitDistillationTask, FeatureDistillationTask and TokenDistillationTask, created as timm's
train.py creates them, with two differences: the teacher's weights are local (our --kd-checkpoint, timm's
`teacher_pretrained_path`, or timm's pretrained weights already in the cache: a run never downloads its
teacher), and input a task cannot use is one ValueError line before training. Teacher distillation and
self-distillation (--sdpgo/--skd) are alternatives (`sdpgo_timm.methods.resolve_method`).
"""
import argparse
import logging
import os
import pickle
from typing import Any, Dict, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
import torch.nn as nn

from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg, parse_model_name
from timm.task import FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask, TrainingTask

from ..pretrained import check_model_name, ensure_cached
from .base import Method
from .ce import plain_criterion

_logger = logging.getLogger(__name__)


def check_teacher_weights(name: str, checkpoint: Optional[str]) -> None:
    """A ValueError unless the teacher's weights are on this machine: the --kd-checkpoint file, else timm's
    pretrained weights of `name` in the Hugging Face (or torch hub) cache."""
    check_model_name(name, 'teacher --kd-model-name')
    source, _ = parse_model_name(name)
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

    The teacher is --kd-model-name with the weights of --kd-checkpoint or timm's pretrained ones, which must be
    local (`check_teacher_weights`). The task's `loss_parts` name the two terms of its output for the training
    log and summary.csv.
    """
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
                         f"{num_classes} classes: {' '.join(str(e).split())[:300]}") from None
    teacher_classes = task.teacher.model.pretrained_cfg.get('num_classes')
    if teacher_classes is not None and teacher_classes != num_classes:  # timm would have re-initialised its head
        raise ValueError(f"teacher --kd-model-name {name!r} was pretrained on {teacher_classes} classes, the student "
                         f"has {num_classes}: its head would be random. Pass --kd-checkpoint with a teacher trained "
                         "on these classes")
    if args.kd_distill_type == 'feature':
        check_feature_dims(args, model, task.teacher.model)
    # timm renormalises the student's input from the student's pretrained_cfg to the teacher's; both may differ from
    # what the two were trained with (a recipe's --mean/--std), so each side's is set to its own
    student_mean, student_std = _normalisation(vars(args), model)
    teacher_mean, teacher_std, source = teacher_normalisation(
        checkpoint, task.teacher.model, (student_mean, student_std))
    for module, mean_name, std_name, mean, std in ((task, 'student_mean', 'student_std', student_mean, student_std),
                                                   (task.teacher, 'mean_kd', 'std_kd', teacher_mean, teacher_std)):
        buffer = getattr(module, mean_name)
        setattr(module, mean_name, torch.tensor(mean, device=buffer.device, dtype=buffer.dtype).view(1, -1, 1, 1))
        setattr(module, std_name, torch.tensor(std, device=buffer.device, dtype=buffer.dtype).view(1, -1, 1, 1))
    if getattr(args, 'rank', 0) == 0:
        target = ('as it is' if (teacher_mean, teacher_std) == (student_mean, student_std) else
                  f"renormalised to mean {tuple(teacher_mean)}, std {tuple(teacher_std)}")
        _logger.info(f"Teacher input: the student's (mean {tuple(student_mean)}, std {tuple(student_std)}) {target} "
                     f"({source})")
    task.loss_parts = ('task_loss', kd_part)
    return task


def _normalisation(saved_args: Dict[str, Any], model: nn.Module) -> Tuple[Sequence[float], Sequence[float]]:
    """(mean, std) a model's input was normalised with in training: its args' data config, as train.py resolves it."""
    config = resolve_data_config(saved_args, model=model)
    return tuple(config['mean']), tuple(config['std'])


def _saved_args(checkpoint: str) -> Optional[Dict[str, Any]]:
    """The training args of a train.py checkpoint; None for a weights-only file (a state dict, .safetensors). Data
    only (weights_only); the file already loaded as the teacher's weights."""
    if checkpoint.endswith('.safetensors'):
        return None
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(checkpoint, map_location='cpu', weights_only=True)
    saved = data.get('args') if isinstance(data, dict) else None
    if saved is None:
        return None
    return vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved)


def teacher_normalisation(checkpoint: Optional[str], teacher: nn.Module, student: Tuple[Sequence[float], ...]
                          ) -> Tuple[Sequence[float], Sequence[float], str]:
    """(mean, std, where they come from) of the input the teacher was trained on: a train.py checkpoint's own
    training args; for a weights-only file, the student's (a --kd-checkpoint is trained on the student's data, and
    nothing says with what else); for timm's pretrained weights, their pretrained_cfg (as timm)."""
    if not checkpoint:
        return (*_normalisation({}, teacher), "timm's pretrained_cfg of the teacher")
    saved = _saved_args(checkpoint)
    if saved is None:
        return (*student, "the student's: --kd-checkpoint holds weights only, no training args")
    return (*_normalisation(saved, teacher), "the teacher checkpoint's training args")


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


def add_args(parser: argparse.ArgumentParser) -> None:
    """timm's teacher knowledge distillation flags (timm.task's distillation tasks), plus our --kd-checkpoint."""
    group = parser.add_argument_group('Knowledge distillation (teacher) parameters')
    group.add_argument('--kd-model-name', default=None, type=str, metavar='MODEL',
                       help='name of teacher model for knowledge distillation (its weights: --kd-checkpoint, else '
                            "timm's pretrained ones, which must already be in the local cache: never downloaded)")
    group.add_argument('--kd-checkpoint', default=None, type=str, metavar='PATH',
                       help="(ours, not timm's) the teacher's weights: a training checkpoint, a saved state dict or "
                            '.safetensors of --kd-model-name with the training data\'s classes')
    group.add_argument('--kd-distill-type', default='logit', type=str, choices=['logit', 'feature', 'token'],
                       help='type of distillation: "logit" for output distillation, "feature" for intermediate '
                            'features, "token" for models with distillation heads (default: logit)')
    group.add_argument('--kd-loss-type', default='kl', type=str,
                       help='loss function for logit distillation (default: kl; only "kl" is supported)')
    group.add_argument('--distill-loss-weight', default=None, type=float,
                       help='weight for distillation loss. If both weights specified: loss = task_weight * task + '
                            'distill_weight * distill. If only task_weight: loss = task_weight * task + '
                            '(1-task_weight) * distill. Default: 1.0 if only this specified.')
    group.add_argument('--task-loss-weight', default=None, type=float,
                       help='weight for task (classification) loss. See --distill-loss-weight for weighting modes. '
                            'Default: 1.0 if unspecified.')
    group.add_argument('--kd-temperature', default=4.0, type=float,
                       help='temperature for softmax in distillation (default: 4.0, typical range: 1-4)')
    group.add_argument('--kd-student-feature-dim', default=None, type=int,
                       help='student model feature dimension (auto-detected from model.head_hidden_size or '
                            'model.num_features if not specified)')
    group.add_argument('--kd-teacher-feature-dim', default=None, type=int,
                       help='teacher model feature dimension (auto-detected from model.head_hidden_size or '
                            'model.num_features if not specified)')
    group.add_argument('--kd-token-distill-type', default='soft', type=str, choices=['soft', 'hard'],
                       help='token distillation type: "soft" for KL-div with temperature, "hard" for CE with teacher '
                            'argmax (default: soft)')


def build_task(args: argparse.Namespace, model: nn.Module, feed: Optional[str], device: torch.device,
               num_samples: int) -> TrainingTask:
    """timm's teacher distillation with the criterion of a plain run."""
    return create_teacher_task(args, model, plain_criterion(args), device)


KD = Method('kd', flag='--kd-model-name', summary="timm's teacher distillation", build_task=build_task,
            add_args=add_args, self_distillation=False)
