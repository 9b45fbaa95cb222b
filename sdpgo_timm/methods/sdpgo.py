"""SDPGO (--sdpgo, or --skd sdpgo), and the replay flags (--sdpgo-*) it shares with DLB (`methods.dlb`)."""
import argparse
from typing import Optional

import torch
import torch.nn as nn
from timm.loss import BinaryCrossEntropy
from timm.task import TrainingTask

from ..sil import WEIGHTINGS
from ..skd import create_skd_task
from ..task import ALPHA_MODES, REPLAY_MODES
from .base import Method, bce_active, mixup_active


def add_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('SDPGO parameters (the replay ones also DLB\'s)')
    group.add_argument('--sdpgo-temperature', type=float, default=3.0, help='softmax temperature tau (default: 3)')
    group.add_argument('--sdpgo-topk', type=int, default=2,
                       help='non-target classes kept in the soft label, <0 keeps all (default: 2)')
    group.add_argument('--sdpgo-beta', type=float, default=0.9, help='EMA rate of PWA lambda and moments (default: 0.9)')
    group.add_argument('--sdpgo-layers', type=str, nargs='+', default=None,
                       help='modules to tap for PWA (default: the last two feature levels)')
    group.add_argument('--sdpgo-alpha-mode', type=str, default='pwa', choices=ALPHA_MODES,
                       help='per-sample alpha from PWA, or the fixed --sdpgo-alpha')
    group.add_argument('--sdpgo-alpha', type=float, default=0.5, help='alpha when --sdpgo-alpha-mode fixed')
    group.add_argument('--sdpgo-alpha-min', type=float, default=0.0, help='lower clamp of PWA alpha')
    group.add_argument('--sdpgo-alpha-max', type=float, default=1.0, help='upper clamp of PWA alpha')
    group.add_argument('--sdpgo-alpha-warmup', type=int, default=0, metavar='STEPS',
                       help='ramp the replay half\'s alpha linearly from 0 over the first STEPS training steps (0: off)')
    group.add_argument('--sdpgo-weighting', type=str, default='complementary', choices=WEIGHTINGS,
                       help='replayed loss: (1-a)CE + a t^2 KL, or CE + a t^2 KL (DLB)')
    group.add_argument('--sdpgo-replay', type=str, default='auto', choices=('auto', *REPLAY_MODES),
                       help='replay re-augmented views (indexable datasets) or cached tensors (auto: views if possible)')


def check_args(args: argparse.Namespace) -> None:
    if args.torchscript and args.sdpgo_alpha_mode == 'pwa':
        raise ValueError("--torchscript does not combine with SDPGO's PWA alpha (it taps the model's layers with "
                         "Python hooks, which a scripted model does not run): add --sdpgo-alpha-mode fixed or drop "
                         "--torchscript")


def replay_task_builder(name: str):
    """The builder of create_skd_task's `name` (SDPGOTask, a preset of it, or DLB's two-forward task) from the
    --sdpgo-* flags; a preset's values override them."""
    def build_task(args: argparse.Namespace, model: nn.Module, feed: Optional[str], device: torch.device,
                   num_samples: int) -> TrainingTask:
        smoothing = 0.0 if mixup_active(args) else args.smoothing
        options = dict(
            temperature=args.sdpgo_temperature, topk=args.sdpgo_topk, beta=args.sdpgo_beta, layers=args.sdpgo_layers,
            alpha_mode=args.sdpgo_alpha_mode, alpha=args.sdpgo_alpha, alpha_min=args.sdpgo_alpha_min,
            alpha_max=args.sdpgo_alpha_max, alpha_warmup=args.sdpgo_alpha_warmup, weighting=args.sdpgo_weighting,
            replay=feed, smoothing=smoothing)
        if bce_active(args):  # the replay and fresh halves' task loss is timm's BCE, per sample
            options['criterion'] = PerSampleBCE(BinaryCrossEntropy(
                smoothing=smoothing, reduction='none', target_threshold=args.bce_target_thresh,
                pos_weight=args.bce_pos_weight))
        return create_skd_task(model, name, device=device, **options)
    return build_task


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


SDPGO = Method('sdpgo', flag='--sdpgo', summary='same as --sdpgo', build_task=replay_task_builder('sdpgo'),
               feed='replay', replay_modes=('views', 'tensors'), add_args=add_args, check_args=check_args)
