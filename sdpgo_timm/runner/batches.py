"""The training loader's batches per epoch, sizes and resolutions from timm's flags.

timm's create_loader draws scheduled batches (`--train-img-sizes`, `--train-batch-sizes`,
`--train-size-probs`, `--train-size-schedule*`) with its ScheduledBatchSampler, which can also
fix the number of batches per epoch (`--train-batches-per-epoch`), cycling through the data.
timm only passes that count on in scheduled mode, and `--epoch-repeats` only reaches streaming
datasets (create_dataset's `repeats`); here both also hold for indexable datasets, through
the same sampler with the model's one input size as the only choice. The learning rate and
`--variable-batch-loss-scale` refer to the schedule's policy-average batch size, as in timm.
"""
import argparse
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset, RandomSampler

from timm.data import ScheduledBatchSampler

from .naflex import batch_rows
from .recovery import inner_data_loader

__all__ = ['policy_batch_size', 'epoch_batches', 'scheduled_loader_kwargs', 'seed_scheduled_order',
           'BatchLossScale', 'batch_loss_scale']


def _schedule_epochs(args: argparse.Namespace) -> Optional[int]:
    return args.epochs if args.train_size_schedule == 'progressive' else None


def policy_batch_size(args: argparse.Namespace) -> float:
    """The batch size of a loader batch on average over the size schedule (--batch-size when unscheduled).

    timm's ScheduledBatchSampler computes it from the choices, their weights and the schedule alone; built here
    over a one-sample stand-in so that the learning rate can be set before the loader exists. Its checks of
    the schedule flags (weights, spread, random mix) are ValueErrors, one line each.
    """
    if args.train_img_sizes is None:
        return float(args.batch_size)
    batch_sizes = args.train_batch_sizes or [args.batch_size] * len(args.train_img_sizes)
    if len(batch_sizes) != len(args.train_img_sizes):
        raise ValueError(f"--train-batch-sizes gives {len(batch_sizes)} sizes for {len(args.train_img_sizes)} "
                         "--train-img-sizes: give one per image size")
    sampler = ScheduledBatchSampler(
        range(1), batch_sizes, choice_weights=args.train_size_probs, num_batches=1,
        choice_schedule=args.train_size_schedule, schedule_epochs=_schedule_epochs(args),
        schedule_spread=args.train_size_schedule_spread, schedule_random_mix=args.train_size_random_mix)
    return sampler.average_batch_size


def epoch_batches(args: argparse.Namespace, dataset: Dataset, samples_per_batch: float) -> Optional[int]:
    """Loader batches per epoch and process that the flags fix, None for one pass over the data.

    --train-batches-per-epoch as given; else --epoch-repeats N passes over an indexable dataset, shared by the
    processes (`samples_per_batch` dataset samples a batch; a streaming dataset repeats itself, timm's
    create_dataset `repeats`).
    """
    if args.train_batches_per_epoch:
        return args.train_batches_per_epoch
    if args.epoch_repeats > 0 and not isinstance(dataset, IterableDataset):
        return max(1, int(len(dataset) * args.epoch_repeats / (samples_per_batch * args.world_size)))
    return None


def scheduled_loader_kwargs(
        args: argparse.Namespace, dataset: Dataset, input_size: Sequence[int], batch_size: int) -> Dict[str, Any]:
    """timm create_loader's scheduled-batch arguments for the training loader; empty for its plain batches.

    Scheduled sizes as the flags say; a fixed batch count alone (--train-batches-per-epoch, --epoch-repeats)
    is a schedule of one choice, the model's input size at `batch_size`.
    """
    scheduled = args.train_img_sizes is not None
    num_batches = epoch_batches(args, dataset, policy_batch_size(args) if scheduled else batch_size)
    if not scheduled and num_batches is None:
        return {}
    if isinstance(dataset, IterableDataset):  # (--epoch-repeats reached create_dataset instead)
        flag = '--train-img-sizes' if scheduled else '--train-batches-per-epoch'
        raise ValueError(f"{flag} draws batches from an indexable dataset, but this one streams; set the epoch "
                         "length with --train-num-samples or --epoch-repeats instead")
    return dict(
        input_size_choices=args.train_img_sizes if scheduled else [tuple(input_size)],
        batch_size_choices=args.train_batch_sizes if scheduled else None,
        batch_choice_weights=args.train_size_probs if scheduled else None,
        batch_choice_seed=args.seed, batch_choice_schedule=args.train_size_schedule if scheduled else 'constant',
        batch_schedule_epochs=_schedule_epochs(args) if scheduled else None,
        batch_schedule_spread=args.train_size_schedule_spread, batch_schedule_random_mix=args.train_size_random_mix,
        num_batches=num_batches)


