"""Resuming a run: which checkpoint (`--resume auto`), what of it fits this run, and where to continue.

A resume restores the model, EMA, optimizer, loss scaler, this rank's self-distillation state and
Mixup record and, from a recovery checkpoint, the place inside the epoch (`ResumePoint.recovery`,
applied by `runner.recovery.restore_recovery`). State saved by a run of another shape (method, batch
per process, process count) is dropped with a warning, or refused for a recovery checkpoint. A run
resumed into its own folder also takes over that folder's history (`resume_in_place`).
"""
import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch.distributed as dist
from timm.models import clean_state_dict
from timm.task import TrainingTask

from ..methods import recorded_method
from .checkpoint import (
    MIXUP_RANKS, MIXUP_STATE, POSITION, RANK_STATES, RECOVERY_RANKS, RNG_RANKS, SUMMARY_ROW, TrainCheckpointSaver,
    find_resume_checkpoint, load_checkpoint_file, restore_summary_row, resume_position, truncate_summary)
from .errors import CheckpointError, one_line
from .setup import check_checkpoint_arch

_logger = logging.getLogger(__name__)


def _training_shape_change(saved: Any, args: argparse.Namespace) -> str:
    """What differs between the checkpoint's run and this one in what its self-distillation state depends on: the
    method, the batch per process, the number of processes ('' when nothing does, or the checkpoint does not say)."""
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved or {})
    if not saved:
        return ''
    changes = []
    before, now = recorded_method(saved) or 'cross-entropy', recorded_method(vars(args)) or 'cross-entropy'
    if before != now:
        changes.append(f"another method ({before}, now {now})")
    for key, flag in (('batch_size', '--batch-size'), ('world_size', 'processes')):
        if saved.get(key) is not None and saved.get(key) != getattr(args, key, None):
            changes.append(f"{saved[key]} {flag} (now {getattr(args, key, None)})" if flag == 'processes' else
                           f"{flag} {saved[key]} (now {getattr(args, key, None)})")
    return ', '.join(changes)


def _this_rank(checkpoint: Dict[str, Any], key: str, args: argparse.Namespace, path: str):
    """This rank's entry of a per-rank list of the checkpoint (None when absent)."""
    states = checkpoint.get(key)
    if states is None:
        return None
    if len(states) != args.world_size:
        raise CheckpointError(
            f"{path!r} holds the state of {len(states)} processes, this run has {args.world_size}: resume with the "
            "same number of processes")
    return states[args.rank]


@dataclass
class ResumePoint:
    """Where a resumed run continues: the epoch, the optimizer updates before it, and for a recovery
    checkpoint this rank's mid-epoch state (see sdpgo_timm.runner.recovery)."""
    epoch: int = 0
    num_updates: Optional[int] = None
    recovery: Optional[Dict[str, Any]] = None
    summary_row: Optional[Dict[str, Any]] = None  # the summary.csv row an epoch checkpoint holds
    rng: Optional[Dict[str, Any]] = None  # this rank's RNG states at an epoch checkpoint (restore before training)


def resolve_resume(args: argparse.Namespace) -> str:
    """--resume's checkpoint; for `auto`, the newest one of the experiment folder that loads ('' when none)."""
    if args.resume != 'auto':
        return args.resume
    path = ''
    if args.rank == 0:
        folder = os.path.join(args.output or './output/train', args.experiment)
        path = (find_resume_checkpoint(folder) if os.path.isdir(folder) else None) or ''
        if not path:
            _logger.info(f"--resume auto: no checkpoint in {folder!r}, starting from the beginning")
    if args.distributed:
        shared = [path]
        dist.broadcast_object_list(shared, src=0)
        path = shared[0]
    return path


def resume_training(
        args: argparse.Namespace, path: str, task: TrainingTask, optimizer, loss_scaler, mixup_fn) -> ResumePoint:
    """Load model, EMA, optimizer, scaler, this rank's task state and Mixup record; return where to continue."""
    checkpoint = load_checkpoint_file(path)
    check_checkpoint_arch(checkpoint, path, args.model)
    change = _training_shape_change(checkpoint.get('args'), args)
    if change and POSITION in checkpoint:
        raise CheckpointError(f"{path!r} is a recovery checkpoint of a run with {change}: its place in the epoch "
                              "does not carry over; resume from an epoch checkpoint (last.pth.tar) instead")
    task_state = checkpoint.get('task_state')
    if RANK_STATES in checkpoint and not change:
        task_state = _this_rank(checkpoint, RANK_STATES, args, path)
    if change and task_state:
        _logger.warning(f"{path!r} was trained with {change}: its self-distillation state (replay cache, PS-KD "
                        "table, PWA statistics) does not fit this run and is dropped; the model, optimizer and "
                        "schedule resume as saved, and the first step trains without a teacher")
        task_state = None
    try:
        task.load_checkpoint_state(clean_state_dict(checkpoint['state_dict']), task_state)
    except RuntimeError as e:
        raise CheckpointError(f"{path!r} does not fit --model {args.model!r}: {one_line(e)}") from None
    if task.has_ema():
        ema = checkpoint.get('state_dict_ema')
        if ema is None:  # timm builds its EMA after the resume; this one exists already and must not stay random
            _logger.warning(f"{path!r} has no EMA weights: --model-ema starts from the resumed model's weights")
            ema = checkpoint['state_dict']
        # the EMA of task-owned modules too (feature distillation's projection); self-distillation tasks keep none
        task.load_checkpoint_state(clean_state_dict(ema), checkpoint.get('task_state_ema'), ema=True)
    if optimizer is not None and 'optimizer' in checkpoint and not args.no_resume_opt:
        optimizer.load_state_dict(checkpoint['optimizer'])
    if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
        loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])
    mixup = None if change else _this_rank(checkpoint, MIXUP_RANKS, args, path) if MIXUP_RANKS in checkpoint else (
        checkpoint.get(MIXUP_STATE))
    if mixup_fn is not None and mixup is not None and hasattr(mixup_fn, 'load_state_dict'):
        mixup_fn.load_state_dict(mixup)
    epoch, step = resume_position(checkpoint)
    point = ResumePoint(epoch, summary_row=checkpoint.get(SUMMARY_ROW))
    if RNG_RANKS in checkpoint and POSITION not in checkpoint and not change:
        point.rng = _this_rank(checkpoint, RNG_RANKS, args, path)
    if POSITION in checkpoint:
        point.num_updates = int(checkpoint[POSITION]['num_updates'])
        point.recovery = _this_rank(checkpoint, RECOVERY_RANKS, args, path)
    _logger.info(f"Resumed {path!r} at epoch {epoch}" + (f", after step {step}" if step else ''))
    return point


def resume_in_place(saver: TrainCheckpointSaver, path: str, output_dir: str, point: ResumePoint) -> None:
    """A run resumed into its own folder keeps the best checkpoint, the history and the recovery files; the rows
    of epochs it trains again leave summary.csv, and a row its checkpoint holds but summary.csv lost comes back."""
    saver.load_state_dict_from_checkpoint(path)
    saver.adopt_recovery_files()
    summary = os.path.join(output_dir, 'summary.csv')
    truncate_summary(summary, point.epoch)
    if point.summary_row is not None:
        restore_summary_row(summary, point.summary_row)
