"""Run-time set-up shared by train.py and validate.py: device, model, AMP, learning rate, resume,
the evaluation model of a checkpoint and results files.

Thin wrappers over timm (init_distributed_device, create_model, create_loader) that turn
their failures into one clear message, and the SDPGO-specific parts of a resume: each
rank's replay cache and the recorded Mixup parameters.
"""
import argparse
import csv
import json
import logging
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

import timm
from timm.layers import set_fast_norm
from timm.data import create_loader
from timm.models import clean_state_dict, resolve_model_input_args, split_model_name_tag
from timm.task import TrainingTask
from timm.utils import init_distributed_device

from .checkpoint import CheckpointError, load_checkpoint_file
from .data.factory import dataset_num_classes
from .pretrained import ensure_cached

_logger = logging.getLogger('train')

_RANK_STATES = 'task_state_ranks'
_MIXUP_STATE = 'replay_mixup'


def default_device(device: Optional[str]) -> str:
    """`device`, or CUDA when present else the CPU when it is unset (or 'cuda' on a machine without CUDA)."""
    if device is None or (device == 'cuda' and not torch.cuda.is_available()):
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    return device


def init_device(args: argparse.Namespace) -> torch.device:
    """timm's distributed/device init; the default device is CUDA when present, else the CPU."""
    args.device = default_device(args.device)
    if args.device == 'cpu' and args.dist_backend is None:
        args.dist_backend = 'gloo'
    return init_distributed_device(args)


def create_timm_model(args: argparse.Namespace, dataset: Optional[Dataset] = None) -> torch.nn.Module:
    """timm.create_model from the model flags; an unknown name lists close matches."""
    if args.num_classes is None and dataset is not None:
        args.num_classes = dataset_num_classes(dataset)
    kwargs: Dict[str, Any] = dict(args.model_kwargs or {})
    # training-only options are absent from validate.py's args
    for key, value in (('num_classes', args.num_classes), ('global_pool', args.gp),
                       ('drop_path_rate', getattr(args, 'drop_path', None)),
                       ('drop_block_rate', getattr(args, 'drop_block', None)),
                       ('bn_momentum', getattr(args, 'bn_momentum', None)), ('bn_eps', getattr(args, 'bn_eps', None))):
        if value is not None:
            kwargs[key] = value
    if getattr(args, 'pretrained_path', None):
        kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    if not timm.is_model(args.model.split('.')[0]) and not args.model.startswith('hf-hub:'):
        close = timm.list_models(f"*{args.model.split('_')[0]}*")[:10]
        raise ValueError(f"unknown model {args.model!r}; similar timm models: {close}")
    if args.pretrained and not getattr(args, 'pretrained_path', None):
        try:
            ensure_cached(args.model)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
    if getattr(args, 'fast_norm', False):
        set_fast_norm()
    # timm's resolver turns --input-size/--img-size/--in-chans into model arguments only where the model takes
    # them (fixed-size models such as ViT get img_size; a ResNet does not)
    model = timm.create_model(
        **resolve_model_input_args(args.model, vars(args), **kwargs), pretrained=args.pretrained,
        drop_rate=getattr(args, 'drop', 0.))
    if getattr(args, 'head_init_scale', None) is not None:
        with torch.no_grad():
            model.get_classifier().weight.mul_(args.head_init_scale)
            model.get_classifier().bias.mul_(args.head_init_scale)
    if getattr(args, 'head_init_bias', None) is not None:
        torch.nn.init.constant_(model.get_classifier().bias, args.head_init_bias)
    if getattr(args, 'initial_checkpoint', ''):
        checkpoint = load_checkpoint_file(args.initial_checkpoint)
        model.load_state_dict(clean_state_dict(checkpoint['state_dict']))
    if getattr(args, 'grad_checkpointing', False):
        model.set_grad_checkpointing(enable=True)
    return model


def resolve_lr(args: argparse.Namespace) -> None:
    """--lr if given, else --lr-base scaled by the global batch as timm does (linear, sqrt for adaptive opts)."""
    if args.lr is not None:
        return
    global_batch = args.batch_size * args.world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    args.lr = args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)


def create_eval_loader(args: argparse.Namespace, dataset: Dataset, data_config: dict, device: torch.device):
    """timm's evaluation loader (center crop, sharded in order under DDP)."""
    return create_loader(
        dataset, input_size=data_config['input_size'],
        batch_size=getattr(args, 'validation_batch_size', None) or args.batch_size,
        is_training=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, distributed=getattr(args, 'distributed', False),
        crop_pct=data_config['crop_pct'], pin_memory=getattr(args, 'pin_mem', False), device=device,
        use_prefetcher=not getattr(args, 'no_prefetcher', False))


def _one_line(error: Exception, limit: int = 300) -> str:
    """An exception's message on one line (load_state_dict's spans several), cut at `limit` characters."""
    return ' '.join(str(error).split())[:limit]


