"""create_model_and_task: timm.create_model plus the training task that goes with the model."""
from typing import NamedTuple, Optional

import timm
import torch.nn as nn
from timm.task import ClassificationTask, TrainingTask

from .skd import create_skd_task
from .pretrained import ensure_cached

_PREFIX = 'sdpgo_'


class ModelAndTask(NamedTuple):
    """The plain timm model (evaluate and save this) and the task that trains it."""
    model: nn.Module
    task: TrainingTask


def create_model_and_task(
        model_name: str,
        *,
        sdpgo: bool = True,
        skd: Optional[str] = None,
        **kwargs,
) -> ModelAndTask:
    """Create a timm model and its training task.

    Keyword arguments named `sdpgo_<option>` go to SDPGOTask (e.g. sdpgo_temperature=3.0,
    sdpgo_topk=2, sdpgo_layers=['layer3', 'layer4']); all others to timm.create_model.
    `skd='dlb'` selects the DLB preset; `sdpgo=False` (and no skd) gives timm's
    ClassificationTask, plain cross-entropy.
    """
    task_kwargs = {k[len(_PREFIX):]: kwargs.pop(k) for k in list(kwargs) if k.startswith(_PREFIX)}
    if kwargs.get('pretrained'):
        ensure_cached(model_name, cache_dir=kwargs.get('cache_dir'))
    model = timm.create_model(model_name, **kwargs)
    if not sdpgo and skd is None:
        if task_kwargs:
            raise ValueError(f"sdpgo options {sorted(task_kwargs)} given with sdpgo=False")
        return ModelAndTask(model, ClassificationTask(model, verbose=False))
    return ModelAndTask(model, create_skd_task(model, skd or 'sdpgo', **task_kwargs))
