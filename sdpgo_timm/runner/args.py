"""Command lines of train.py (timm's train.py flags, same names, meanings, defaults, plus SDPGO)
and validate.py (timm's validate.py flags); the flags both have are defined once, here.

train.py defaults come, in increasing priority, from: this parser, the benchmark recipe
(`hparams/<benchmark>/<model>.yaml` or `default.yaml`) when the positional argument is a
benchmark name, the `-c/--config` YAML file, and the command line.
validate.py takes the data config and head options the command line leaves unset from the
checkpoint's training args, else from the benchmark recipe (`resolve_eval_args`).
Each training method's own flags are defined in its module (`sdpgo_timm.methods`); `parse_args` resolves the
method they choose into `args.method`.
"""
import argparse
import math
import os
from typing import Any, List, Optional, Tuple

import yaml

from timm.utils import ParseKwargs

from ..data.benchmarks import BENCHMARKS, recipe_path
from ..data.noise import NOISE_MODES
from ..methods import METHODS, get_method, resolve_method
from .errors import ConfigError

# timm.utils.set_jit_fuser's fusers ('': torch's default; legacy, nvf: aliases) and the dtypes timm's
# --model-dtype takes
JIT_FUSERS = ('', 'te', 'old', 'legacy', 'nvfuser', 'nvf')
MODEL_DTYPES = ('float32', 'float16', 'bfloat16')


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (unknown option, a value of the wrong type) are one-line ConfigErrors."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see --help)")


def _add_data_args(parser: argparse.ArgumentParser, training: bool = True) -> None:
    parser.add_argument('data', nargs='?', metavar='DIR_OR_BENCHMARK', default=None,
                        help=f'data directory, or a benchmark name: {", ".join(BENCHMARKS)}')
    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('--data-dir', metavar='DIR', default=None, help='path to dataset (root dir)')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='dataset type + name ("<type>/<name>": torch/, hfds/, wds/, ...; ImageFolder if empty)')
    if training:
        group.add_argument('--train-split', metavar='NAME', default='train',
                           help='dataset train split (default: train)')
        group.add_argument('--val-split', metavar='NAME', default='validation',
                           help='dataset validation split (default: validation)')
        group.add_argument('--train-num-samples', default=None, type=int, metavar='N',
                           help='manually specify num samples in train split, for IterableDatasets.')
        group.add_argument('--val-num-samples', default=None, type=int, metavar='N',
                           help='manually specify num samples in validation split, for IterableDatasets.')
    else:
        group.add_argument('--split', metavar='NAME', default='validation',
                           help='dataset split to evaluate (default: validation)')
        group.add_argument('--num-samples', dest='val_num_samples', default=None, type=int, metavar='N',
                           help='manually specify num samples in the split, for IterableDatasets.')
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='allow download of dataset for torch/ and tfds/ datasets that support it.')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME', help='path to class to idx mapping file')
    group.add_argument('--input-img-mode', default=None, type=str, help='dataset image conversion mode for input images.')
    group.add_argument('--input-key', default=None, type=str, help='dataset key for input images (hfds/wds datasets)')
    group.add_argument('--target-key', default=None, type=str, help='dataset key for the target (hfds/wds datasets)')
    group.add_argument('--dataset-trust-remote-code', action='store_true', default=False,
                       help='allow a Hugging Face dataset to run its own loading code')
    if training:
        group.add_argument('--label-noise', default=0.0, type=float, metavar='ETA',
                           help='noise on the training labels, share ETA in [0, 1) (in-memory benchmarks: digits, '
                                'fashion-mnist; seeded by --seed)')
        group.add_argument('--label-noise-mode', default='sym', choices=NOISE_MODES,
                           help='label noise: sym (uniform over other classes) or asym (class flips: digits c -> c+1; '
                                'fashion-mnist T-shirt<->Shirt, Pullover<->Coat, Sandal<->Sneaker)')
        group.add_argument('--train-fraction', default=1.0, type=float, metavar='F',
                           help='train on a fixed, class-stratified share F in (0, 1] of the training split '
                                '(in-memory benchmarks)')
        group.add_argument('--pad-crop', default=0, type=int, metavar='PIXELS',
                           help='zero-pad training images by PIXELS and take a random crop of their size, before '
                                "timm's transform (the CIFAR / Fashion-MNIST augmentation; in-memory benchmarks)")


