"""Checkpoints as timm writes them, with the extra state a resume needs: what a checkpoint holds, written and
read here, side by side.

`TrainCheckpointSaver` is timm's CheckpointSaver (same files: checkpoint-N, last,
model_best, recovery-E-B; same keys) whose writes are atomic (`rundir.atomic_save`), so a
crash or a full disk never leaves a half-written checkpoint and never harms the previous one.
Beside timm's keys it stores ours (the keys below): the training data's classes,
`gather_rank_states`' per-process task state, Mixup record and RNG states (or, in a recovery
checkpoint, `gather_recovery_states`' place inside the epoch), and the epoch's summary row.
`resume_training` and `restore_recovery` read them back. Loading is data-only (`weights_only=True`); a file that needs
arbitrary pickle is refused. `find_resume_checkpoint` picks what `--resume auto` continues from.
"""
import argparse
import glob
import logging
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from timm.models import clean_state_dict, split_model_name_tag
from timm.task import TrainingTask
from timm.utils import CheckpointSaver
from timm.utils.checkpoint_saver import load_checkpoint_metadata

from ..methods import recorded_method
from ..protocol import SelfDistillationTask
from .errors import CheckpointError, first_line, one_line
from .rundir import atomic_save, fsync_dir, remove_stale_temporaries, temporary_path, write_error

_logger = logging.getLogger(__name__)

POSITION = 'position'  # {'epoch', 'step', 'num_updates'} of a recovery checkpoint
CLASSES = 'classes'  # the training data's class names in label order
# per-process state under DDP (`gather_rank_states`): one entry per rank
RANK_STATES = 'task_state_ranks'
MIXUP_STATE = 'replay_mixup'  # this process's record of the replay half's Mixup
MIXUP_RANKS = 'replay_mixup_ranks'
RECOVERY_RANKS = 'recovery_ranks'
RNG_RANKS = 'rng_ranks'  # every rank's RNG states at an epoch checkpoint: the next epoch starts from them
SUMMARY_ROW = 'summary_row'  # {'epoch', 'train', 'eval', 'lr'}: the summary.csv row of an epoch checkpoint


def _load_data(path: str, fix: str) -> Any:
    """torch.load(weights_only=True) of an existing file, with one-line CheckpointErrors."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder, not a file. {fix}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist. {fix}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(_load_error(path, e, fix)) from None


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Load a timm training checkpoint as data only (weights_only=True); clear errors otherwise."""
    fix = 'Pass the .pth.tar written by training (e.g. model_best.pth.tar).'
    checkpoint = _load_data(path, fix)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('state_dict'), dict):
        raise CheckpointError(f"{str(path)!r} is not a timm training checkpoint: it has no 'state_dict'. {fix}")
    return checkpoint


def load_weights_file(path: str) -> Dict[str, Any]:
    """Model weights as a checkpoint dict (`state_dict` and whatever else the file holds), from any file timm's
    `load_checkpoint` reads: a training checkpoint, a bare state dict (`torch.save(model.state_dict())`), a
    {'model': ...} file, or .safetensors. Data only; one-line CheckpointErrors otherwise."""
    fix = 'Pass a training checkpoint, a saved state dict or a .safetensors file of the model\'s weights.'
    if str(path).endswith('.safetensors'):
        if not os.path.isfile(path):
            raise CheckpointError(f"weights file {str(path)!r} does not exist. {fix}")
        from safetensors.torch import load_file
        try:
            return {'state_dict': load_file(path)}
        except Exception as e:
            raise CheckpointError(
                f"{str(path)!r} is not a readable .safetensors file ({first_line(e)}). {fix}") from None
    data = _load_data(path, fix)
    if isinstance(data, dict) and isinstance(data.get('state_dict'), dict):
        return data
    if isinstance(data, dict) and isinstance(data.get('model'), dict):
        return {**data, 'state_dict': data['model']}
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return {'state_dict': data}
    raise CheckpointError(
        f"{str(path)!r} holds no model weights (no 'state_dict', no 'model', not a state dict). {fix}")


