"""The run folder: one run per folder, a lock while a run writes there, and atomic writes of its files.

A folder that already holds a run (a `summary.csv` or a checkpoint) is only written by a run
resumed in place (`--resume auto`, or `--resume` of one of its checkpoints): a plain rerun
into it, or a second run started while the first is still writing, would overwrite its
checkpoints and mix its `summary.csv`. Such a start is refused with one line before anything
is written. The lock is an advisory `flock` on `<folder>/.lock`: the kernel releases it when
its process dies however it dies, so a killed run never leaves a folder locked; a finished run
removes the file. Every file of the folder is replaced atomically (`atomic_write`: a temporary file
beside it, fsynced, renamed over it), so a crash or a full disk never leaves a half-written file;
`remove_stale_temporaries` removes those of saves killed before their rename.
"""
import errno
import fcntl
import glob
import logging
import os
import re
from contextlib import ExitStack
from typing import Any, Callable, IO, List, Optional

import torch

from .errors import ConfigError, WriteError, first_line

_logger = logging.getLogger(__name__)

LOCK_FILE = '.lock'


def run_files(folder: str) -> List[str]:
    """The files that make `folder` a run's: summary.csv and checkpoints (*.pth.tar)."""
    names = [os.path.basename(p) for p in glob.glob(os.path.join(folder, '*.pth.tar'))]
    if os.path.isfile(os.path.join(folder, 'summary.csv')):
        names.append('summary.csv')
    return sorted(names)


class RunFolderLock:
    """Holds the lock of one run folder from `acquire` to `release` (a context manager)."""

    def __init__(self, folder: str):
        self.folder = folder
        self._fd: Optional[int] = None

    def acquire(self) -> 'RunFolderLock':
        """Take the folder's lock; a ConfigError naming the holder if another process has it."""
        path = os.path.join(self.folder, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors='replace').strip() or 'another process'
            os.close(fd)
            raise ConfigError(f"output folder {self.folder!r} is in use by a running train.py ({holder}); wait for "
                              "it to finish or choose another --experiment") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(os.path.join(self.folder, LOCK_FILE))
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> 'RunFolderLock':
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def check_run_folder(folder: str, resume_in_place: bool) -> None:
    """A ConfigError if `folder` holds a run that this start would overwrite (see the module docstring)."""
    if resume_in_place or not os.path.isdir(folder):
        return
    existing = run_files(folder)
    if existing:
        shown = ', '.join(existing[:4]) + (f' and {len(existing) - 4} more' if len(existing) > 4 else '')
        raise ConfigError(f"output folder {folder!r} holds another run ({shown}); continue it with --resume auto, "
                          "or choose another --experiment (or --output)")


_TMP = '.tmp-'


_TMP_FILE = re.compile(r'.+\.tmp-(\d+)$')


def fsync_dir(path: str) -> None:
    """fsync the folder of `path`, so that a rename in it is on disk."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(path: str) -> str:
    """Where this process writes `path` before renaming it over `path` (`remove_stale_temporaries` knows it)."""
    return f"{path}{_TMP}{os.getpid()}"


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync, rename over `path`.

    A failure removes the temporary file, leaves `path` as it was and raises a WriteError.
    """
    tmp = temporary_path(path)
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        if isinstance(e, RuntimeError) and _is_torch_write_failure(e):
            raise WriteError(
                f"could not write {path!r}: torch.save failed ({first_line(e)}), e.g. on a full disk; the previous "
                "file is unchanged. Free space or fix permissions, then continue with --resume auto.") from None
        raise


def _is_torch_write_failure(error: RuntimeError) -> bool:
    """torch.save's zip writer reports a failed write (a full disk among them) as a RuntimeError, not an OSError."""
    message = str(error)
    return any(s in message for s in ('PytorchStreamWriter', 'file write failed', 'inline_container'))


def write_error(path: str, error: OSError) -> WriteError:
    """The WriteError of a failed write of `path`, naming the cause (e.g. ENOSPC)."""
    code = f" ({errno.errorcode[error.errno]})" if error.errno in errno.errorcode else ''
    return WriteError(
        f"could not write {path!r}: {error.strerror or error}{code}; the previous file is unchanged. Free space or "
        "fix permissions, then run the same command again (train.py: with --resume auto).")


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to `path` atomically (see `atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))


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


def create_output_dir(folder: str, args_text: str, resume_in_place: bool, cleanup: ExitStack) -> str:
    """Make and lock the run's output folder, check that it holds no other run, write args.yaml.

    The lock is held until `cleanup` closes (see `rundir`). A folder that cannot be written, one in use by
    another run, or one holding a run that this start is not resuming is a ConfigError, and nothing is written.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        cleanup.enter_context(RunFolderLock(folder))
    except OSError as e:
        raise ConfigError(
            f"cannot write to the output folder {folder!r}: {e.strerror}; choose another --output") from None
    check_run_folder(folder, resume_in_place)
    try:
        atomic_write_text(os.path.join(folder, 'args.yaml'), args_text)
    except WriteError as e:
        raise ConfigError(f"cannot write to the output folder {folder!r}: {e}; choose another --output") from None
    return folder