def _add_model_args(parser: argparse.ArgumentParser, training: bool = True) -> None:
    group = parser.add_argument_group('Model parameters')
    if training:
        group.add_argument('--model', default='resnet50', type=str, metavar='MODEL', help='name of model to train')
    else:
        group.add_argument('--model', '-m', default=None, type=str, metavar='MODEL',
                           help="model architecture (default: the checkpoint's)")
    group.add_argument('--pretrained', action='store_true', default=False, help='start with pretrained weights')
    if training:
        group.add_argument('--pretrained-path', default=None, type=str,
                           help='with --pretrained: load these weights instead of the hub default (a .safetensors '
                                'or .pth file, a training checkpoint: its EMA weights if it has them); the head is '
                                'always new (timm adapts it to --num-classes)')
        group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                           help='load these weights into the model as they are, after initialisation (a training '
                                'checkpoint, a saved state dict or .safetensors); a head of another class count is '
                                'refused: use --pretrained --pretrained-path PATH to fine-tune it with a new head')
        group.add_argument('--resume', default='', type=str, metavar='PATH',
                           help='resume model, optimizer and SDPGO state from checkpoint; "auto": the newest '
                                'checkpoint of --output/--experiment that loads (none: start from the beginning)')
        group.add_argument('--no-resume-opt', action='store_true', default=False,
                           help='prevent resume of optimizer state when resuming model')
    else:
        group.add_argument('--checkpoint', default='', type=str, metavar='PATH',
                           help='training checkpoint (or weights: a saved state dict, .safetensors) to evaluate, or '
                                'a folder: every *.pth.tar in it')
        group.add_argument('--use-ema', action='store_true', default=False,
                           help="evaluate the checkpoint's EMA weights (state_dict_ema)")
    group.add_argument('--num-classes', type=int, default=None, metavar='N', help='number of label classes')
    group.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool type; model default if None')
    group.add_argument('--img-size', type=int, default=None, metavar='N', help='image size (model default if None)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N', help='image input channels')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N N N',
                       help='input dimensions (d h w, e.g. --input-size 3 224 224), model default if empty')
    if not training:
        group.add_argument('--use-train-size', action='store_true', default=False,
                           help="use the model's train input size even when it has a test input size")
    group.add_argument('--crop-pct', default=None, type=float, metavar='N', help='validation center crop percent')
    if not training:
        group.add_argument('--crop-mode', default=None, type=str, metavar='N',
                           help='evaluation crop: center, squash or border (default: the model\'s, else center)')
        group.add_argument('--crop-border-pixels', type=int, default=None, help='crop this many pixels off each border')
        group.add_argument('--test-pool', action='store_true', default=False,
                           help="enable test time pool (timm's apply_test_time_pool: a model whose default config "
                                "has a smaller input size than the evaluation's pools its features as at that size; "
                                "crop_pct becomes 1.0)")
        group.add_argument('--reparam', default=False, action='store_true',
                           help="reparameterize the model for inference (timm's reparameterize_model: fuses "
                                "RepVGG/MobileOne-style branches) after loading its weights")
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='override dataset mean')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='override dataset std')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME', help='resize interpolation')
    if training:
        group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N',
                           help='model batch size per process (with SDPGO: replay half + fresh half)')
        group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                           help='validation batch size override')
    else:
        group.add_argument('-b', '--batch-size', type=int, default=256, metavar='N', help='batch size (default: 256)')
        group.add_argument('--num-gpu', type=int, default=1, metavar='N',
                           help='number of GPUs to use (> 1: torch.nn.DataParallel, CUDA only)')
    _add_model_run_args(group, training)


class _KeyValues(ParseKwargs):
    """timm's ParseKwargs (KEY=VALUE, values as Python literals, else strings) with argparse's one-line error for an
    item without '=' (timm's raises a bare ValueError)."""

    def __call__(self, parser, namespace, values, option_string=None):
        malformed = [value for value in values if value and '=' not in value]
        if malformed:
            raise argparse.ArgumentError(self, f"expected KEY=VALUE items, got {malformed[0]!r}")
        super().__call__(parser, namespace, values, option_string)


def _add_model_run_args(group: argparse._ArgumentGroup, training: bool) -> None:
    """The model options of how it runs (layout, compilation, dtype, gradients), in the model group."""
    group.add_argument('--channels-last', action='store_true', default=False, help='use channels_last memory layout')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=_KeyValues,
                       help='extra model kwargs, key=value')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                       help='enable compilation w/ specified backend (default: inductor).')
    group.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode (default: None).')
    group.add_argument('--torchscript', action='store_true', default=False,
                       help='torch.jit.script the full model (built scriptable); not with --torchcompile (train.py: nor '
                            '--sync-bn; validate.py: nor --aot-autograd)')
    group.add_argument('--fuser', default='', type=str, choices=JIT_FUSERS,
                       help="select the jit fuser (timm's set_jit_fuser): one of ('', 'te', 'old', 'nvfuser'); it "
                            "affects --torchscript models (torch >= 2.2 ignores nvfuser, with a warning)")
    group.add_argument('--model-dtype', default=None, type=str, choices=MODEL_DTYPES,
                       help='model and input dtype override (non-AMP; with --amp only float32) (default: float32)')
    group.add_argument('--fast-norm', default=False, action='store_true', help='enable experimental fast-norm')
    if not training:
        group.add_argument('--aot-autograd', default=False, action='store_true',
                           help="enable AOT Autograd support (functorch's memory_efficient_fusion, traced once per "
                                "input shape); excludes --torchscript and --torchcompile")
        return
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='number of steps to accumulate gradients')
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='enable gradient checkpointing through model blocks/stages')
    group.add_argument('--head-init-scale', default=None, type=float, help='head initialization scale')
    group.add_argument('--head-init-bias', default=None, type=float, help='head initialization bias value')
    group.add_argument('--device-modules', default=None, type=str, nargs='+',
                       help='Python modules to import before the device is set up (device backend modules)')


def _add_optim_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='optimizer (default: "sgd")')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum (default: 0.9)')
    group.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay (default: 2e-5)')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='clip gradient norm')
    group.add_argument('--clip-mode', type=str, default='norm', help='gradient clipping mode: norm, value, agc')
    group.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay')
    group.add_argument('--layer-decay-min-scale', type=float, default=0,
                       help='layer-wise lr decay minimum scale clamp (default: 0)')
    group.add_argument('--layer-decay-no-opt-scale', type=float, default=None,
                       help='layer-wise lr decay scale below which parameters are not optimized (default: None)')
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=_KeyValues,
                       help='extra optimizer kwargs, key=value (saved as opt_kwargs, as timm does)')

    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER', help='LR scheduler')
    group.add_argument('--sched-on-updates', action='store_true', default=False,
                       help='apply the LR scheduler step on update instead of epoch end.')
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate, overrides lr-base if set (default: None)')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                       help='base learning rate: lr = lr_base * global_batch_size / lr_base_size')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV', help='base learning rate batch size')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                       help='base learning rate vs batch_size scaling ("linear", "sqrt", based on opt if empty)')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                       help='learning rate noise on/off epoch percentages')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT', help='learning rate noise limit')
    group.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV', help='learning rate noise std-dev')
    group.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT', help='LR cycle len multiplier')
    group.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT', help='LR cycle decay')
    group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N', help='LR cycle limit')
    group.add_argument('--lr-k-decay', type=float, default=1.0, help='LR k-decay for cosine/poly')
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='warmup learning rate')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR', help='lower lr bound for cyclic schedulers')
    group.add_argument('--epochs', type=int, default=300, metavar='N', help='number of epochs to train')
    group.add_argument('--epoch-repeats', type=float, default=0., metavar='N',
                       help='epoch repeat multiplier (number of times to repeat dataset epoch per train epoch)')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N', help='manual epoch number')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='list of decay epoch indices for multistep lr')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval to decay LR')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N', help='epochs to warmup LR')
    group.add_argument('--warmup-prefix', action='store_true', default=False,
                       help='exclude warmup period from decay schedule.')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N', help='epochs to cooldown LR at min_lr')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='patience for Plateau LR')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='LR decay rate')


