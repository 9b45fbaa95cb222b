"""Run-time set-up shared by train.py and validate.py: device, model, AMP, learning rate, resume,
the evaluation model of a checkpoint and results files.

Thin wrappers over timm (init_distributed_device, create_model, create_loader) that turn
their failures into one clear message, the run's output folder, and resuming: which
checkpoint (`--resume auto`), each rank's replay cache, Mixup record and, from a recovery
checkpoint, its place inside the epoch.
"""
import argparse
import csv
import json
import logging
import os
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

import timm
from timm.layers import set_fast_norm
from timm.data import RealLabelsImagenet, create_loader
from timm.models import clean_state_dict, resolve_model_input_args, split_model_name_tag
from timm.task import TrainingTask
from timm.utils import init_distributed_device

from .args import ConfigError
from .checkpoint import (
    CLASSES, POSITION, SUMMARY_ROW, CheckpointError, WriteError, atomic_write_text, find_resume_checkpoint,
    load_checkpoint_file, load_weights_file, resume_position)
from ..data.factory import check_same_classes, dataset_num_classes
from ..hub.pretrained import ensure_cached
from .rundir import RunFolderLock, check_run_folder

_logger = logging.getLogger(__name__)

_RANK_STATES = 'task_state_ranks'
_MIXUP_STATE = 'replay_mixup'
_MIXUP_RANKS = 'replay_mixup_ranks'
_RECOVERY_RANKS = 'recovery_ranks'


