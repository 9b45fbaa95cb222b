"""Run-time set-up shared by train.py and validate.py: logging, device, model, AMP, learning rate,
the evaluation loader, the per-rank state a checkpoint needs, and the run's output folder.

Thin wrappers over timm (init_distributed_device, create_model, create_loader) that turn their
failures into one clear message. Resuming is `runner.resume`; validate.py's own helpers are
`runner.evaluation`.
"""
import argparse
import importlib
import logging
import warnings
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

import timm
from timm.data import create_loader
from timm.layers import convert_splitbn_model, set_fast_norm
from timm.models import clean_state_dict, parse_model_name, resolve_model_input_args
from timm.utils import init_distributed_device, set_jit_fuser

from ..data.factory import class_difference, data_signature, dataset_num_classes
from ..pretrained import check_model_name, ensure_cached
from ..taps import layers_without_gradient
from .checkpoint import load_weights_file, load_weights_into
from .batches import policy_batch_size
from .errors import CheckpointError, ConfigError, first_line, one_line
from .naflex import create_naflex_eval_loader, model_patch_size

_logger = logging.getLogger(__name__)


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
    # torch warns of more loader workers than CPUs from two places (each loader's creation and each pass over it):
    # once per process says it
    warnings.filterwarnings('once', message='This DataLoader will create', category=UserWarning)
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
    """timm's distributed/device init after importing --device-modules; the default device is CUDA when present,
    else the CPU."""
    import_device_modules(getattr(args, 'device_modules', None))
    args.device = default_device(args.device)
    if args.device == 'cpu' and args.dist_backend is None:
        args.dist_backend = 'gloo'
    return init_distributed_device(args)


def import_device_modules(modules: Optional[List[str]]) -> None:
    """Import timm's --device-modules (packages that register a device backend, e.g. torch_npu) before the device
    is set up; one that does not import is a ConfigError."""
    for module in modules or ():
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"--device-modules {module}: cannot import it ({e}); install it or drop it") from None


def check_same_data_across_ranks(args: argparse.Namespace, splits: Dict[str, Optional[Dataset]]) -> None:
    """ConfigError naming the first rank whose data differ from rank 0's in size, classes or files, for each split
    given ({'the training split': dataset, ...}); collective under DDP (every rank raises the same error), nothing
    to check in one process. Each rank shards the data by index: different data would train silently wrong."""
    if not args.distributed:
        return
    mine = {what: data_signature(dataset) for what, dataset in splits.items() if dataset is not None}
    signatures: List[Any] = [None] * args.world_size
    dist.all_gather_object(signatures, mine)
    fix = "every process must read the same data set (the same files on every node, or one shared --data-dir)"
    for rank, theirs in enumerate(signatures[1:], 1):
        for what, ours in signatures[0].items():
            other = theirs.get(what, {})
            if other.get('size') != ours['size']:
                problem = f"{what} holds {other.get('size')} samples on rank {rank}, {ours['size']} on rank 0"
            elif other.get('classes') != ours['classes']:
                detail = class_difference(ours['classes'] or [], other.get('classes') or [])
                problem = f"{what} has other classes on rank {rank} than on rank 0 (rank {rank} {detail})"
            elif other.get('files') != ours['files']:
                problem = (f"{what} holds other files on rank {rank} than on rank 0 (the same number and classes, "
                           "other names or labels)")
            else:
                continue
            raise ConfigError(f"the processes read different data: {problem}; {fix}")


def resolve_model_dtype(args: argparse.Namespace) -> Optional[torch.dtype]:
    """timm's --model-dtype as a torch dtype (None: float32, the model's own)."""
    return getattr(torch, args.model_dtype) if args.model_dtype else None


