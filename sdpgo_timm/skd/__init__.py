"""Relatives of SDPGO run on the same machinery, for like-for-like comparisons.

'dlb' (Shen et al., CVPR 2022) is a preset of SDPGOTask (one forward of [replay; fresh]), so
both share one code path; 'dlb2' is DLB with the authors' two forwards per step
(DLBTwoForwardTask); 'pskd' is PS-KD (Kim et al., ICCV 2021), a per-sample table of
last-epoch predictions (PSKDTask).
"""
from typing import Any, Dict, Type

import torch.nn as nn
from timm.task import TrainingTask

from .dlb import DLB_PRESET, DLBTwoForwardTask
from .pskd import PSKDTask
from ..task import SDPGOTask

SKD_PRESETS: Dict[str, Dict[str, Any]] = {'sdpgo': {}, 'dlb': DLB_PRESET}
SKD_TASKS: Dict[str, Type[TrainingTask]] = {'dlb2': DLBTwoForwardTask, 'pskd': PSKDTask}
SKD_NAMES = (*SKD_PRESETS, *SKD_TASKS)


def create_skd_task(model: nn.Module, skd: str = 'sdpgo', **kwargs) -> TrainingTask:
    """An SKD task by name.

    An SDPGOTask preset (preset values override `kwargs`), or a task of SKD_TASKS built from
    `kwargs` ('pskd' needs num_samples and epochs).
    """
    if skd in SKD_TASKS:
        return SKD_TASKS[skd](model, **kwargs)
    if skd not in SKD_PRESETS:
        raise ValueError(f"skd must be one of {SKD_NAMES}, got {skd!r}")
    name = None if skd == 'sdpgo' else f"{skd} (a preset of SDPGOTask)"
    return SDPGOTask(model, **{**kwargs, **SKD_PRESETS[skd], 'name': name})
