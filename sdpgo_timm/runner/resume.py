"""Resuming a run: which checkpoint (`--resume auto`), and a run resumed into its own folder taking over that
folder's history (`resume_in_place`). What a checkpoint restores, and what of it fits this run, is read beside
its writer: `runner.checkpoint.resume_training`.
"""
import argparse
import logging
import os

import torch.distributed as dist

from .checkpoint import ResumePoint, TrainCheckpointSaver, find_resume_checkpoint
from .summary import restore_summary_row, truncate_summary

_logger = logging.getLogger(__name__)


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


def resume_in_place(saver: TrainCheckpointSaver, path: str, output_dir: str, point: ResumePoint) -> None:
    """A run resumed into its own folder keeps the best checkpoint, the history and the recovery files of the epoch
    it resumes (those of earlier epochs are superseded: left by an older version or a kill before their clean-up);
    the rows of epochs it trains again leave summary.csv, and a row its checkpoint holds but summary.csv lost comes
    back."""
    saver.load_state_dict_from_checkpoint(path)
    saver.adopt_recovery_files()
    saver.remove_superseded_recovery(point.epoch - 1)
    summary = os.path.join(output_dir, 'summary.csv')
    truncate_summary(summary, point.epoch)
    if point.summary_row is not None:
        restore_summary_row(summary, point.summary_row)