def _warn_drop_connect(args: argparse.Namespace) -> None:
    """timm's train.py still takes the deprecated --drop-connect but passes it on no more; so here, said aloud (the
    same command line trains the same model as timm's)."""
    if getattr(args, 'drop_connect', None) is not None:
        _logger.warning(f"--drop-connect {args.drop_connect} is deprecated and ignored, as in timm's train.py: use "
                        "--drop-path")


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
    """timm.create_model from the model flags (BatchNorm split per augmentation split with --split-bn); an unknown
    name lists close matches. Pretrained weights come as timm loads them (a new head where the class count differs,
    said in one line); --initial-checkpoint loads its weights as they are."""
    if args.num_classes is None and dataset is not None:
        args.num_classes = dataset_num_classes(dataset)
    _warn_drop_connect(args)
    kwargs: Dict[str, Any] = dict(args.model_kwargs or {})
    # training-only options are absent from validate.py's args
    for key, value in (('num_classes', args.num_classes), ('global_pool', args.gp),
                       ('drop_path_rate', getattr(args, 'drop_path', None)),
                       ('drop_block_rate', getattr(args, 'drop_block', None)),
                       ('bn_momentum', getattr(args, 'bn_momentum', None)), ('bn_eps', getattr(args, 'bn_eps', None))):
        if value is not None:
            kwargs[key] = value
    pretrained_path = getattr(args, 'pretrained_path', None)
    check_model_name(args.model, 'model')
    if pretrained_path:
        check_pretrained_path(args)
        # as timm's train.py: the file replaces the weights' source, and its head is always adapted
        kwargs['pretrained_cfg_overlay'] = dict(file=pretrained_path, num_classes=-1)
    elif args.pretrained:
        try:
            ensure_cached(args.model)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
    if getattr(args, 'fast_norm', False):
        set_fast_norm()
    if getattr(args, 'fuser', ''):
        set_jit_fuser(args.fuser)
    # timm's resolver turns --input-size/--img-size/--in-chans into model arguments only where the model takes
    # them (fixed-size models such as ViT get img_size; a ResNet does not)
    try:
        model = timm.create_model(
            **resolve_model_input_args(args.model, vars(args), **kwargs), pretrained=args.pretrained,
            drop_rate=getattr(args, 'drop', 0.), scriptable=getattr(args, 'torchscript', False) or None)
    except TypeError as e:  # a --model-kwargs key the model's constructor does not take
        if not args.model_kwargs or 'keyword argument' not in str(e):
            raise
        raise ConfigError(f"--model-kwargs {args.model_kwargs}: {args.model!r} does not take it ({first_line(e)}); "
                          "use the argument names of the model's constructor") from None
    except RuntimeError as e:
        if not (args.pretrained and str(e).startswith('Error(s) in loading state_dict')):
            raise
        source = (f"--pretrained-path {pretrained_path!r}" if pretrained_path
                  else f"the pretrained weights of {args.model!r}")
        raise ConfigError(f"{source} do not fit --model {args.model!r}: {one_line(e)}") from None
    if args.pretrained and getattr(args, 'rank', 0) == 0:
        log_new_head(model, pretrained_path)
    if getattr(args, 'head_init_scale', None) is not None:
        with torch.no_grad():
            model.get_classifier().weight.mul_(args.head_init_scale)
            model.get_classifier().bias.mul_(args.head_init_scale)
    if getattr(args, 'head_init_bias', None) is not None:
        torch.nn.init.constant_(model.get_classifier().bias, args.head_init_bias)
    if getattr(args, 'initial_checkpoint', ''):
        load_initial_checkpoint(model, args)
    if getattr(args, 'grad_checkpointing', False):
        model.set_grad_checkpointing(enable=True)
    if getattr(args, 'split_bn', False):  # after the weights are in: the aux layers start from the main layer's
        model = convert_splitbn_model(model, max(args.aug_splits, 2))
    return model


def check_pretrained_path(args: argparse.Namespace) -> None:
    """One-line errors for a --pretrained-path timm would ignore (without --pretrained; with an hf-hub: or
    local-dir: model, whose weights take precedence over the file) or could not read (read here as data only; timm
    reads it again)."""
    path = args.pretrained_path
    if not args.pretrained:
        raise ConfigError(f"--pretrained-path {path!r} is loaded only with --pretrained (timm's meaning): add "
                          "--pretrained, or drop --pretrained-path to train from scratch")
    source = parse_model_name(args.model)[0]
    if source:  # hf-hub: or local-dir:
        raise ConfigError(f"--pretrained-path {path!r} with --model {args.model!r}: timm would load the {source}: "
                          "weights and ignore the file; pass the architecture's name as --model (e.g. resnet50)")
    try:
        load_weights_file(path)
    except CheckpointError as e:
        raise CheckpointError(f"--pretrained-path: {e}") from None


