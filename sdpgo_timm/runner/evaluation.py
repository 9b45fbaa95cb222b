"""validate.py's helpers: the model of a checkpoint with its weights, as timm's validate.py flags prepare it
(test-time pool, dtype, TorchScript / torch.compile / AOT autograd, valid labels), its loader (timm's, NaFlex or
TensorFlow preprocessing), ImageNet-ReaL labels, precision/recall/F1, batch size retries, results files."""
import argparse
import csv
import importlib
import io
import json
import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import Dataset
from timm.data import ImageDataset, RealLabelsImagenet
from timm.layers import apply_test_time_pool
from timm.utils import check_batch_size_retry, decay_batch_step, reparameterize_model

from ..data.factory import check_same_classes, dataset_num_classes
from .checkpoint import CLASSES, check_checkpoint_arch, load_weights_into
from .errors import ConfigError, RunError, one_line
from .naflex import create_naflex_eval_loader
from .rundir import atomic_write_text
from .setup import create_eval_loader, create_timm_model

_logger = logging.getLogger(__name__)


def create_eval_model(
        args: argparse.Namespace,
        dataset: Dataset,
        checkpoint: Optional[Dict[str, Any]] = None,
        path: str = '',
) -> torch.nn.Module:
    """The timm model of validate.py's args with a training checkpoint's weights (EMA ones with --use-ema).

    Built scriptable for --torchscript and reparameterized after loading for --reparam, as timm's
    validate.py does. With --valid-labels the class count is the model's (or --num-classes), not the
    data's: the data holds a subset of the model's classes. Weights that do not fit (another architecture
    or class count) and a split with more classes than the model predicts are one-line CheckpointErrors /
    ValueErrors.
    """
    if checkpoint is not None:
        check_checkpoint_arch(checkpoint, path, args.model)
    model = create_timm_model(args, None if args.valid_labels else dataset)  # scriptable for --torchscript
    if checkpoint is not None:
        load_weights_into(model, checkpoint, path, f"--model {args.model!r} with {model.num_classes} classes",
                          use_ema=args.use_ema)
    trained_on = checkpoint.get(CLASSES) if checkpoint is not None else None
    if trained_on is not None:
        check_same_classes(trained_on, dataset, f"the {args.split!r} split",
                           f"evaluate on data with the class folders the checkpoint was trained on {trained_on}")
    num_classes = dataset_num_classes(dataset)
    if num_classes is not None and num_classes > model.num_classes:
        raise ValueError(
            f"the {args.split!r} split has {num_classes} classes but the model predicts {model.num_classes}; "
            "check the data and --num-classes")
    if args.reparam:
        model = reparameterize_model(model)
    return model


def apply_test_pool(model: nn.Module, data_config: Dict[str, Any]) -> nn.Module:
    """timm's test-time pool (--test-pool): where the evaluation input is larger than the model's default
    one, its features are pooled as at that size; the whole image is then used (crop_pct 1.0, as timm)."""
    model, pooled = apply_test_time_pool(model, data_config)
    if pooled:
        data_config['crop_pct'] = 1.0
    return model