def _add_aug_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False, help='disable all training augmentation')
    group.add_argument('--train-crop-mode', type=str, default=None, help='crop-mode in train')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                       help='random resize scale (default: 0.08 1.0)')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='random resize aspect ratio (default: 0.75 1.33)')
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip training aug probability')
    group.add_argument('--vflip', type=float, default=0., help='vertical flip training aug probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='color jitter factor')
    group.add_argument('--color-jitter-prob', type=float, default=None, metavar='PCT',
                       help='probability of applying any color jitter.')
    group.add_argument('--grayscale-prob', type=float, default=None, metavar='PCT',
                       help='probability of applying random grayscale conversion.')
    group.add_argument('--gaussian-blur-prob', type=float, default=None, metavar='PCT',
                       help='probability of applying gaussian blur.')
    group.add_argument('--aa', type=str, default=None, metavar='NAME', help='AutoAugment policy, e.g. rand-m9-mstd0.5')
    group.add_argument('--aug-repeats', type=float, default=0,
                       help='number of augmentation repetitions (distributed training only)')
    group.add_argument('--aug-splits', type=int, default=0,
                       help='number of augmentation splits (AugMix: each image as a clean and N-1 augmented '
                            'copies, batch rows split-major; default: 0, valid: 0 or >= 2)')
    group.add_argument('--jsd-loss', action='store_true', default=False,
                       help='Jensen-Shannon divergence + CE loss (timm\'s JsdCrossEntropy); use with --aug-splits')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erase prob')
    group.add_argument('--remode', type=str, default='pixel', help='random erase mode (default: "pixel")')
    group.add_argument('--recount', type=int, default=1, help='random erase count (default: 1)')
    group.add_argument('--resplit', action='store_true', default=False,
                       help='do not random erase the first (clean) augmentation split (the first half of each '
                            'batch without --aug-splits; needs the prefetcher)')
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, mixup enabled if > 0.')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, cutmix enabled if > 0.')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                       help='cutmix min/max ratio, overrides alpha and enables cutmix if set')
    group.add_argument('--mixup-prob', type=float, default=1.0, help='probability of performing mixup or cutmix')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='probability of switching to cutmix when both mixup and cutmix enabled')
    group.add_argument('--mixup-mode', type=str, default='batch', help='mixup/cutmix params per "batch", "pair", "elem"')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N',
                       help='turn off mixup after this epoch, disabled if 0')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: 0.1)')
    group.add_argument('--bce-loss', action='store_true', default=False,
                       help="timm's BCE loss with Mixup/CutMix or smoothing (with --sdpgo/--skd: each sample's task "
                            "loss, summed over classes as with --bce-sum)")
    group.add_argument('--bce-sum', action='store_true', default=False, help='sum over classes when using BCE loss')
    group.add_argument('--bce-target-thresh', type=float, default=None,
                       help='threshold for binarizing softened BCE targets (default: None, disabled)')
    group.add_argument('--bce-pos-weight', type=float, default=None, help='positive weighting for BCE loss')
    group.add_argument('--train-interpolation', type=str, default='random', help='training interpolation')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate')
    group.add_argument('--drop-connect', type=float, default=None, metavar='PCT',
                       help='drop connect rate, DEPRECATED and ignored (as in timm\'s train.py): use --drop-path')
    group.add_argument('--drop-block', type=float, default=None, metavar='PCT', help='drop block rate')
    group.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum override')
    group.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon override')
    group.add_argument('--sync-bn', action='store_true', help='enable synchronized BatchNorm.')
    group.add_argument('--split-bn', action='store_true', default=False,
                       help='separate BatchNorm layers per augmentation split (timm\'s convert_splitbn_model; needs '
                            '--aug-splits or --resplit)')
    group.add_argument('--dist-bn', type=str, default='reduce',
                       help='distribute BatchNorm stats between nodes after each epoch ("broadcast", "reduce", or "")')
    group.add_argument('--model-ema', action='store_true', default=False, help='track an EMA of model weights')
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False, help='keep the EMA on the CPU')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='decay factor for model weights EMA')
    group.add_argument('--model-ema-warmup', action='store_true', help='enable warmup for model EMA decay.')