def classifier_names(model: torch.nn.Module) -> Tuple[str, ...]:
    """The module names of the model's classifier(s), as its pretrained config names them (timm resets these)."""
    names = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or ()
    return (names,) if isinstance(names, str) else tuple(names)


def log_new_head(model: torch.nn.Module, pretrained_path: Optional[str]) -> None:
    """Say in one line when timm gave the pretrained model a new, randomly initialised classifier: always for a
    --pretrained-path file (timm adapts its head), else when the weights have another class count."""
    heads = ', '.join(classifier_names(model))
    weights_classes = model.pretrained_cfg.get('num_classes')
    if not heads or (not pretrained_path and weights_classes == model.num_classes):
        return
    source = (f"--pretrained-path weights ({pretrained_path!r})" if pretrained_path
              else f"pretrained weights of {weights_classes} classes")
    _logger.info(f"{source}: new {model.num_classes}-class head ({heads}) initialised")


def load_initial_checkpoint(model: torch.nn.Module, args: argparse.Namespace) -> None:
    """--initial-checkpoint: every weight loaded as it is (timm's strict load). A checkpoint whose head has another
    class count is refused in one line naming --pretrained-path, timm's way to start from weights with a new head."""
    path = args.initial_checkpoint
    checkpoint = load_weights_file(path)
    state_dict = clean_state_dict(checkpoint['state_dict'])
    for name in classifier_names(model):
        weight = state_dict.get(f'{name}.weight')
        if weight is not None and weight.ndim >= 1 and weight.shape[0] != model.num_classes:
            raise CheckpointError(
                f"--initial-checkpoint {path!r} has a {weight.shape[0]}-class head ({name}) and the model "
                f"{model.num_classes} classes: --initial-checkpoint loads every weight as it is; to start from its "
                f"backbone with a new head pass --pretrained --pretrained-path {path}")
    load_weights_into(model, checkpoint, path, f"--model {args.model!r} with {args.num_classes} classes")


def check_taps_get_gradients(args: argparse.Namespace, task: Any, model: torch.nn.Module,
                             input_size: Tuple[int, ...]) -> None:
    """A ConfigError, before training, when a layer the task taps for PWA (--sdpgo-layers) would get no gradient
    because it and every layer before it are frozen (--layer-decay-no-opt-scale): PWA would never see one."""
    layers = list(getattr(task, 'tap_layers', ()))
    dead = layers_without_gradient(model, layers, input_size)
    if not dead:
        return
    freezing = (f"--layer-decay-no-opt-scale {args.layer_decay_no_opt_scale}"
                if getattr(args, 'layer_decay_no_opt_scale', None) else "frozen parameters")
    taps = ' '.join(layers) if getattr(args, 'sdpgo_layers', None) else f"(default: {' '.join(layers)})"
    raise ConfigError(f"--sdpgo-layers {taps}: no gradient reaches {', '.join(dead)}, frozen with every layer before "
                      f"it by {freezing}, so PWA would see none; tap later layers with --sdpgo-layers, or freeze fewer "
                      "layers (a lower --layer-decay-no-opt-scale)")


