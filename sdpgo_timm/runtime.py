"""Run-time set-up shared by train.py and validate.py: device, model, learning rate, resume.

Thin wrappers over timm (init_distributed_device, create_model, create_loader) that turn
their failures into one clear message, and the SDPGO-specific parts of a resume: each
rank's replay cache and the recorded Mixup parameters.
"""
import argparse
import logging
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

import timm
from timm.data import create_loader
from timm.models import clean_state_dict
from timm.task import TrainingTask
from timm.utils import init_distributed_device

from .checkpoint import CheckpointError, load_checkpoint_file
from .data.factory import dataset_num_classes

_logger = logging.getLogger('train')

_RANK_STATES = 'task_state_ranks'
_MIXUP_STATE = 'replay_mixup'


def init_device(args: argparse.Namespace) -> torch.device:
    """timm's distributed/device init; the default device is CUDA when present, else the CPU."""
    if args.device is None or (args.device == 'cuda' and not torch.cuda.is_available()):
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.device == 'cpu' and args.dist_backend is None:
        args.dist_backend = 'gloo'
    return init_distributed_device(args)


def create_timm_model(args: argparse.Namespace, dataset: Optional[Dataset] = None) -> torch.nn.Module:
    """timm.create_model from the model flags; an unknown name lists close matches."""
    if args.num_classes is None and dataset is not None:
        args.num_classes = dataset_num_classes(dataset)
    kwargs: Dict[str, Any] = dict(args.model_kwargs or {})
    for key, value in (('img_size', args.img_size), ('in_chans', args.in_chans), ('global_pool', args.gp),
                       ('drop_path_rate', args.drop_path), ('drop_block_rate', args.drop_block),
                       ('bn_momentum', args.bn_momentum), ('bn_eps', args.bn_eps)):
        if value is not None:
            kwargs[key] = value
    if getattr(args, 'pretrained_path', None):
        kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    if not timm.is_model(args.model.split('.')[0]) and not args.model.startswith('hf-hub:'):
        close = timm.list_models(f"*{args.model.split('_')[0]}*")[:10]
        raise ValueError(f"unknown model {args.model!r}; similar timm models: {close}")
    model = timm.create_model(
        args.model, pretrained=args.pretrained, num_classes=args.num_classes, drop_rate=getattr(args, 'drop', 0.),
        **kwargs)
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
        dataset, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
        is_training=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, distributed=getattr(args, 'distributed', False),
        crop_pct=data_config['crop_pct'], pin_memory=getattr(args, 'pin_mem', False), device=device,
        use_prefetcher=not getattr(args, 'no_prefetcher', False))


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
    arch = checkpoint.get('arch')
    if arch and arch != args.model:
        raise CheckpointError(f"{args.resume!r} holds a {arch!r} model, not --model {args.model!r}")
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
        raise CheckpointError(f"{args.resume!r} does not fit --model {args.model!r}: {str(e)[:300]}") from None
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