def _add_naflex_args(parser: argparse.ArgumentParser, training: bool = True) -> None:
    group = parser.add_argument_group('NaFlex loader parameters')
    group.add_argument('--naflex-loader', action='store_true', default=False,
                       help='use timm\'s NaFlex loader: aspect-preserving patch sequences (in training of variable '
                            'sequence length and batch size); needs a NaFlex model, e.g. naflexvit_*')
    group.add_argument('--naflex-max-seq-len', type=int, default=576, metavar='N',
                       help='fixed maximum sequence length (patches per image) of the NaFlex loader for evaluation '
                            '(default: 576)')
    if not training:
        return
    group.add_argument('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024],
                       help='sequence lengths (patches per image) the NaFlex training loader draws from')
    group.add_argument('--naflex-patch-sizes', type=int, nargs='+', default=None,
                       help='patch sizes for variable patch size training (e.g. 8 12 16 24 32; default: the model\'s); '
                            'the model must take them (naflexvit: --model-kwargs enable_patch_interpolator=True)')
    group.add_argument('--naflex-patch-size-probs', type=float, nargs='+', default=None,
                       help='probability of each --naflex-patch-sizes entry (uniform if not given)')
    group.add_argument('--naflex-loss-scale', default='linear', type=str, choices=('none', 'sqrt', 'linear'),
                       help='scale each batch\'s loss (gradient) by its batch size relative to --batch-size')
    group.add_argument('--naflex-patchify-channels-first', action='store_true', default=False,
                       help='emit NaFlex patches in C-P-P (channels-first) flat layout instead of P-P-C, for models '
                            'that take HF/Gemma4-style patches')


def _add_method_args(parser: argparse.ArgumentParser) -> None:
    """The method selectors (--sdpgo, --skd NAME; --kd-model-name is the teacher method's flag), then each
    method's own flags (sdpgo_timm.methods)."""
    group = parser.add_argument_group('Self-distillation (SDPGO) parameters')
    group.add_argument('--sdpgo', action='store_true', default=False, help='train with SDPGO self-distillation')
    skd = [m for m in METHODS.values() if m.self_distillation]
    group.add_argument('--skd', type=str, default=None, choices=[m.name for m in skd],
                       help='self-distillation method: ' + ', '.join(f'{m.name} ({m.summary})' for m in skd))
    for method in METHODS.values():
        if method.add_args is not None:
            method.add_args(parser)


def _add_misc_args(parser: argparse.ArgumentParser, training: bool = True) -> None:
    group = parser.add_argument_group('Miscellaneous parameters')
    if training:
        group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
        group.add_argument('--worker-seeding', type=str, default='all', help='worker seed mode (default: all)')
        group.add_argument('--log-interval', type=int, default=50, metavar='N', help='batches between status logs')
        group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                           help='number of checkpoints to keep')
        group.add_argument('--val-interval', type=int, default=1, metavar='N',
                           help='epochs between evaluation and checkpointing (the last epoch always has both)')
        group.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                           help='save a recovery checkpoint every N optimizer steps, to resume mid-epoch (0: off)')
        group.add_argument('--local_rank', default=0, type=int,
                           help='ignored: torchrun sets LOCAL_RANK (accepted for torch.distributed.launch lines)')
        group.add_argument('--synchronize-step', action='store_true', default=False,
                           help='synchronize the device after each optimizer step (timing, debugging)')
        group.add_argument('--save-images', action='store_true', default=False,
                           help='save images of input batches every log interval for debugging')
        group.add_argument('--tta', type=int, default=0, metavar='N',
                           help='test/inference time augmentation (oversampling) factor: validation averages the '
                                'outputs of each N consecutive images. 0=None (default: 0)')
        group.add_argument('--use-multi-epochs-loader', action='store_true', default=False,
                           help='use the multi-epochs-loader to save time at the beginning of every epoch (workers '
                                'and sample order carry over epochs: no mid-epoch resume)')
    else:
        group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
        group.add_argument('--log-freq', type=int, default=10, metavar='N', help='batches between status logs')
        group.add_argument('--results-file', default='', type=str, metavar='FILENAME',
                           help='write the results to this .csv or .json file')
        group.add_argument('--results-format', default=None, type=str, choices=RESULTS_FORMATS,
                           help='format of --results-file, csv or json (default: the file name\'s extension)')
        group.add_argument('--real-labels', default='', type=str, metavar='FILENAME',
                           help='ImageNet-ReaL labels JSON (real.json): top-1/top-5 against the reassessed labels')
        group.add_argument('--valid-labels', default='', type=str, metavar='FILENAME',
                           help='valid label indices txt file (one class index of the model a line) for validation '
                                'of a partial label space: the logits are restricted to these classes, in this '
                                'order, and label i of the data is the i-th line (e.g. ImageNet-R/-A on 1000 classes)')
        group.add_argument('--retry', default=False, action='store_true',
                           help='enable batch size decay & retry: a model that fails (e.g. CUDA out of memory) is '
                                "evaluated again at timm's next smaller batch size (decay_batch_step), down to 1")
        group.add_argument('--metrics-avg', type=str, default=None, choices=('micro', 'macro', 'weighted'),
                           help='also report precision, recall and F1 of the top-1 predictions, averaged this way '
                                "(scikit-learn's meaning; computed without it) (default: None)")
        group.add_argument('--tf-preprocessing', action='store_true', default=False,
                           help="use TensorFlow's preprocessing pipeline (timm's TfPreprocessTransform, needs CPU "
                                'TensorFlow installed, an image folder and the prefetcher)')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data loading processes (default: 4)')
    group.add_argument('--amp', action='store_true', default=False, help='use mixed precision')
    group.add_argument('--amp-dtype', default='float16', type=str, help='lower precision AMP dtype (default: float16)')
    group.add_argument('--no-prefetcher', action='store_true', default=False, help='disable fast prefetcher')
    group.add_argument('--pin-mem', action='store_true', default=False, help='pin CPU memory in DataLoader')
    group.add_argument('--device', default=None, type=str,
                       help='device to use (default: cuda when available, else cpu)')
    if not training:
        return
    group.add_argument('--output', default='', type=str, metavar='PATH', help='output folder (default: ./output/train)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME', help='name of train experiment')
    group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC', help='best metric')
    group.add_argument('--dist-backend', default=None, type=str, help='torch.distributed backend')
    group.add_argument('--dist-url', default=None, type=str, help='torch.distributed init url')
    group.add_argument('--no-ddp-bb', action='store_true', default=False,
                       help='DistributedDataParallel without broadcasting buffers (broadcast_buffers=False)')
    group.add_argument('--log-wandb', action='store_true', default=False,
                       help='log each epoch\'s summary row (SDPGO columns included) to wandb, if installed')
    group.add_argument('--wandb-project', default=None, type=str, help='wandb project name')
    group.add_argument('--wandb-tags', default=[], type=str, nargs='+', help='wandb tags')
    group.add_argument('--wandb-resume-id', default='', type=str, metavar='ID',
                       help='the wandb run to continue (with --resume)')
    group.add_argument('--push-to-hub', default=None, type=str, metavar='REPO_ID',
                       help='push the best (EMA if tracked) checkpoint to this Hub repository when training ends')


