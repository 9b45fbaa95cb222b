"""Checkpoints as timm writes them, written atomically, with the extra state a resume needs.

`TrainCheckpointSaver` is timm's CheckpointSaver (same files: checkpoint-N, last,
model_best, recovery-E-B; same keys) whose writes go to a temporary file in the same
folder, are flushed and fsynced, then renamed over the target, so a crash or a full disk
never leaves a half-written checkpoint and never harms the previous one. It also stores
`extra_state()` (replay Mixup parameters, sampler position) beside timm's keys.
Loading is data-only (`weights_only=True`); a file that needs arbitrary pickle is refused.
"""
import argparse
import os
import re
from typing import Any, Callable, Dict, Optional

import torch

from timm.utils import CheckpointSaver


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint; the message says why and what to do."""


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Load a timm training checkpoint as data only (weights_only=True); clear errors otherwise."""
    fix = 'Pass the .pth.tar written by training (e.g. model_best.pth.tar).'
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist. {fix}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        message = str(e)
        if 'Unsupported global' in message:
            raise CheckpointError(
                f"{str(path)!r} needs arbitrary code to load (refused: files are loaded with weights_only=True). "
                "If you trust it, load it once with torch.load(..., weights_only=False) and re-save only its "
                "tensors (state_dict).") from None
        # torch's own message suggests weights_only=False: report only what it could not read
        detail = re.search(r'WeightsUnpickler error:\s*(\S[^\n]*)', message)
        reason = detail.group(1) if detail else (message.strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{str(path)!r} is not a timm training checkpoint: torch.load(weights_only=True) cannot read it "
            f"({reason}). {fix}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('state_dict'), dict):
        raise CheckpointError(f"{str(path)!r} is not a timm training checkpoint: it has no 'state_dict'. {fix}")
    return checkpoint


class TrainCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver with atomic writes and extra resume state."""

    def __init__(self, *args, extra_state: Optional[Callable[[], Dict[str, Any]]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_state = extra_state

    def _save(self, save_path, epoch, metric=None):
        """timm's checkpoint keys (model and EMA through the task) plus extra state, saved atomically."""
        state = {'epoch': epoch, 'arch': self.args.model, 'args': self.args,
                 'optimizer': self.optimizer.state_dict(), 'version': 2}
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        state.update(self.task.get_checkpoint_state(unwrap_fn=self.unwrap_fn))
        state.update(self.task.get_checkpoint_state(ema=True, unwrap_fn=self.unwrap_fn))
        if self.extra_state is not None:
            state.update(self.extra_state())
        if metric is not None:
            state['metric'] = metric
        state['saver'] = self.state_dict(epoch, metric)
        atomic_save(state, save_path)

    def _duplicate(self, src, dst):
        """Hard link (or copy) to a temporary name, then rename: `dst` is never partial."""
        tmp = f"{dst}.tmp-{os.getpid()}"
        super()._duplicate(src, tmp)
        os.replace(tmp, dst)