def check_cpu_bfloat16_convolutions(args: argparse.Namespace, model: torch.nn.Module, device: torch.device,
                                    input_size: Tuple[int, ...]) -> None:
    """A ConfigError for bfloat16 training on the CPU (--model-dtype bfloat16, or --amp --amp-dtype bfloat16) of a
    model with a convolution whose stride exceeds the width of its input and that pads it.

    oneDNN's bfloat16 weight gradient for such a convolution (its AVX-512 and AMX kernels, torch 2.14's oneDNN
    3.12) reads memory it never wrote: NaN, or finite gradients that are silently wrong, depending on what ran
    before in the process. Found by one dry forward of a zero batch, in eval mode and without drawing from the
    RNGs, at each training input size; refused on every CPU, so that a command trains the same everywhere.
    """
    bfloat16 = args.model_dtype == 'bfloat16' or (args.amp and args.amp_dtype == 'bfloat16')
    if device.type != 'cpu' or not bfloat16 or getattr(args, 'naflex_loader', False):
        return
    sizes = [(input_size[0], s, s) for s in args.train_img_sizes] if args.train_img_sizes else [input_size]
    found = []

    def check(name: str, module: torch.nn.Module, inputs: Tuple[torch.Tensor, ...]) -> None:
        width, stride, padding = inputs[0].shape[-1], module.stride[-1], module.padding
        if not isinstance(padding, str) and padding[-1] > 0 and stride > width:
            found.append(f"{name} (stride {stride}, input {width} wide)")

    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    hooks = [m.register_forward_pre_hook(partial(check, n)) for n, m in model.named_modules() if isinstance(m, convs)]
    training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), torch.autocast('cpu', torch.bfloat16,
                                                                                 enabled=bool(args.amp)):
            model.eval()
            for size in sizes:
                found.clear()
                model(torch.zeros(1, *size, dtype=next(model.parameters()).dtype))
                if found:
                    break
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    if found:
        raise ConfigError(
            f"bfloat16 training on the CPU: {found[0]} at input size {size[-1]} is a padded convolution with a stride "
            f"wider than its input, whose bfloat16 weight gradient oneDNN computes from memory it never wrote (NaN "
            f"or silently wrong); use a larger --input-size, float32 (no --model-dtype bfloat16 / --amp-dtype "
            f"bfloat16), or a GPU")


def resolve_lr(args: argparse.Namespace, log: bool = False) -> None:
    """--lr if given, else --lr-base scaled by the global batch as timm does (linear, sqrt for adaptive opts); with
    scheduled batch sizes the batch is their policy average."""
    if args.lr:  # timm computes it for an unset or zero --lr
        return
    global_batch = policy_batch_size(args) * args.world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    if not args.lr_base_scale:
        args.lr_base_scale = 'sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear'
    args.lr = args.lr_base * (ratio ** 0.5 if args.lr_base_scale == 'sqrt' else ratio)
    if log:
        _logger.info(f"Learning rate ({args.lr}) calculated from base learning rate ({args.lr_base}) and effective "
                     f"global batch size ({global_batch:g}) with {args.lr_base_scale} scaling.")


def create_eval_loader(args: argparse.Namespace, dataset: Dataset, data_config: dict, device: torch.device,
                       model: Optional[torch.nn.Module] = None, **kwargs):
    """timm's evaluation loader (center crop, sharded in order under DDP); `kwargs` go to timm's create_loader.
    With --naflex-loader timm's NaFlex one at `model`'s patch size."""
    if getattr(args, 'naflex_loader', False):
        return create_naflex_eval_loader(args, dataset, data_config, device, model_patch_size(model, args.model))
    return create_loader(
        dataset, input_size=data_config['input_size'],
        batch_size=getattr(args, 'validation_batch_size', None) or args.batch_size,
        is_training=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, distributed=getattr(args, 'distributed', False),
        crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'),
        crop_border_pixels=getattr(args, 'crop_border_pixels', None), pin_memory=getattr(args, 'pin_mem', False),
        device=device, use_prefetcher=not getattr(args, 'no_prefetcher', False),
        img_dtype=getattr(torch, args.model_dtype or 'float32'), **kwargs)


def create_autocast(args: argparse.Namespace, device: torch.device) -> Tuple[Callable, Optional[torch.dtype]]:
    """timm's AMP set-up: an autocast context factory (nullcontext without --amp) and the AMP dtype (or None)."""
    if not args.amp:
        return nullcontext, None
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    return partial(torch.autocast, device_type=device.type, dtype=amp_dtype), amp_dtype


