"""Checkpoints as timm writes them, written atomically, with the extra state a resume needs.

`TrainCheckpointSaver` is timm's CheckpointSaver (same files: checkpoint-N, last,
model_best, recovery-E-B; same keys) whose writes go to a temporary file in the same
folder, are flushed and fsynced, then renamed over the target, so a crash or a full disk
never leaves a half-written checkpoint and never harms the previous one. It also stores
extra state (replay caches and Mixup records of every process, the position inside an
epoch) beside timm's keys. The run's other files (args.yaml, summary.csv) are replaced the
same way. Loading is data-only (`weights_only=True`); a file that needs arbitrary pickle is
refused. `find_resume_checkpoint` picks what `--resume auto` continues from.
"""
import argparse
import csv
import errno
import glob
import io
import logging
import os
import re
import shutil
from typing import Any, Callable, Dict, IO, Optional, Tuple

import torch

from timm.utils import CheckpointSaver
from timm.utils.checkpoint_saver import load_checkpoint_metadata

from .errors import CheckpointError, WriteError, one_line

_logger = logging.getLogger(__name__)

POSITION = 'position'  # {'epoch', 'step', 'num_updates'} of a recovery checkpoint
CLASSES = 'classes'  # the training data's class names in label order
# per-process state under DDP (`runner.setup.gather_rank_states`): one entry per rank
RANK_STATES = 'task_state_ranks'
MIXUP_STATE = 'replay_mixup'  # this process's record of the replay half's Mixup
MIXUP_RANKS = 'replay_mixup_ranks'
RECOVERY_RANKS = 'recovery_ranks'
RNG_RANKS = 'rng_ranks'  # every rank's RNG states at an epoch checkpoint: the next epoch starts from them
SUMMARY_ROW = 'summary_row'  # {'epoch', 'train', 'eval', 'lr'}: the summary.csv row of an epoch checkpoint
_TMP = '.tmp-'
_TMP_FILE = re.compile(r'.+\.tmp-(\d+)$')


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync, rename over `path`.

    A failure removes the temporary file, leaves `path` as it was and raises a WriteError.
    """
    tmp = f"{path}{_TMP}{os.getpid()}"
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        if isinstance(e, RuntimeError) and _is_torch_write_failure(e):
            raise WriteError(
                f"could not write {path!r}: torch.save failed ({_first_line(e)}), e.g. on a full disk; the previous "
                "file is unchanged. Free space or fix permissions, then continue with --resume auto.") from None
        raise


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _is_torch_write_failure(error: RuntimeError) -> bool:
    """torch.save's zip writer reports a failed write (a full disk among them) as a RuntimeError, not an OSError."""
    message = str(error)
    return any(s in message for s in ('PytorchStreamWriter', 'file write failed', 'inline_container'))


