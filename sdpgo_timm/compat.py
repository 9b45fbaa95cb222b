"""The one place that touches private APIs of torch and timm.

Each use sits behind a version or presence check and has a fallback, so that a torch or timm
release that changes its internals costs a host sync, a feature with a clear message, or the
library default, never a crash or a silently wrong result:

- `amp_loss_scale`: the scale tensor of timm's NativeScaler (`_scaler`) read without a host
  sync (`GradScaler._get_scale_async`); fallback: the saved scale (one sync per step).
- `swap_batch_sampler`: a DataLoader's batch sampler replaced after construction (the
  name-mangled `_DataLoader__initialized`, as timm's MultiEpochsDataLoader does); fallback:
  the loader cannot resume mid-epoch (recovery checkpoints are refused with a message).
- `timm_worker_init`: timm's loader worker seeding (`timm.data.loader._worker_init`); fallback:
  torch's default worker seeding.
- `add_pretrained_tag`: a pretrained tag added to timm's model registry, which has no public
  API for it; fallback: an error saying how to load the weights by `hf-hub:` id instead.
"""
import logging
from functools import partial
from typing import Any, Callable, Optional, Union

import timm
import torch
from timm.models import PretrainedCfg, split_model_name_tag

_logger = logging.getLogger(__name__)


def amp_loss_scale(loss_scaler) -> Union[float, torch.Tensor]:
    """The factor timm's NativeScaler multiplies the loss by, without a host sync.

    GradScaler.get_scale() reads its scale tensor with .item(), one device sync per step; the
    SKD tasks only use the scale inside their backward hooks, so they get the device tensor
    itself (it changes only in scaler.update(), after the backward). Before the scaler's first
    step, and with no scaler, the scale is a plain float.
    """
    if loss_scaler is None:
        return 1.0
    scaler = getattr(loss_scaler, '_scaler', None)
    if scaler is None or not hasattr(scaler, '_get_scale_async'):  # fallback: the public state, one sync
        return float(loss_scaler.state_dict().get('scale', 1.0)) if hasattr(loss_scaler, 'state_dict') else 1.0
    if not scaler.is_enabled():
        return 1.0
    scale = scaler._get_scale_async()
    return float(scaler.get_scale()) if scale is None else scale


def swap_batch_sampler(data_loader: torch.utils.data.DataLoader, batch_sampler: Any) -> bool:
    """Give a constructed DataLoader another batch sampler; False (nothing changed) where this torch forbids it."""
    if not hasattr(data_loader, '_DataLoader__initialized'):
        _logger.warning(f"torch {torch.__version__} changed DataLoader internals: training cannot resume mid-epoch "
                        "(recovery checkpoints are off); epoch checkpoints work as usual")
        return False
    # DataLoader refuses a new batch_sampler after __init__; timm's MultiEpochsDataLoader swaps it the same way
    data_loader._DataLoader__initialized = False
    data_loader.batch_sampler = batch_sampler
    data_loader._DataLoader__initialized = True
    return True


def timm_worker_init(worker_seeding: str) -> Optional[Callable[[int], None]]:
    """timm's worker_init_fn for loader workers (seeds Python, NumPy and torch per worker); None: torch's own."""
    try:
        from timm.data.loader import _worker_init
    except ImportError:
        _logger.warning(f"timm {timm.__version__} has no loader worker seeding to reuse: workers use torch's default")
        return None
    return partial(_worker_init, worker_seeding=worker_seeding)


def add_pretrained_tag(name: str, cfg: PretrainedCfg) -> None:
    """Add `arch.tag` -> cfg to timm's registry (timm has no public API to add pretrained tags)."""
    fallback = f"load the weights with timm.create_model('hf-hub:{cfg.hf_hub_id}', pretrained=True)"
    from timm.models import _registry
    try:
        cfgs, has_weights, tags = (
            _registry._model_pretrained_cfgs, _registry._model_has_pretrained, _registry._model_with_tags)
    except AttributeError:
        raise RuntimeError(
            f'timm {timm.__version__} changed its private model registry, so sdpgo_timm cannot add {name}: '
            f'{fallback}.') from None
    cfgs[name] = cfg
    has_weights.add(name)
    tags[split_model_name_tag(name)[0]].append(name)