def _add_scheduled_loader_args(parser: argparse.ArgumentParser) -> None:
    """timm's scheduled-resolution loader flags (its ScheduledBatchSampler, through create_loader)."""
    group = parser.add_argument_group('Scheduled resolution loader parameters')
    group.add_argument('--train-img-sizes', type=int, nargs='+', default=None,
                       help='per-batch square image sizes for scheduled resolution training')
    group.add_argument('--train-batch-sizes', type=int, nargs='+', default=None,
                       help='batch size for each --train-img-sizes choice (default: --batch-size for every choice)')
    group.add_argument('--train-size-probs', type=float, nargs='+', default=None,
                       help='base sampling weights for --train-img-sizes (default: uniform)')
    group.add_argument('--train-size-schedule', type=str, default='constant', choices=('constant', 'progressive'),
                       help='resolution choice schedule; progressive moves from the first size to the last')
    group.add_argument('--train-size-schedule-spread', type=float, default=0.65,
                       help='progressive schedule spread in resolution-choice index units (default: 0.65)')
    group.add_argument('--train-size-random-mix', type=float, default=0.1,
                       help='fraction of uniform random active choices mixed into a progressive schedule '
                            '(default: 0.1)')
    group.add_argument('--train-batches-per-epoch', '--train-steps-per-epoch', type=int, default=None,
                       help='fixed loader batches (before gradient accumulation) per epoch; inferred if unspecified')
    group.add_argument('--variable-batch-loss-scale', default='none', type=str, choices=('none', 'sqrt', 'linear'),
                       help='scale gradients relative to the policy-average scheduled batch size')


def create_parser() -> argparse.ArgumentParser:
    """train.py's parser."""
    parser = ArgumentParser(description='timm training with SDPGO self-distillation')
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML file whose keys set defaults (the command line wins)')
    _add_data_args(parser)
    _add_model_args(parser)
    _add_optim_args(parser)
    _add_aug_args(parser)
    _add_naflex_args(parser)
    _add_method_args(parser)
    _add_misc_args(parser)
    _add_scheduled_loader_args(parser)
    return parser


def create_validate_parser() -> argparse.ArgumentParser:
    """validate.py's parser: timm's validate.py flags, defined by the same functions as train.py's."""
    parser = ArgumentParser(description='evaluate timm models and SDPGO training checkpoints')
    _add_data_args(parser, training=False)
    _add_model_args(parser, training=False)
    _add_naflex_args(parser, training=False)
    _add_misc_args(parser, training=False)
    return parser


def load_yaml_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    """Keys of a YAML file as parser defaults; unknown keys and bad YAML are ConfigErrors."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        reason = ' '.join(str(e).split())  # PyYAML's message spans lines; errors here are one line
        raise ConfigError(f"config file {path!r} is not valid YAML: {reason}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of option: value")
    actions = {a.dest: a for a in parser._actions}
    keys = [k for k in cfg if not isinstance(k, str)]
    if keys:
        raise ConfigError(f"key {keys[0]!r} in config file {path!r} is not an option name; keys are option names "
                          "such as 'batch_size'")
    unknown = sorted(k for k in cfg if k.replace('-', '_') not in actions)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in config file {path!r}; keys are option names such as 'batch_size', "
            f"'sdpgo_topk' (see --help)")
    cfg = {k.replace('-', '_'): v for k, v in cfg.items()}
    for key, value in cfg.items():
        cfg[key] = _yaml_value(key, _check_yaml_shape(key, value, actions[key], path), actions[key], path)
    return cfg


def _yaml_value(key: str, value: Any, action: argparse.Action, path: str) -> Any:
    """A YAML value as the command line would give it: text that reads as a number becomes that number, a number
    for a text option its text (as timm writes it, e.g. `experiment: 2024`); a ConfigError for a value the option
    cannot take (argparse checks neither a default's type in a list nor its choices)."""
    _check_yaml_number(key, value, action, path)
    if value is None or isinstance(value, dict):
        return value
    many = isinstance(value, list)
    items = value if many else [value]
    if action.type in (int, float):
        items = [action.type(item) for item in items]
    elif action.type in (str, None) and action.nargs != 0:
        items = [str(item) if isinstance(item, (int, float)) and not isinstance(item, bool) else item
                 for item in items]
        wrong = [item for item in items if not isinstance(item, str)]
        if wrong:
            raise ConfigError(f"{key}: {value!r} in config file {path!r} is not text")
    if action.choices is not None:
        wrong = [item for item in items if item not in action.choices]
        if wrong:
            raise ConfigError(f"{key}: {wrong[0]!r} in config file {path!r} is not one of "
                              f"{', '.join(map(repr, action.choices))}")
    return items if many else items[0]


def _check_yaml_shape(key: str, value: Any, action: argparse.Action, path: str) -> Any:
    """The value in the shape the option takes (one value, a list, a list of N, true/false, a mapping of KEY: VALUE
    for --model-kwargs / --opt-kwargs), else a ConfigError."""
    if isinstance(action, ParseKwargs):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{key}: {value!r} in config file {path!r} is not a mapping (KEY: VALUE lines)")
        return value
    if isinstance(value, dict):
        raise ConfigError(f"{key}: {value!r} in config file {path!r} is a mapping; the option takes "
                          f"{'values' if action.nargs in ('+', '*') or isinstance(action.nargs, int) else 'one value'}")
    if value is None:
        return value
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} in config file {path!r} is not true or false")
        return value
    many = action.nargs in ('+', '*') or isinstance(action.nargs, int)
    if isinstance(value, list) and not many:
        raise ConfigError(f"{key}: {value!r} in config file {path!r} is a list; the option takes one value")
    if many and not isinstance(value, list):
        value = [value]
    if isinstance(action.nargs, int) and len(value) != action.nargs:
        raise ConfigError(f"{key}: {value!r} in config file {path!r} needs {action.nargs} values")
    return value


