"""validate.py's helpers: the model of a checkpoint with its weights, ImageNet-ReaL labels, results files."""
import argparse
import csv
import io
import json
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import Dataset
from timm.data import RealLabelsImagenet

from ..data.factory import check_same_classes, dataset_num_classes
from .checkpoint import CLASSES, atomic_write_text, load_weights_into
from .errors import ConfigError
from .setup import check_checkpoint_arch, create_timm_model


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
    """Write result rows (one dict per model) to a .json (a list) or .csv (a header and a row each) file,
    atomically (a failed write is a WriteError and leaves an earlier file as it was)."""
    if path.lower().endswith('.json'):
        atomic_write_text(path, json.dumps(results, indent=4))
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(results[0]) if results else [])
    writer.writeheader()
    writer.writerows(results)
    atomic_write_text(path, buffer.getvalue())