def check_checkpoint_arch(checkpoint: Dict[str, Any], path: str, model: str) -> None:
    """A CheckpointError when the checkpoint's architecture (pretrained tags aside) is not `model`'s."""
    arch = checkpoint.get('arch')
    if arch and split_model_name_tag(arch)[0] != split_model_name_tag(model)[0]:
        raise CheckpointError(f"{str(path)!r} holds a {arch!r} model, not --model {model!r}")


def create_autocast(args: argparse.Namespace, device: torch.device) -> Tuple[Callable, Optional[torch.dtype]]:
    """timm's AMP set-up: an autocast context factory (nullcontext without --amp) and the AMP dtype (or None)."""
    if not args.amp:
        return nullcontext, None
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    return partial(torch.autocast, device_type=device.type, dtype=amp_dtype), amp_dtype


def create_eval_model(
        args: argparse.Namespace,
        dataset: Dataset,
        checkpoint: Optional[Dict[str, Any]] = None,
        path: str = '',
) -> torch.nn.Module:
    """The timm model of validate.py's args with a training checkpoint's weights (EMA ones with --use-ema).

    Weights that do not fit (another architecture or class count) and a split with more
    classes than the model predicts are one-line CheckpointErrors / ValueErrors.
    """
    if checkpoint is not None:
        check_checkpoint_arch(checkpoint, path, args.model)
    model = create_timm_model(args, dataset)
    if checkpoint is not None:
        key = 'state_dict_ema' if args.use_ema else 'state_dict'
        if checkpoint.get(key) is None:
            raise CheckpointError(f"{str(path)!r} has no EMA weights ('state_dict_ema'): evaluate without --use-ema")
        try:
            model.load_state_dict(clean_state_dict(checkpoint[key]))
        except RuntimeError as e:
            raise CheckpointError(
                f"{str(path)!r} does not fit --model {args.model!r} with {model.num_classes} classes: "
                f"{_one_line(e)}") from None
    num_classes = dataset_num_classes(dataset)
    if num_classes is not None and num_classes > model.num_classes:
        raise ValueError(
            f"the {args.split!r} split has {num_classes} classes but the model predicts {model.num_classes}; "
            "check the data and --num-classes")
    return model


def write_results(path: str, results: List[Dict[str, Any]]) -> None:
    """Write result rows (one dict per model) to a .json (a list) or .csv (a header and a row each) file."""
    with open(path, 'w', newline='') as f:
        if path.lower().endswith('.json'):
            json.dump(results, f, indent=4)
            return
        writer = csv.DictWriter(f, fieldnames=list(results[0]) if results else [])
        writer.writeheader()
        writer.writerows(results)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def gather_task_states(task: TrainingTask, args: argparse.Namespace) -> Dict[str, Any]:
    """Every rank's task state (its own replay cache), gathered for the checkpoint; collective."""
    state = _to_cpu(task.get_task_state())
    if not state or not args.distributed:
        return {}
    states = [None] * args.world_size
    dist.all_gather_object(states, state)
    return {_RANK_STATES: states}


def mixup_extra_state(mixup_fn) -> Dict[str, Any]:
    return {_MIXUP_STATE: mixup_fn.state_dict()} if hasattr(mixup_fn, 'state_dict') else {}


def resume_training(args: argparse.Namespace, task: TrainingTask, optimizer, loss_scaler, mixup_fn) -> int:
    """Load model, EMA, optimizer, scaler, this rank's task state and Mixup record; return the next epoch."""
    checkpoint = load_checkpoint_file(args.resume)
    check_checkpoint_arch(checkpoint, args.resume, args.model)
    task_state = checkpoint.get('task_state')
    rank_states = checkpoint.get(_RANK_STATES)
    if rank_states is not None:
        if len(rank_states) != args.world_size:
            raise CheckpointError(
                f"{args.resume!r} holds replay caches of {len(rank_states)} processes, this run has "
                f"{args.world_size}: resume with the same number of processes")
        task_state = rank_states[args.rank]
    try:
        task.load_checkpoint_state(clean_state_dict(checkpoint['state_dict']), task_state)
    except RuntimeError as e:
        raise CheckpointError(f"{args.resume!r} does not fit --model {args.model!r}: {_one_line(e)}") from None
    if task.has_ema() and checkpoint.get('state_dict_ema') is not None:
        task.load_checkpoint_state(clean_state_dict(checkpoint['state_dict_ema']), None, ema=True)
    if optimizer is not None and 'optimizer' in checkpoint and not args.no_resume_opt:
        optimizer.load_state_dict(checkpoint['optimizer'])
    if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
        loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])
    if mixup_fn is not None and _MIXUP_STATE in checkpoint and hasattr(mixup_fn, 'load_state_dict'):
        mixup_fn.load_state_dict(checkpoint[_MIXUP_STATE])
    epoch = int(checkpoint.get('epoch', -1)) + 1
    _logger.info(f"Resumed {args.resume!r} at epoch {epoch}")
    return epoch