def _check_finite(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A ConfigError naming the first number option that is nan or infinite (it would fail only after an epoch)."""
    for action in parser._actions:
        if action.type is not float:
            continue
        value = getattr(args, action.dest, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, (int, float)) and not math.isfinite(item):
                raise ConfigError(f"{action.option_strings[-1]} must be a finite number, got {item}")


def _check_yaml_number(key: str, value: Any, action: argparse.Action, path: str) -> None:
    """A ConfigError unless a numeric option's value is a number (or a list of them), or text that reads as one."""
    if action.type not in (int, float) or value is None:
        return
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, bool) or (action.type is int and isinstance(item, float)):
            fits = False
        else:
            try:
                action.type(item)
                fits = True
            except (TypeError, ValueError):
                fits = False
        if not fits:
            kind = 'an integer' if action.type is int else 'a number'
            raise ConfigError(f"{key}: {value!r} in config file {path!r} is not {kind}")


# options that must lie in a range: (name, minimum)
_TRAIN_MINIMA = (('epochs', 1), ('batch_size', 1), ('workers', 0), ('grad_accum_steps', 1),
                 ('checkpoint_hist', 1), ('recovery_interval', 0), ('pad_crop', 0),
                 ('val_interval', 1), ('start_epoch', 0))
_VALIDATE_MINIMA = (('batch_size', 1), ('workers', 0), ('naflex_max_seq_len', 1))
# one rule for every learning rate, decay, momentum and strength: none is negative (timm takes a negative one and
# trains with it: a negative rate is gradient ascent, a negative decay grows the weights)
_NON_NEGATIVE = ('lr', 'lr_base', 'warmup_lr', 'min_lr', 'weight_decay', 'momentum', 'decay_rate', 'lr_cycle_decay',
                 'layer_decay', 'layer_decay_min_scale', 'clip_grad', 'opt_eps', 'bn_eps', 'lr_noise_pct',
                 'lr_noise_std', 'color_jitter', 'mixup', 'cutmix',
                 'distill_loss_weight', 'task_loss_weight', 'decay_epochs', 'warmup_epochs', 'cooldown_epochs',
                 'patience_epochs')
# shares and probabilities: (name, upper bound, whether the bound itself is allowed)
_SHARES = (('smoothing', 1., False), ('drop', 1., False), ('drop_path', 1., False), ('drop_block', 1., False),
           ('hflip', 1., True), ('vflip', 1., True), ('reprob', 1., True), ('mixup_prob', 1., True),
           ('mixup_switch_prob', 1., True), ('color_jitter_prob', 1., True), ('grayscale_prob', 1., True),
           ('gaussian_blur_prob', 1., True), ('bn_momentum', 1., True), ('label_noise', 1., False),
           ('model_ema_decay', 1., False),  # 1 never updates the EMA: the untrained model would be evaluated
           ('bce_target_thresh', 1., False))  # targets are 1 above it: at 1 or more every target would be 0


def _check_minima(args: argparse.Namespace, minima) -> None:
    """A ConfigError naming the first option below its minimum."""
    for name, minimum in minima:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def _check_rates(args: argparse.Namespace) -> None:
    """ConfigErrors for a negative rate, decay or momentum, and for a share or probability outside [0, 1] (timm
    would train with it, or fail with an assertion after building everything)."""
    for name in _NON_NEGATIVE:
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value} (rates, decays and momenta are "
                              "never negative)")
    for name, high, closed in _SHARES:
        value = getattr(args, name, None)
        if value is not None and not (0 <= value <= high if closed else 0 <= value < high):
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, {high:g}{']' if closed else ')'}, "
                              f"got {value}")
    for beta in args.opt_betas or ():
        if not 0 <= beta < 1:
            raise ConfigError(f"--opt-betas must each be in [0, 1), got {args.opt_betas}")


# the names timm's transforms take (timm.data.transforms.str_to_interp_mode; 'random' for training only), and the
# modes timm's RandomErasing, Mixup, gradient clipping, evaluation crop and --dist-bn know: timm asserts on another,
# or raises a KeyError, once the model is built (Mixup silently mixes per batch, --dist-bn does nothing)
_INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos')
_MODES = (('remode', ('const', 'rand', 'pixel')), ('mixup_mode', ('batch', 'pair', 'elem')),
          ('clip_mode', ('norm', 'value', 'agc')), ('crop_mode', ('center', 'squash', 'border')),
          ('dist_bn', ('broadcast', 'reduce')))