class EpochRandomSampler(RandomSampler):
    """torch's RandomSampler drawing from its own generator, seeded by `seed + epoch` in `set_epoch`.

    timm's ScheduledBatchSampler iterates its sampler again when a fixed batch count outruns one pass. With
    the global RNG (torch's default) that pass's order would depend on when it was drawn, which differs in a run
    resumed mid-epoch (it skips the done batches at once); from this generator it is the same.
    """

    def __init__(self, data_source: Dataset, seed: int):
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


def seed_scheduled_order(loader: Any, seed: int) -> None:
    """Give a loader's ScheduledBatchSampler (timm's) an epoch-seeded sample order where it shuffles with the
    global RNG; a DistributedSampler (or timm's RepeatAugSampler) under it is already seeded per epoch and stays."""
    batch_sampler = inner_data_loader(loader).batch_sampler
    if isinstance(batch_sampler, ScheduledBatchSampler) \
            and type(batch_sampler.sampler) is RandomSampler:
        batch_sampler.sampler = EpochRandomSampler(batch_sampler.sampler.data_source, seed)


class BatchLossScale:
    """The factor each batch's loss is multiplied by before backward, for batches whose size varies (timm's
    train.py does the same for scheduled batches and NaFlex batches).

    `mode` (--variable-batch-loss-scale, --naflex-loss-scale): 'linear' scales by the batch's size over
    `reference` (the policy-average batch size; --batch-size for NaFlex), 'sqrt' by its square root, 'none' not
    at all, so that a batch of many small images weighs more than one of a few large ones. With `rank_share`
    (NaFlex under DDP, as timm) also by world size x this rank's batch / the global batch, since ranks' batches
    differ and DDP averages their gradients with equal weights: a collective call, on every rank every step.
    """

    def __init__(self, mode: str, reference: float, rank_share: bool = False, world_size: int = 1):
        self.mode = mode
        self.reference = float(reference)
        self.rank_share = rank_share
        self.world_size = world_size

    def __call__(self, input: Any) -> Union[float, torch.Tensor]:
        rows = batch_rows(input)
        scale: Union[float, torch.Tensor] = 1.0
        if self.mode != 'none':
            scale = rows / self.reference
            if self.mode == 'sqrt':
                scale = scale ** 0.5
        if self.rank_share:
            device = (input['patches'] if isinstance(input, dict) else input).device
            total = torch.tensor(float(rows), device=device)
            dist.all_reduce(total)  # a tensor, not a number: no host sync
            scale = scale * self.world_size * rows / total
        return scale


def batch_loss_scale(args: argparse.Namespace) -> Optional[BatchLossScale]:
    """The per-batch loss scale of a run whose batch sizes vary, None where it is 1: a --naflex-loader run's
    (--naflex-loss-scale, relative to --batch-size), or a scheduled one's (--variable-batch-loss-scale, relative
    to the policy-average batch size; 'none' or unscheduled batches: None)."""
    if args.naflex_loader:
        return BatchLossScale(args.naflex_loss_scale, args.batch_size, args.distributed, args.world_size)
    if args.train_img_sizes is None or args.variable_batch_loss_scale == 'none':
        return None
    return BatchLossScale(args.variable_batch_loss_scale, policy_batch_size(args))
