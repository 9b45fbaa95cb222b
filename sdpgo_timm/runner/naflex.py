"""timm's NaFlex loader (--naflex-loader): its loaders (train.py's and validate.py's) and its batches.

A NaFlex batch's input is a dict of patches (`patches`, `patch_coord`, `patch_valid`, `seq_len`)
whose batch size varies from step to step: the loader draws a sequence length per batch
(--naflex-train-seq-lens) and fits as many images as a fixed token budget allows. timm's
train.py therefore scales each batch's loss by its size relative to --batch-size
(--naflex-loss-scale) and, under DDP, by this rank's share of the global batch; `batches.BatchLossScale`
does the same for our loop. Loaders and mixing are timm's (create_naflex_loader, NaFlexMixup).
"""
import argparse
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import Dataset, IterableDataset

from timm.data import NaFlexMixup, create_naflex_loader
from timm.data.naflex_loader import NaFlexPrefetchLoader

from ..methods import get_method
from .errors import ConfigError

PatchSize = Tuple[int, int]


def input_to(input: Any, device: torch.device, dtype: Optional[torch.dtype] = None) -> Any:
    """A batch input on `device`, its floating-point tensors in `dtype` if given (--model-dtype): an image tensor,
    or each tensor of a NaFlex dict (coordinates and masks keep theirs; others, e.g. `seq_len`, stay as they are)."""
    def move(v: torch.Tensor) -> torch.Tensor:
        return v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)
    if isinstance(input, dict):
        return {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in input.items()}
    return move(input)


def batch_rows(input: Any) -> int:
    """The batch size of an input: an image tensor's rows, or a NaFlex dict's images."""
    return input['patches'].shape[0] if isinstance(input, dict) else len(input)


def check_naflex_args(args: argparse.Namespace) -> None:
    """A ConfigError for each option --naflex-loader cannot go with (timm refuses most of them too)."""
    if not args.naflex_loader:
        return
    method = get_method(args.method)
    if method.self_distillation:
        raise ConfigError(f"--naflex-loader does not combine with {method.flag}: NaFlex batches vary in size and sequence "
                          "length, so there is no fixed replay half to distil from; drop one of them")
    conflicts = (
        (getattr(args, 'train_img_sizes', None) is not None,
         '--naflex-loader and --train-img-sizes are alternative loader modes; pick one'),
        (getattr(args, 'use_multi_epochs_loader', False),
         '--use-multi-epochs-loader is not supported with --naflex-loader; drop it'),
        (args.aug_splits > 1, "--aug-splits is not supported by the NaFlex loader; drop it or --naflex-loader"),
        (args.resplit, "--resplit is not supported by the NaFlex loader; drop it"),
        (args.aug_repeats, "--aug-repeats is not supported by the NaFlex loader; drop it or --naflex-loader"),
        (args.channels_last, "--channels-last does not apply to NaFlex patch batches; drop it"),
        (args.recovery_interval, "--recovery-interval cannot resume a NaFlex loader mid-epoch (its batches are "
                                 "drawn inside the dataset); drop it: epoch checkpoints still resume"),
        (args.naflex_patch_size_probs and not args.naflex_patch_sizes,
         "--naflex-patch-size-probs weighs --naflex-patch-sizes: give those too"),
        (args.naflex_patch_size_probs and args.naflex_patch_sizes
         and len(args.naflex_patch_size_probs) != len(args.naflex_patch_sizes),
         '--naflex-patch-size-probs must have same length as --naflex-patch-sizes'),
    )
    for conflict, message in conflicts:
        if conflict:
            raise ConfigError(message)
    for name in ('naflex_train_seq_lens', 'naflex_patch_sizes'):
        if any(n < 1 for n in getattr(args, name) or ()):
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.naflex_max_seq_len < 1:
        raise ConfigError(f"--naflex-max-seq-len must be >= 1, got {args.naflex_max_seq_len}")


def model_patch_size(model: nn.Module, model_name: str) -> PatchSize:
    """The patch size of a NaFlex model (its `get_patch_size()`); a ConfigError for any other model."""
    if not hasattr(model, 'get_patch_size'):
        raise ConfigError(f"--naflex-loader needs a NaFlex model (one with get_patch_size(), e.g. naflexvit_*), and "
                          f"--model {model_name!r} is not one")
    return tuple(model.get_patch_size())


def _common_kwargs(args: argparse.Namespace, data_config: dict, device: torch.device) -> dict:
    """create_naflex_loader's arguments shared by training and validation."""
    return dict(
        mean=data_config['mean'], std=data_config['std'], channels=data_config['input_size'][0],
        pin_memory=args.pin_mem, device=device, distributed=getattr(args, 'distributed', False),
        img_dtype=getattr(torch, args.model_dtype or 'float32'),
        use_prefetcher=not args.no_prefetcher,
        # validate.py has no --naflex-patchify-channels-first (timm's neither): channels last, timm's default
        patchify_channels_last=not getattr(args, 'naflex_patchify_channels_first', False))


def create_naflex_train_loader(
        args: argparse.Namespace,
        dataset: Dataset,
        data_config: dict,
        device: torch.device,
        patch_size: PatchSize,
        augment: Dict[str, Any],
) -> Union[torch.utils.data.DataLoader, NaFlexPrefetchLoader]:
    """timm's NaFlex training loader, with NaFlexMixup when Mixup/CutMix is on (it mixes inside the loader);
    `augment` holds the augmentation and worker arguments of every training loader (builders.create_train_loader).

    Its sample order and --mixup-off-epoch follow its dataset's `set_epoch`; it cannot resume mid-epoch.
    """
    if isinstance(dataset, IterableDataset):
        raise ConfigError("--naflex-loader needs an indexable dataset, but this one streams; drop --naflex-loader")
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None:
        # timm's NaFlexMixup has no --mixup-mode or --cutmix-minmax
        mixup_fn = NaFlexMixup(
            num_classes=args.num_classes, mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
            mixup_off_epoch=args.mixup_off_epoch)
    patch_kwargs = dict(patch_size=patch_size)
    if args.naflex_patch_sizes:
        patch_kwargs = dict(patch_size_choices=args.naflex_patch_sizes,
                            patch_size_choice_probs=args.naflex_patch_size_probs)
    return create_naflex_loader(
        dataset, train_seq_lens=args.naflex_train_seq_lens, batch_size=args.batch_size, is_training=True,
        mixup_fn=mixup_fn, rank=args.rank, world_size=args.world_size, seed=args.seed, **augment, **patch_kwargs,
        **_common_kwargs(args, data_config, device))


def create_naflex_eval_loader(
        args: argparse.Namespace,
        dataset: Dataset,
        data_config: dict,
        device: torch.device,
        patch_size: PatchSize,
        **kwargs: Any,
) -> Union[torch.utils.data.DataLoader, NaFlexPrefetchLoader]:
    """timm's NaFlex evaluation loader (train.py's and validate.py's): every image at the model's patch size, up to
    --naflex-max-seq-len patches; `kwargs` (crop mode, input dtype) go to timm's create_naflex_loader."""
    return create_naflex_loader(
        dataset, patch_size=patch_size, max_seq_len=args.naflex_max_seq_len,
        batch_size=getattr(args, 'validation_batch_size', None) or args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'], num_workers=args.workers,
        **_common_kwargs(args, data_config, device), **kwargs)