def _check_transforms(args: argparse.Namespace) -> None:
    """ConfigErrors, for both scripts, for data-transform options timm would assert on (or take silently wrong):
    --mean/--std of another count than the input's channels (one value is repeated, as timm does), a std <= 0,
    --crop-pct outside (0, 1] (0 is ignored, above 1 zero-pads the crop), --scale/--ratio not MIN <= MAX, an
    interpolation, mode or AutoAugment policy timm does not know."""
    # the input's channels as timm's resolve_data_config takes them
    channels, source = ((args.input_size[0], "--input-size's first value") if args.input_size else
                        (args.in_chans, '--in-chans') if args.in_chans else (3, "timm's default"))
    for name in ('mean', 'std'):
        values = getattr(args, name)
        if values is not None and len(values) not in (1, channels):
            raise ConfigError(f"--{name} takes one value per input channel ({channels}, {source}) or one for all, "
                              f"got {len(values)}: {values}")
    if args.std is not None and min(args.std) <= 0:
        raise ConfigError(f"--std must be > 0 (the input is divided by it), got {args.std}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise ConfigError(f"--crop-pct is the share of the resized image the evaluation crop keeps, in (0, 1], got "
                          f"{args.crop_pct}")
    for name, low in (('scale', 0), ('ratio', 1e-12)):
        values = getattr(args, name, None)
        if values is not None and (len(values) != 2 or not low <= values[0] <= values[1]):
            raise ConfigError(f"--{name} takes two values, MIN <= MAX{' (both > 0)' if low else ''}, got {values}")
    for name, extra in (('interpolation', ('',)), ('train_interpolation', ('random',))):
        value = getattr(args, name, None)
        if value is not None and value not in (*_INTERPOLATIONS, *extra):
            names = _INTERPOLATIONS + tuple(e for e in extra if e)
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not an interpolation timm knows: one of "
                              f"{', '.join(names)}")
    for name, modes in _MODES:
        value = getattr(args, name, None)
        if value and value not in modes:
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not one of {', '.join(modes)}")
    if getattr(args, 'aa', None):
        _check_auto_augment(args.aa)


def _check_auto_augment(policy: str) -> None:
    """A ConfigError when timm's AutoAugment/RandAugment/AugMix builder refuses `policy` (as it would once the
    loaders are built)."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    build = (rand_augment_transform if policy.startswith('rand') else
             augment_and_mix_transform if policy.startswith('augmix') else auto_augment_transform)
    try:
        build(policy, dict(translate_const=100, img_mean=(124, 116, 104)))
    except (AssertionError, KeyError, ValueError) as e:
        raise ConfigError(f"--aa {policy!r} is not a policy timm knows ({str(e) or 'a section it cannot read'}): e.g. "
                          "rand-m9-mstd0.5, augmix-m5-w4-d2, original, v0, 3a") from None


def _check_mixup(args: argparse.Namespace) -> None:
    """ConfigErrors for Mixup/CutMix options timm's Mixup asserts on at the first batch."""
    if args.cutmix_minmax is not None:
        low, high = (args.cutmix_minmax + [None, None])[:2]
        if len(args.cutmix_minmax) != 2 or not 0 <= low < high <= 1:
            raise ConfigError(f"--cutmix-minmax takes two shares of the image side, MIN < MAX in [0, 1], got "
                              f"{args.cutmix_minmax}")
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        odd = [n for n in [args.batch_size, *(args.train_batch_sizes or ())] if n % 2]
        if odd:
            raise ConfigError(f"Mixup/CutMix mixes each image with another of its batch, so batches must be even: "
                              f"--batch-size {odd[0]} (use {odd[0] + 1})")


def _check_compile_and_dtype(args: argparse.Namespace) -> None:
    """ConfigErrors, for both scripts, for ways of running the model that exclude each other (--torchscript,
    --torchcompile, validate.py's --aot-autograd) and for --amp with a --model-dtype other than float32."""
    compilers = [flag for flag, on in (('--torchscript', args.torchscript), ('--torchcompile', args.torchcompile),
                                       ('--aot-autograd', getattr(args, 'aot_autograd', False))) if on]
    if len(compilers) > 1:
        raise ConfigError(f"{' and '.join(compilers)} exclude each other (the model is scripted or compiled): "
                          "pick one")
    if args.amp and args.model_dtype not in (None, 'float32'):
        raise ConfigError(f"--amp needs a float32 model (AMP needs float32 weights), not --model-dtype "
                          f"{args.model_dtype}; drop one of the two")