def _load_error(path: str, error: Exception, fix: str = '') -> str:
    """One line saying why torch.load(weights_only=True) refused or failed; never advises full unpickling."""
    message = str(error)
    code = re.search(r'unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)', message, re.IGNORECASE)
    if code:
        return (f"{str(path)!r} needs arbitrary code to load ({code.group(1)}): refused, files are loaded as data "
                "only (weights_only=True). If you trust its source, load it once with full unpickling in a separate "
                "script and re-save only its tensors (state_dict).")
    detail = re.search(r'WeightsUnpickler error:\s*(\S[^\n]*)', message)
    if detail:
        reason = detail.group(1)
    else:  # the first sentence: torch's own messages go on to suggest disabling weights_only
        reason = (message.strip().splitlines() or [type(error).__name__])[0].split('. ')[0]
        if _is_zip(path):
            reason = f"the file is truncated or corrupt: {reason}"
    return (f"{str(path)!r} is not a timm training checkpoint: torch.load(weights_only=True) cannot read it "
            f"({reason}). {fix}").strip()


def _is_zip(path: str) -> bool:
    """Whether a file starts as torch.save's zip archives do."""
    try:
        with open(path, 'rb') as f:
            return f.read(4) == b'PK\x03\x04'
    except OSError:
        return False


def resume_position(checkpoint: Dict[str, Any]) -> Tuple[int, int]:
    """(epoch, batches already trained in it) where a run resumed from this checkpoint continues."""
    position = checkpoint.get(POSITION)
    if position is not None:
        return int(position['epoch']), int(position['step'])
    return int(checkpoint.get('epoch', -1)) + 1, 0


_RESUME_NAMES = ('last', 'checkpoint-', 'recovery-', 'model_best')  # tie order: same position, earlier wins


def load_weights_into(model: torch.nn.Module, checkpoint: Dict[str, Any], path: str, what: str,
                      use_ema: bool = False) -> None:
    """Load a checkpoint's model (or EMA) weights into `model`; one-line CheckpointErrors naming `what` was asked
    (e.g. "--model 'resnet18' with 10 classes") when there are none or they do not fit."""
    from timm.models import clean_state_dict
    key = 'state_dict_ema' if use_ema else 'state_dict'
    if checkpoint.get(key) is None:
        raise CheckpointError(f"{str(path)!r} has no EMA weights ('state_dict_ema'): use the model's weights instead")
    try:
        model.load_state_dict(clean_state_dict(checkpoint[key]))
    except RuntimeError as e:
        raise CheckpointError(f"{str(path)!r} does not fit {what}: {one_line(e)}") from None


def find_resume_checkpoint(folder: str) -> Optional[str]:
    """The checkpoint of `folder` furthest into training that loads (recovery files included); None if none.

    Each file is read as data only (tensors memory-mapped where the format allows); one that
    does not load (e.g. truncated) is skipped with a warning naming it.
    """
    found = []
    for path in glob.glob(os.path.join(folder, '*.pth.tar')):
        name = os.path.basename(path)
        rank = next((i for i, prefix in enumerate(_RESUME_NAMES) if name.startswith(prefix)), None)
        if rank is None:  # timm's tmp.pth.tar / recovery_tmp.pth.tar and files of others
            continue
        try:
            try:
                checkpoint = load_checkpoint_metadata(path)
            except Exception:  # no memory map for this file: read it whole, or say why it does not load
                checkpoint = load_checkpoint_file(path)
            epoch, step = resume_position(checkpoint)
        except CheckpointError as e:
            _logger.warning(f"--resume auto: skipping a checkpoint that does not load: {e}")
            continue
        found.append(((-epoch, -step, rank), path))
    return min(found)[1] if found else None


class TrainCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver with atomic writes and extra resume state.

    `save_checkpoint(..., extra=)` and `save_recovery(..., extra=)` store `extra` beside
    timm's keys, and every checkpoint the training data's class names (`classes`); `last`, `model_best` and the epoch copies change only by an atomic rename
    of a complete file.
    """

    def __init__(self, *args, classes: Optional[list] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.classes = classes  # the training data's class names, saved as CLASSES for validate.py to check
        self._extra: Dict[str, Any] = {}
        remove_stale_temporaries(self.checkpoint_dir)

    def save_checkpoint(self, epoch, metric=None, extra: Optional[Dict[str, Any]] = None):
        self._extra = extra or {}
        try:
            return super().save_checkpoint(epoch, metric)
        finally:
            self._extra = {}

    def save_recovery(self, epoch, batch_idx=0, extra: Optional[Dict[str, Any]] = None) -> str:
        """timm's recovery-<epoch>-<batch_idx> file (the two newest are kept); returns its path."""
        self._extra = extra or {}
        try:
            super().save_recovery(epoch, batch_idx)
        finally:
            self._extra = {}
        return self.curr_recovery_file

    def _recovery_files(self) -> List[Tuple[Tuple[int, int], str]]:
        """((epoch, batch), path) of each recovery file in the run folder, oldest first."""
        files = []
        for path in glob.glob(os.path.join(self.recovery_dir, f'{self.recovery_prefix}-*{self.extension}')):
            numbers = re.findall(r'\d+', os.path.basename(path))
            if len(numbers) == 2:
                files.append((tuple(map(int, numbers)), path))
        return sorted(files)

    def adopt_recovery_files(self) -> None:
        """Take over the recovery files of the run resumed in place: the two newest are cleaned up in turn, older
        ones (left by a kill between a save and its clean-up) now."""
        files = [p for _, p in self._recovery_files()]
        for path in files[:-2]:
            os.remove(path)
            _logger.info(f"Removed {path!r}: older than the two newest recovery checkpoints")
        self.prev_recovery_file, self.curr_recovery_file = ([''] * 2 + files)[-2:]

    def remove_superseded_recovery(self, epoch: int) -> None:
        """Remove the recovery files of epochs up to `epoch`, once that epoch's checkpoint is written: `--resume
        auto` would never pick them again (the epoch checkpoint is further), and each is as large as a checkpoint.
        Files of later epochs (a stopped run's newest) stay; a file that cannot be removed only warns."""
        for (file_epoch, _), path in self._recovery_files():
            if file_epoch > epoch:
                continue
            try:
                os.remove(path)
            except OSError as e:
                _logger.warning(f"Could not remove the superseded recovery checkpoint {path!r}: {e}")
                continue
            if path == self.curr_recovery_file:
                self.curr_recovery_file = ''
            if path == self.prev_recovery_file:
                self.prev_recovery_file = ''

    def _save(self, save_path, epoch, metric=None):
        """timm's checkpoint keys (model and EMA through the task) plus extra state, saved atomically."""
        state = {'epoch': epoch, 'arch': self.args.model, 'args': self.args,
                 'optimizer': self.optimizer.state_dict(), 'version': 2}
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        state.update(self.task.get_checkpoint_state(unwrap_fn=self.unwrap_fn))
        state.update(self.task.get_checkpoint_state(ema=True, unwrap_fn=self.unwrap_fn))
        if self.classes is not None:
            state[CLASSES] = list(self.classes)
        state.update(self._extra)
        if metric is not None:
            state['metric'] = metric
        # a recovery checkpoint is not an epoch's: nothing pending for the checkpoint history
        state['saver'] = self.state_dict(None if POSITION in self._extra else epoch, metric)
        atomic_save(state, save_path)

    def _replace(self, src, dst):
        """Rename over `dst` (atomic): `dst` always exists, old or new, never missing or partial."""
        os.replace(src, dst)
        fsync_dir(dst)

    def _duplicate(self, src, dst):
        """Hard link (or copy and fsync) to a temporary name, then rename: `dst` is never partial."""
        tmp = temporary_path(dst)
        try:
            super()._duplicate(src, tmp)
            if not self.can_hardlink:
                with open(tmp, 'rb+') as f:
                    os.fsync(f.fileno())
            self._replace(tmp, dst)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise write_error(dst, e) from None