def _write_error(path: str, error: OSError) -> WriteError:
    code = f" ({errno.errorcode[error.errno]})" if error.errno in errno.errorcode else ''
    return WriteError(
        f"could not write {path!r}: {error.strerror or error}{code}; the previous file is unchanged. Free space or "
        "fix permissions, then run the same command again (train.py: with --resume auto).")


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to `path` atomically (see `atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))


# timm's summary.csv columns, in timm's order; ours follow them
_TIMM_SUMMARY = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr')


def summary_row(epoch: int, train_metrics: dict, eval_metrics: dict, lr: float) -> Dict[str, Any]:
    """An epoch's summary.csv row: timm's columns (epoch, train_loss, eval_loss, eval_top1, eval_top5, lr) in timm's
    order, then ours (train_<part>, train_steps, ..., eval_img_per_sec)."""
    row = dict(epoch=epoch, **{f'train_{k}': v for k, v in train_metrics.items()},
               **{f'eval_{k}': v for k, v in eval_metrics.items()}, lr=lr)
    return {**{k: row[k] for k in _TIMM_SUMMARY if k in row}, **row}


def append_summary(epoch: int, train_metrics: dict, eval_metrics: dict, path: str, lr: float,
                   log_wandb: bool = False) -> None:
    """Append an epoch's `summary_row` to summary.csv, written atomically: earlier rows survive any crash or failed
    write. The columns are the file's own when it exists (a run resumed in place). With `log_wandb` the row is
    also logged to the active wandb run, as timm's update_summary does."""
    row = summary_row(epoch, train_metrics, eval_metrics, lr)
    if log_wandb:
        import wandb
        wandb.log(row)
    header = None
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, newline='') as f:
            header = next(csv.reader(f), None)

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header or list(row), extrasaction='ignore')
    if not header:
        writer.writeheader()
    writer.writerow(row)

    def write(f):
        if header:
            with open(path, 'rb') as old:
                shutil.copyfileobj(old, f)
        f.write(text.getvalue().encode())
    atomic_write(path, write)


def summary_epochs(path: str) -> list:
    """The epochs summary.csv has rows for (empty when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, newline='') as f:
        return [int(r['epoch']) for r in csv.DictReader(f) if r.get('epoch', '').isdigit()]


def restore_summary_row(path: str, row: Dict[str, Any]) -> None:
    """Append an epoch checkpoint's own summary row (its SUMMARY_ROW) if summary.csv lacks it: a run stopped between
    the two writes (the checkpoint is written first, so summary.csv never lists an epoch that has no checkpoint)."""
    if row['epoch'] not in summary_epochs(path):
        append_summary(row['epoch'], row['train'], row['eval'], path, lr=row['lr'])
        _logger.info(f"Restored the summary row of epoch {row['epoch']} from its checkpoint")


def truncate_summary(path: str, start_epoch: int) -> None:
    """Drop summary rows of epochs >= start_epoch (a run resumed in place trains them again)."""
    if not os.path.exists(path):
        return
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        fields = reader.fieldnames or []
    kept = [r for r in rows if r.get('epoch', '').isdigit() and int(r['epoch']) < start_epoch]
    if len(kept) == len(rows):
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(kept)
    atomic_write_text(path, buffer.getvalue())
    _logger.info(f"Removed {len(rows) - len(kept)} summary row(s) of epochs >= {start_epoch}: they are trained again")


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
                f"{str(path)!r} is not a readable .safetensors file ({_first_line(e)}). {fix}") from None
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


def remove_stale_temporaries(folder: str) -> None:
    """Remove temporary files of saves killed before their rename (their process is gone), and timm's."""
    for path in glob.glob(os.path.join(folder, f'*{_TMP}*')) + [
            os.path.join(folder, name) for name in ('tmp.pth.tar', 'recovery_tmp.pth.tar')]:
        match = _TMP_FILE.match(path)
        pid = int(match.group(1)) if match else None
        if os.path.exists(path) and (pid is None or pid == os.getpid() or not _alive(pid)):
            os.remove(path)
            _logger.info(f"Removed {path!r}, left by a save that was interrupted")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


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

    def adopt_recovery_files(self) -> None:
        """Take over the recovery files of the run resumed in place: the two newest are cleaned up in turn, older
        ones (left by a kill between a save and its clean-up) now."""
        files = []
        for path in glob.glob(os.path.join(self.recovery_dir, f'{self.recovery_prefix}-*{self.extension}')):
            numbers = re.findall(r'\d+', os.path.basename(path))
            if len(numbers) == 2:
                files.append((tuple(map(int, numbers)), path))
        files = [p for _, p in sorted(files)]
        for path in files[:-2]:
            os.remove(path)
            _logger.info(f"Removed {path!r}: older than the two newest recovery checkpoints")
        self.prev_recovery_file, self.curr_recovery_file = ([''] * 2 + files)[-2:]

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
        _fsync_dir(dst)

    def _duplicate(self, src, dst):
        """Hard link (or copy and fsync) to a temporary name, then rename: `dst` is never partial."""
        tmp = f"{dst}{_TMP}{os.getpid()}"
        try:
            super()._duplicate(src, tmp)
            if not self.can_hardlink:
                with open(tmp, 'rb+') as f:
                    os.fsync(f.fileno())
            self._replace(tmp, dst)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise _write_error(dst, e) from None