def _check_model_and_loader_flags(args: argparse.Namespace) -> None:
    """ConfigErrors for combinations of timm's model and loader flags that timm's train.py asserts against (or
    silently ignores), each naming the fix."""
    _check_compile_and_dtype(args)
    if args.torchscript and args.sync_bn:
        raise ConfigError("--torchscript does not combine with --sync-bn (a scripted model's BatchNorm layers cannot "
                          "be converted to SyncBatchNorm); drop one")
    if args.train_img_sizes is None:
        for name in ('train_batch_sizes', 'train_size_probs'):
            if getattr(args, name) is not None:
                raise ConfigError(f"--{name.replace('_', '-')} gives a value per --train-img-sizes choice: add "
                                  "--train-img-sizes")
    for name, minimum in (('train_batches_per_epoch', 1), ('epoch_repeats', 0), ('tta', 0)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    if args.use_multi_epochs_loader and args.recovery_interval:
        raise ConfigError("--use-multi-epochs-loader keeps one loader pass running across epochs, so an epoch cannot "
                          "resume mid-way: drop --recovery-interval or --use-multi-epochs-loader")


def parse_args(argv: Optional[List[str]] = None, parser: Optional[argparse.ArgumentParser] = None
               ) -> Tuple[argparse.Namespace, str]:
    """Parse the command line with recipe and config defaults; return (args, args as YAML)."""
    parser = parser or create_parser()
    first, _ = parser.parse_known_args(argv)
    defaults = {}
    if first.data in BENCHMARKS:
        recipe = recipe_path(first.data, first.model)
        if recipe is not None:
            defaults.update(load_yaml_defaults(str(recipe), parser))
    if first.config:
        defaults.update(load_yaml_defaults(first.config, parser))
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    _check_finite(args, parser)
    _check_minima(args, _TRAIN_MINIMA)
    _check_rates(args)
    _check_mixup(args)
    _check_transforms(args)
    _check_model_and_loader_flags(args)
    if first.img_size is not None and first.input_size is None and args.input_size is not None:
        # --img-size on the command line beats an input_size from the recipe or config file, keeping its channels
        args.input_size = [args.input_size[0], args.img_size, args.img_size]
    if args.wandb_resume_id and not args.resume:
        raise ConfigError("--wandb-resume-id continues a wandb run: give --resume too")
    if args.sched == 'step' and args.decay_epochs <= 0:  # timm divides the epoch by it after the first epoch
        raise ConfigError(f"--decay-epochs must be > 0 with --sched step (the rate decays every that many epochs), "
                          f"got {args.decay_epochs}")
    if not 0. < args.train_fraction <= 1.:
        raise ConfigError(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    if args.resume == 'auto' and not args.experiment:
        raise ConfigError("--resume auto needs --experiment NAME (and --output): it resumes the run in that folder")
    if args.eval_metric not in EVAL_METRICS:  # timm's train.py would fail on it after the first epoch
        raise ConfigError(f"--eval-metric {args.eval_metric!r} is not one evaluation reports; use one of "
                          f"{', '.join(EVAL_METRICS)}")
    text = yaml.safe_dump(dict(sorted(vars(args).items())), default_flow_style=False)
    args.method = _resolve_method(args)  # after args.yaml's text: that file holds the flags, a config file reads it
    return args, text


def _resolve_method(args: argparse.Namespace) -> str:
    """The registry name of the training method (`sdpgo_timm.methods`), its own checks of the flags passed."""
    try:
        method = get_method(resolve_method(args))
        if method.check_args is not None:
            method.check_args(args)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return method.name


# training options that decide how a trained model is rebuilt and its evaluation data prepared, in groups: a
# group is taken whole from the first source that sets any of it (--img-size replaces a saved --input-size)
EVAL_ARGS = (('num_classes',), ('gp',), ('in_chans', 'img_size', 'input_size'), ('crop_pct',), ('mean',), ('std',),
             ('interpolation',), ('model_kwargs',), ('bn_eps',),
             ('split_bn', 'aug_splits'))  # a --split-bn model holds aux BatchNorm layers (unused in evaluation)
RESULTS_FORMATS = ('csv', 'json')
EVAL_METRICS = ('top1', 'top5', 'loss')  # what evaluation reports (--eval-metric)


def parse_validate_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse validate.py's command line; a results file other than .csv/.json is a ConfigError."""
    parser = create_validate_parser()
    args = parser.parse_args(argv)
    _check_finite(args, parser)
    _check_minima(args, _VALIDATE_MINIMA)
    _check_transforms(args)
    extension = os.path.splitext(args.results_file)[1].lower()[1:]
    if args.results_file and not args.results_format and extension not in RESULTS_FORMATS:
        raise ConfigError(f"--results-file {args.results_file!r} must end in .csv or .json, or give --results-format "
                          f"{' or '.join(RESULTS_FORMATS)}")
    if args.results_file:
        folder = os.path.dirname(os.path.abspath(args.results_file))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            why = 'does not exist' if not os.path.isdir(folder) else 'cannot be written'
            raise ConfigError(f"--results-file {args.results_file!r}: its folder {folder!r} {why}; create it or "
                              "write the results elsewhere (checked before evaluating anything)")
    _check_validate_combinations(args)
    return args



def _check_validate_combinations(args: argparse.Namespace) -> None:
    """A ConfigError for validate.py options that exclude each other (timm asserts, or fails mid-run)."""
    _check_compile_and_dtype(args)
    if args.naflex_loader and args.channels_last:
        raise ConfigError("--channels-last does not apply to the NaFlex loader's patch sequences; drop one of the two")
    if args.tf_preprocessing and (args.no_prefetcher or args.naflex_loader):
        other = '--no-prefetcher' if args.no_prefetcher else '--naflex-loader'
        raise ConfigError(f"--tf-preprocessing runs in timm's prefetching loader, not with {other}; drop one of "
                          "the two")


def _unset(value: Any) -> bool:
    return value is None or value == '' or value == {}


def resolve_eval_args(args: argparse.Namespace, saved: Optional[Any] = None) -> argparse.Namespace:
    """A copy of validate.py's args that completes what the command line left unset.

    --model and the EVAL_ARGS options come from `saved` (the `args` a training checkpoint
    holds), else, for a benchmark name, from its recipe: a model is evaluated as it was
    trained. Options still unset keep the model's defaults (None).
    """
    saved = dict(vars(saved) if isinstance(saved, argparse.Namespace) else saved or {})
    resolved = argparse.Namespace(**vars(args))
    if _unset(resolved.model):
        resolved.model = saved.get('model')
    if _unset(resolved.model):
        raise ConfigError("no model given: pass --model NAME (or a --checkpoint that names its architecture)")
    recipe = {}
    if resolved.data in BENCHMARKS:
        path = recipe_path(resolved.data, resolved.model)
        recipe = load_yaml_defaults(str(path), create_parser()) if path is not None else {}
    given = {k: v for k, v in vars(resolved).items() if not _unset(v)}
    for group in EVAL_ARGS:
        source = next((s for s in (given, saved, recipe) if any(not _unset(s.get(k)) for k in group)), {})
        for key in group:
            setattr(resolved, key, source.get(key))
    return resolved