class FusedPerShape(nn.Module):
    """functorch's memory_efficient_fusion of a model (timm's --aot-autograd), traced once per input shape.

    A trace is specialised to the batch size it saw (torch 2.x's aot_module does not retrace), so the
    last, smaller batch of a split gets a trace of its own instead of failing.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        try:
            from functorch.compile import memory_efficient_fusion
        except ImportError as e:
            raise ConfigError(f"--aot-autograd needs functorch's memory_efficient_fusion, which this torch lacks "
                              f"({e}); use --torchcompile instead") from None
        self.model = model
        self._fuse = memory_efficient_fusion
        self._fused: Dict[Tuple[int, ...], Callable] = {}  # not submodules: they share self.model's parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        if shape not in self._fused:
            self._fused[shape] = self._fuse(self.model)
        return self._fused[shape](x)


def compile_eval_model(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """The model as --torchscript, --torchcompile or --aot-autograd runs it (they exclude each other)."""
    if args.torchscript:
        return torch.jit.script(model)
    if args.torchcompile:
        return torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.aot_autograd:
        return FusedPerShape(model)
    return model


def read_valid_labels(path: str, num_classes: int, dataset: Dataset) -> List[int]:
    """The class indices of a --valid-labels file (one a line; blank lines skipped), checked against the model's
    `num_classes` and the data: label i of the data is the class on line i + 1, so it needs a line per class."""
    try:
        with open(path) as f:
            lines = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--valid-labels {path!r} cannot be read: {e}") from None
    labels = []
    for n, text in lines:
        if not text.isdigit() or int(text) >= num_classes:
            raise ConfigError(f"--valid-labels {path!r} line {n}: {text!r} is not a class index of the model "
                              f"(0 to {num_classes - 1})")
        labels.append(int(text))
    declared = dataset_num_classes(dataset)
    if not labels or (declared is not None and declared > len(labels)):
        raise ConfigError(f"--valid-labels {path!r} lists {len(labels)} classes but the {declared}-class data needs "
                          "one line per class (its label i is the class on line i + 1)")
    return labels


class ValidLabels(nn.Module):
    """A model whose logits are those of `labels`, in that order (timm's --valid-labels: a partial label space)."""

    def __init__(self, model: nn.Module, labels: List[int], device: torch.device):
        super().__init__()
        self.model = model
        self.register_buffer('labels', torch.tensor(labels, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.model(x)
        if isinstance(output, (tuple, list)):
            output = output[0]
        return output[:, self.labels]


class MapBatches:
    """A loader whose batches go through `fn` as they are read; its length is the loader's."""

    def __init__(self, loader: Iterable, fn: Callable):
        self.loader = loader
        self.fn = fn

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return map(self.fn, self.loader)


def _check_tf_preprocessing(dataset: Dataset) -> None:
    """ConfigErrors where timm's TensorFlow preprocessing cannot run: it decodes image files itself, in TensorFlow."""
    if not isinstance(dataset, ImageDataset):
        raise ConfigError(f"--tf-preprocessing decodes image files: it needs an image folder dataset, not "
                          f"{type(dataset).__name__}")
    try:
        importlib.import_module('timm.data.tf_preprocessing')
    except ImportError as e:
        raise ConfigError(f"--tf-preprocessing needs TensorFlow ({e}): pip install tensorflow-cpu, or leave the "
                          "flag out") from None


def _cast_batch(dtype: torch.dtype) -> Callable:
    """A batch mapper casting the floating inputs (a tensor, or NaFlex's dict of them) to `dtype`."""
    def cast(batch):
        input, target = batch
        if isinstance(input, dict):
            return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                    for k, v in input.items()}, target
        return input.to(dtype), target
    return cast


def create_validate_loader(
        args: argparse.Namespace,
        dataset: Dataset,
        data_config: Dict[str, Any],
        device: torch.device,
        patch_size: Optional[Tuple[int, int]] = None,
):
    """validate.py's loader: timm's NaFlex loader of `patch_size` patches (--naflex-loader), else timm's evaluation
    loader, with TensorFlow preprocessing for --tf-preprocessing; inputs come in --model-dtype (the prefetcher
    casts them; without it, a cast of each batch)."""
    if args.naflex_loader:
        loader = create_naflex_eval_loader(args, dataset, data_config, device, patch_size,
                                           crop_mode=data_config.get('crop_mode'),
                                           crop_border_pixels=args.crop_border_pixels)
    else:
        if args.tf_preprocessing:
            _check_tf_preprocessing(dataset)
            dataset.load_bytes = True  # TensorFlow decodes the file's bytes
        loader = create_eval_loader(args, dataset, data_config, device, tf_preprocessing=args.tf_preprocessing)
    if args.model_dtype and args.no_prefetcher:
        loader = MapBatches(loader, _cast_batch(getattr(torch, args.model_dtype)))
    return loader


def class_scores(preds: torch.Tensor, targets: torch.Tensor, average: str) -> Tuple[float, float, float]:
    """Precision, recall and F1 of single-label predictions, as scikit-learn's precision_score, recall_score and
    f1_score with `average` ('micro', 'macro' or 'weighted') and zero_division=0.

    The classes are those in the targets or the predictions; 'micro' counts every sample once, 'macro'
    averages the classes' scores, 'weighted' weights them by their number of targets.
    """
    classes = torch.unique(torch.cat([preds, targets]))
    hits = torch.stack([((preds == c) & (targets == c)).sum() for c in classes]).double()
    predicted = torch.stack([(preds == c).sum() for c in classes]).double()
    support = torch.stack([(targets == c).sum() for c in classes]).double()
    if average == 'micro':  # one pool of all samples
        hits, predicted, support = (t.sum().unsqueeze(0) for t in (hits, predicted, support))

    def ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(b > 0, a / b.clamp(min=1), torch.zeros_like(a))  # zero_division=0

    scores = ratio(hits, predicted), ratio(hits, support), ratio(2 * hits, predicted + support)
    weights = support / support.sum() if average == 'weighted' else torch.full_like(support, 1 / len(support))
    return tuple(float((s * weights).sum()) for s in scores)


class ClassMetrics:
    """timm's --metrics-avg: precision, recall and F1 (%) of the top-1 predictions over a split (`class_scores`).

    `batches(loader)` keeps the targets as they are read; `add_output(logits)` (validate's `on_output`)
    the predictions, in the same order.
    """

    def __init__(self, average: str):
        self.average = average
        self.preds: List[torch.Tensor] = []
        self.targets: List[torch.Tensor] = []

    def batches(self, loader: Iterable) -> MapBatches:
        return MapBatches(loader, self._keep_target)

    def _keep_target(self, batch):
        self.targets.append(batch[1].detach().cpu())
        return batch

    def add_output(self, output: torch.Tensor) -> None:
        self.preds.append(output.detach().argmax(dim=1).cpu())

    def results(self) -> Dict[str, float]:
        """{'<average>_precision': %, '<average>_recall': %, '<average>_f1_score': %}, as timm's validate.py."""
        scores = class_scores(torch.cat(self.preds), torch.cat(self.targets), self.average)
        names = ('precision', 'recall', 'f1_score')
        return {f'{self.average}_{name}': round(100 * score, 4) for name, score in zip(names, scores)}


def call_all(*callbacks: Optional[Callable]) -> Optional[Callable]:
    """One callback that calls each of `callbacks` not None in turn (None when there are none)."""
    given = [c for c in callbacks if c is not None]
    if not given:
        return None

    def call(*args) -> None:
        for callback in given:
            callback(*args)
    return call


class EvaluationFailed(RunError):
    """A model that could not be evaluated at any batch size (--retry); its message says why."""
    exit_status = 1  # as Python's own for an error


def evaluate_with_retry(evaluate: Callable, args: argparse.Namespace, path: str) -> Dict[str, Any]:
    """`evaluate(args, path)`, again at timm's next smaller batch size (decay_batch_step) after a runtime error that
    a smaller batch may cure (CUDA out of memory; timm's check_batch_size_retry), down to batch size 1.

    Our own errors (bad options, checkpoints) are raised as they are; an EvaluationFailed when no batch size works.
    """
    batch_size = args.batch_size
    while True:
        try:
            return evaluate(argparse.Namespace(**{**vars(args), 'batch_size': batch_size}), path)
        except RunError:
            raise
        except RuntimeError as e:
            error = one_line(e)  # kept as text: the exception holds the failed try's model and tensors
        smaller = decay_batch_step(batch_size)
        if not smaller or not check_batch_size_retry(error):
            tried = 'down to batch size 1' if not smaller else f'at batch size {batch_size}, not retried'
            raise EvaluationFailed(f"validating {path or args.model!r} failed ({tried}): {error}")
        _logger.warning(f"validation failed at batch size {batch_size} ({error}); retrying with batch size {smaller}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        batch_size = smaller


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


def write_results(path: str, results: List[Dict[str, Any]], format: Optional[str] = None) -> None:
    """Write result rows (one dict per model) as json (a list) or csv (a header and a row each): `format`, else the
    file name's extension; atomically (a failed write is a WriteError and leaves an earlier file as it was)."""
    if (format or ('json' if path.lower().endswith('.json') else 'csv')) == 'json':
        atomic_write_text(path, json.dumps(results, indent=4))
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(results[0]) if results else [])
    writer.writeheader()
    writer.writerows(results)
    atomic_write_text(path, buffer.getvalue())
