"""Relatives of SDPGO run on the same machinery, for like-for-like comparisons.

DLB (Shen et al., CVPR 2022) is SIL with the full teacher distribution, α fixed at 1,
additive weighting and τ = 3: a preset of SDPGOTask, so both share one code path.
"""
from typing import Any, Dict

import torch.nn as nn

from .task import SDPGOTask

DLB_PRESET: Dict[str, Any] = dict(temperature=3.0, topk=-1, alpha_mode='fixed', alpha=1.0, weighting='additive')

SKD_PRESETS: Dict[str, Dict[str, Any]] = {'sdpgo': {}, 'dlb': DLB_PRESET}


def create_skd_task(model: nn.Module, skd: str = 'sdpgo', **kwargs) -> SDPGOTask:
    """An SDPGOTask configured by a preset name; preset values override `kwargs`."""
    if skd not in SKD_PRESETS:
        raise ValueError(f"skd must be one of {tuple(SKD_PRESETS)}, got {skd!r}")
    return SDPGOTask(model, **{**kwargs, **SKD_PRESETS[skd]})
