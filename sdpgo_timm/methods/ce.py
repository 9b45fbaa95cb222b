"""Plain supervised training: timm's ClassificationTask with the loss timm's train.py chooses."""
import argparse
from typing import Optional

import torch
import torch.nn as nn
from timm.task import ClassificationTask, TrainingTask, create_classification_loss

from .base import Method, bce_active, mixup_active


def plain_criterion(args: argparse.Namespace) -> nn.Module:
    """timm's loss factory, making the choice timm's train.py makes (JSD, BCE or CE; soft targets under Mixup)."""
    bce = bce_active(args)
    bce_args = dict(pos_weight=args.bce_pos_weight, bce_target_thresh=args.bce_target_thresh,
                    bce_sum=args.bce_sum) if bce else {}
    return create_classification_loss(
        'jsd' if args.jsd_loss else 'bce' if bce else 'ce', smoothing=args.smoothing, soft_targets=mixup_active(args),
        jsd_splits=args.aug_splits, **bce_args)


def build_task(args: argparse.Namespace, model: nn.Module, feed: Optional[str], device: torch.device,
               num_samples: int) -> TrainingTask:
    return ClassificationTask(model, criterion=plain_criterion(args), device=device)


CE = Method('ce', flag='', summary='cross-entropy', build_task=build_task, self_distillation=False)
