"""PS-KD (Kim et al., ICCV 2021) as train.py runs it: `--skd pskd`, a per-sample table of last epoch's predictions
(so batches carry their rows' dataset indices), and its flag --pskd-alpha-t."""
import argparse
from typing import Optional

import torch
import torch.nn as nn
from timm.task import TrainingTask

from ..skd import create_skd_task
from .base import Method, bce_active, mixup_active


def add_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('PS-KD parameters')
    group.add_argument('--pskd-alpha-t', type=float, default=0.8, help='PS-KD final alpha_T (default: 0.8)')


def build_task(args: argparse.Namespace, model: nn.Module, feed: Optional[str], device: torch.device,
               num_samples: int) -> TrainingTask:
    if bce_active(args):
        raise ValueError("--bce-loss does not combine with --skd pskd (its soft targets are trained with timm's "
                         "SoftTargetCrossEntropy); drop one of them")
    return create_skd_task(
        model, 'pskd', num_samples=num_samples, epochs=args.epochs, alpha_t=args.pskd_alpha_t,
        smoothing=0.0 if mixup_active(args) else args.smoothing, device=device)


PSKD = Method('pskd', flag='--skd pskd', summary='PS-KD', build_task=build_task, feed='indexed', add_args=add_args)
