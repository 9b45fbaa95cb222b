"""`Method`: what train.py's runner needs to know of a training method, declared in the method's own module."""
import argparse
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import Dataset, IterableDataset

from timm.task import TrainingTask

#: build_task(args, model, feed, device, num_samples): the task that trains `model` (`num_samples`: the training
#: set size, for per-sample tables)
TaskBuilder = Callable[[argparse.Namespace, nn.Module, Optional[str], torch.device, int], TrainingTask]


@dataclass(frozen=True)
class Method:
    """One training method as train.py runs it.

    `feed` is what its task takes from the training loader: None, timm's plain batches; 'indexed', batches with
    the rows' dataset indices; 'replay', batches that begin with the previous step's fresh half, in one of
    `replay_modes` (--sdpgo-replay; the first the dataset allows is auto's choice). `add_args(parser)` adds its
    flags, `check_args(args)` raises a ValueError for flags it cannot train with (at parse time).
    `self_distillation`: chosen by --skd NAME (or --sdpgo); the others (plain CE, timm's teacher distillation)
    are chosen by the absence of those flags.
    """
    name: str
    flag: str  # how messages name the user's choice
    summary: str  # for --help
    build_task: TaskBuilder
    feed: Optional[str] = None
    replay_modes: Tuple[str, ...] = ()
    add_args: Optional[Callable[[argparse.ArgumentParser], None]] = None
    check_args: Optional[Callable[[argparse.Namespace], None]] = None
    self_distillation: bool = True

    def resolve_feed(self, args: argparse.Namespace, dataset: Dataset) -> Optional[str]:
        """The feed of this run: `feed`, with the replay mode resolved from --sdpgo-replay for a replay method; a
        ValueError for a dataset or mode the task cannot take."""
        iterable = isinstance(dataset, IterableDataset)
        if self.feed == 'indexed' and iterable:
            raise ValueError(f"{self.flag} looks its samples up by index and needs an indexable dataset, but this "
                             "one streams")
        if self.feed != 'replay':
            return self.feed
        replay = args.sdpgo_replay
        if replay == 'auto':  # views need an indexable dataset
            usable = [mode for mode in self.replay_modes if not (mode == 'views' and iterable)]
            replay = usable[0] if usable else 'views'
        if replay not in self.replay_modes:
            raise ValueError(f"{self.flag} replays {' or '.join(self.replay_modes)} only: use --sdpgo-replay "
                             f"{self.replay_modes[0]} (or auto)")
        if replay == 'views' and iterable:
            fix = ('use --sdpgo-replay tensors' if 'tensors' in self.replay_modes else
                   f'{self.flag} needs a dataset that can be indexed')
            raise ValueError(f"--sdpgo-replay views needs an indexable dataset, but this one streams; {fix}")
        return replay


def mixup_active(args: argparse.Namespace) -> bool:
    """Whether Mixup or CutMix is on (the targets are then soft)."""
    return args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None


def bce_active(args: argparse.Namespace) -> bool:
    """timm's train.py uses --bce-loss only where targets are soft (Mixup/CutMix) or smoothed."""
    return bool(args.bce_loss and (mixup_active(args) or args.smoothing))