def check_checkpoint_arch(checkpoint: Dict[str, Any], path: str, model: str) -> None:
    """A CheckpointError when the checkpoint's architecture (pretrained tags aside) is not `model`'s."""
    arch = checkpoint.get('arch')
    if arch and split_model_name_tag(arch)[0] != split_model_name_tag(model)[0]:
        raise CheckpointError(f"{str(path)!r} holds a {arch!r} model, not --model {model!r}")


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
    rank's `recovery` state (mid-epoch position) when given, else (an epoch checkpoint) `rng_ranks` every rank's
    RNG states, which a resumed run restores so that its next epoch draws what this one's would have.
    """
    mixup = mixup_fn.state_dict() if hasattr(mixup_fn, 'state_dict') else None
    # a task whose state is the same on every rank (PS-KD's table) is saved once, from rank 0's `task_state`
    shared = isinstance(task, SelfDistillationTask) and task.state_shared_across_ranks
    rank_state = None if shared else task.get_task_state()
    state = _to_cpu(dict(task_state=rank_state, mixup=mixup, recovery=recovery,
                         rng=get_rng_state() if recovery is None else None))
    states = [state]
    if args.distributed:
        states = [None] * args.world_size
        dist.all_gather_object(states, state)
    extra: Dict[str, Any] = {}
    if mixup is not None:
        extra[MIXUP_STATE] = state['mixup']
    if args.distributed and state['task_state']:
        extra[RANK_STATES] = [s['task_state'] for s in states]
    if args.distributed and mixup is not None:
        extra[MIXUP_RANKS] = [s['mixup'] for s in states]
    if recovery is not None:
        extra[RECOVERY_RANKS] = [s['recovery'] for s in states]
    else:
        extra[RNG_RANKS] = [s['rng'] for s in states]
    return extra


def gather_recovery_states(
        task: TrainingTask,
        mixup_fn,
        args: argparse.Namespace,
        epoch: int,
        num_updates: int,
        loader,
        meter,
        skipped=None,
) -> Dict[str, Any]:
    """A recovery checkpoint's extra keys: `gather_rank_states` with every rank's place inside the epoch
    (`recovery_ranks`: the loader's position and RNG states, `runner.recovery.ResumableLoader.state_dict`; the
    epoch's running sums; the skipped-image record) and `position` (epoch, batches done in it, optimizer updates).
    Collective under DDP; `resume_training` and `restore_recovery` read it back."""
    recovery = dict(loader=loader.state_dict(), meter=meter.state_dict(),
                    skipped=skipped.state_dict() if skipped is not None else None)
    position = dict(epoch=epoch, step=loader.consumed, num_updates=num_updates)
    return {**gather_rank_states(task, mixup_fn, args, recovery), POSITION: position}


def restore_recovery(state: Dict[str, Any], loader, meter, skipped=None) -> None:
    """Apply this rank's entry of a recovery checkpoint's `recovery_ranks` (`ResumePoint.recovery`) to the training
    loader (its next epoch continues after the batches done), the epoch's meter and the skipped-image record."""
    loader.load_state_dict(state['loader'])
    meter.load_state_dict(state['meter'])
    if skipped is not None and state.get('skipped') is not None:
        skipped.load_state_dict(state['skipped'])


RngState = Dict[str, Any]


def get_rng_state() -> RngState:
    """This process's RNG states: torch (CPU, and CUDA once initialised), NumPy and Python's `random`."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = dict(
        torch=torch.get_rng_state(),
        numpy=dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos), has_gauss=int(has_gauss),
                   gauss=float(gauss)),
        python=dict(version=version, internal=torch.tensor(internal, dtype=torch.int64), gauss_next=gauss_next))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: RngState) -> None:
    """Restore what `get_rng_state` returned."""
    torch.set_rng_state(state['torch'])
    numpy = state['numpy']
    np.random.set_state(('MT19937', numpy['keys'].numpy().astype(np.uint32), numpy['pos'], numpy['has_gauss'],
                         numpy['gauss']))
    python = state['python']
    random.setstate((python['version'], tuple(python['internal'].tolist()), python['gauss_next']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _training_shape_change(saved: Any, args: argparse.Namespace) -> str:
    """What differs between the checkpoint's run and this one in what its self-distillation state depends on: the
    method, the batch per process, the number of processes ('' when nothing does, or the checkpoint does not say)."""
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved or {})
    if not saved:
        return ''
    changes = []
    before, now = recorded_method(saved) or 'cross-entropy', recorded_method(vars(args)) or 'cross-entropy'
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
    checkpoint this rank's mid-epoch state (for `restore_recovery`)."""
    epoch: int = 0
    num_updates: Optional[int] = None
    recovery: Optional[Dict[str, Any]] = None
    summary_row: Optional[Dict[str, Any]] = None  # the summary.csv row an epoch checkpoint holds
    rng: Optional[Dict[str, Any]] = None  # this rank's RNG states at an epoch checkpoint (restore before training)


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
    if RANK_STATES in checkpoint and not change:
        task_state = _this_rank(checkpoint, RANK_STATES, args, path)
    if change and task_state:
        _logger.warning(f"{path!r} was trained with {change}: its self-distillation state (replay cache, PS-KD "
                        "table, PWA statistics) does not fit this run and is dropped; the model, optimizer and "
                        "schedule resume as saved, and the first step trains without a teacher")
        task_state = None
    try:
        task.load_checkpoint_state(clean_state_dict(checkpoint['state_dict']), task_state)
    except RuntimeError as e:
        raise CheckpointError(f"{path!r} does not fit --model {args.model!r}: {one_line(e)}") from None
    if task.has_ema():
        ema = checkpoint.get('state_dict_ema')
        if ema is None:  # timm builds its EMA after the resume; this one exists already and must not stay random
            _logger.warning(f"{path!r} has no EMA weights: --model-ema starts from the resumed model's weights")
            ema = checkpoint['state_dict']
        # the EMA of task-owned modules too (feature distillation's projection); self-distillation tasks keep none
        task.load_checkpoint_state(clean_state_dict(ema), checkpoint.get('task_state_ema'), ema=True)
    if optimizer is not None and 'optimizer' in checkpoint and not args.no_resume_opt:
        optimizer.load_state_dict(checkpoint['optimizer'])
    if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
        loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])
    mixup = None if change else _this_rank(checkpoint, MIXUP_RANKS, args, path) if MIXUP_RANKS in checkpoint else (
        checkpoint.get(MIXUP_STATE))
    if mixup_fn is not None and mixup is not None and hasattr(mixup_fn, 'load_state_dict'):
        mixup_fn.load_state_dict(mixup)
    epoch, step = resume_position(checkpoint)
    point = ResumePoint(epoch, summary_row=checkpoint.get(SUMMARY_ROW))
    if RNG_RANKS in checkpoint and POSITION not in checkpoint and not change:
        point.rng = _this_rank(checkpoint, RNG_RANKS, args, path)
    if POSITION in checkpoint:
        point.num_updates = int(checkpoint[POSITION]['num_updates'])
        point.recovery = _this_rank(checkpoint, RECOVERY_RANKS, args, path)
    _logger.info(f"Resumed {path!r} at epoch {epoch}" + (f", after step {step}" if step else ''))
    return point