class _ScriptFormatter(logging.Formatter):
    """timm's console format (INFO bare, others `LEVEL: message`), except that an error line of ours, which already
    starts with `error:`, prints as it is (not `ERROR: error: ...`)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno == logging.INFO or (record.levelno >= logging.ERROR and message.startswith('error:')):
            return message
        return f"{record.levelname}: {message}"


def setup_script_logging() -> None:
    """Console logging of train.py and validate.py, set up once per process (main() may run several times in one:
    tests, notebooks)."""
    if logging.root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(_ScriptFormatter())
    logging.root.addHandler(handler)
    logging.root.setLevel(logging.INFO)


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


def check_num_classes(args: argparse.Namespace, dataset: Dataset) -> None:
    """A ConfigError for a --num-classes that cannot train on `dataset` (below 1, or below its class count)."""
    declared = dataset_num_classes(dataset)
    if args.num_classes is None:
        return
    if args.num_classes < 1:
        raise ConfigError(f"--num-classes must be >= 1, got {args.num_classes} (0 would build a model without a "
                          "classifier); leave it out to take the data's class count")
    if declared is not None and args.num_classes < declared:
        raise ConfigError(f"--num-classes {args.num_classes} is fewer than the {declared} classes of the training "
                          f"data; leave it out or pass --num-classes {declared}")


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
        checkpoint = load_weights_file(args.initial_checkpoint)
        try:
            model.load_state_dict(clean_state_dict(checkpoint['state_dict']))
        except RuntimeError as e:
            raise CheckpointError(f"--initial-checkpoint {args.initial_checkpoint!r} does not fit --model "
                                  f"{args.model!r} with {args.num_classes} classes: {_one_line(e)}") from None
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
    trained_on = checkpoint.get(CLASSES) if checkpoint is not None else None
    if trained_on is not None:
        check_same_classes(trained_on, dataset, f"the {args.split!r} split",
                           f"evaluate on data with the class folders the checkpoint was trained on {trained_on}")
    num_classes = dataset_num_classes(dataset)
    if num_classes is not None and num_classes > model.num_classes:
        raise ValueError(
            f"the {args.split!r} split has {num_classes} classes but the model predicts {model.num_classes}; "
            "check the data and --num-classes")
    return model


def create_real_labels(path: str, dataset: Dataset, num_classes: int) -> RealLabelsImagenet:
    """timm's ImageNet-ReaL evaluator for --real-labels, given the evaluation dataset in loader order.

    real.json lists the reassessed labels of ILSVRC2012_val_00000001.JPEG, ... in order; every file of
    the dataset must be one of them, and the dataset must hold them all (timm's evaluator assumes it).
    It scores top-1 and top-min(5, num_classes), as the plain evaluation does.
    """
    if not hasattr(dataset, 'filenames'):
        raise ConfigError(f"--real-labels needs an ImageNet validation folder of ILSVRC2012_val_*.JPEG files; "
                          f"{type(dataset).__name__} has no file names")
    try:
        with open(path) as f:
            labels = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--real-labels {path!r} cannot be read as JSON: {e}") from None
    if not isinstance(labels, list):
        raise ConfigError(f"--real-labels {path!r} must hold a list (one list of labels per validation image)")
    filenames = dataset.filenames(basename=True)
    known = {f'ILSVRC2012_val_{i + 1:08d}.JPEG' for i in range(len(labels))}
    unknown = [name for name in filenames if name not in known]
    if unknown or len(filenames) != len(labels):
        strays = f", {len(unknown)} not among them (e.g. {unknown[0]!r})" if unknown else ''
        raise ConfigError(
            f"--real-labels {path!r} has labels for {len(labels)} images named ILSVRC2012_val_<n>.JPEG; the split "
            f"has {len(filenames)} files{strays}: evaluate the full, unrenamed ImageNet validation set")
    return RealLabelsImagenet(filenames, real_json=path, topk=(1, min(5, num_classes)))


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


def gather_rank_states(
        task: TrainingTask,
        mixup_fn,
        args: argparse.Namespace,
        recovery: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The per-process state a checkpoint needs, as extra checkpoint keys; collective under DDP.

    `replay_mixup` is this process's Mixup record; under DDP `task_state_ranks` and
    `replay_mixup_ranks` hold every rank's replay cache and record (not for a task whose
    `state_shared_across_ranks` is true: its `task_state` from rank 0 serves every rank); `recovery_ranks` every
    rank's `recovery` state (mid-epoch position) when given.
    """
    mixup = mixup_fn.state_dict() if hasattr(mixup_fn, 'state_dict') else None
    # a task whose state is the same on every rank (PS-KD's table) is saved once, from rank 0's `task_state`
    rank_state = None if getattr(task, 'state_shared_across_ranks', False) else task.get_task_state()
    state = _to_cpu(dict(task_state=rank_state, mixup=mixup, recovery=recovery))
    states = [state]
    if args.distributed:
        states = [None] * args.world_size
        dist.all_gather_object(states, state)
    extra: Dict[str, Any] = {}
    if mixup is not None:
        extra[_MIXUP_STATE] = state['mixup']
    if args.distributed and state['task_state']:
        extra[_RANK_STATES] = [s['task_state'] for s in states]
    if args.distributed and mixup is not None:
        extra[_MIXUP_RANKS] = [s['mixup'] for s in states]
    if recovery is not None:
        extra[_RECOVERY_RANKS] = [s['recovery'] for s in states]
    return extra


def _training_shape_change(saved: Any, args: argparse.Namespace) -> str:
    """What differs between the checkpoint's run and this one in what its self-distillation state depends on: the
    method, the batch per process, the number of processes ('' when nothing does, or the checkpoint does not say)."""
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved or {})
    if not saved:
        return ''
    method = lambda a: 'sdpgo' if a.get('sdpgo') else a.get('skd')  # noqa: E731
    changes = []
    before, now = method(saved) or 'cross-entropy', method(vars(args)) or 'cross-entropy'
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
    if _RANK_STATES in checkpoint and not change:
        task_state = _this_rank(checkpoint, _RANK_STATES, args, path)
    if change and task_state:
        _logger.warning(f"{path!r} was trained with {change}: its self-distillation state (replay cache, PS-KD "
                        "table, PWA statistics) does not fit this run and is dropped; the model, optimizer and "
                        "schedule resume as saved, and the first step trains without a teacher")
        task_state = None
    try:
        task.load_checkpoint_state(clean_state_dict(checkpoint['state_dict']), task_state)
    except RuntimeError as e:
        raise CheckpointError(f"{path!r} does not fit --model {args.model!r}: {_one_line(e)}") from None
    if task.has_ema():
        ema = checkpoint.get('state_dict_ema')
        if ema is None:  # timm builds its EMA after the resume; this one exists already and must not stay random
            _logger.warning(f"{path!r} has no EMA weights: --model-ema starts from the resumed model's weights")
            ema = checkpoint['state_dict']
        task.load_checkpoint_state(clean_state_dict(ema), None, ema=True)
    if optimizer is not None and 'optimizer' in checkpoint and not args.no_resume_opt:
        optimizer.load_state_dict(checkpoint['optimizer'])
    if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
        loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])
    mixup = None if change else _this_rank(checkpoint, _MIXUP_RANKS, args, path) if _MIXUP_RANKS in checkpoint else (
        checkpoint.get(_MIXUP_STATE))
    if mixup_fn is not None and mixup is not None and hasattr(mixup_fn, 'load_state_dict'):
        mixup_fn.load_state_dict(mixup)
    epoch, step = resume_position(checkpoint)
    point = ResumePoint(epoch, summary_row=checkpoint.get(SUMMARY_ROW))
    if POSITION in checkpoint:
        point.num_updates = int(checkpoint[POSITION]['num_updates'])
        point.recovery = _this_rank(checkpoint, _RECOVERY_RANKS, args, path)
    _logger.info(f"Resumed {path!r} at epoch {epoch}" + (f", after step {step}" if step else ''))
    return point


def create_output_dir(folder: str, args_text: str, resume_in_place: bool, cleanup: ExitStack) -> str:
    """Make and lock the run's output folder, check that it holds no other run, write args.yaml.

    The lock is held until `cleanup` closes (see `rundir`). A folder that cannot be written, one in use by
    another run, or one holding a run that this start is not resuming is a ConfigError, and nothing is written.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        cleanup.enter_context(RunFolderLock(folder))
    except OSError as e:
        raise ConfigError(
            f"cannot write to the output folder {folder!r}: {e.strerror}; choose another --output") from None
    check_run_folder(folder, resume_in_place)
    try:
        atomic_write_text(os.path.join(folder, 'args.yaml'), args_text)
    except WriteError as e:
        raise ConfigError(f"cannot write to the output folder {folder!r}: {e}; choose another --output") from None
    return folder
