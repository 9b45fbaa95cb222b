"""The run folder policy: one run per folder, and a lock while a run writes there.

A folder that already holds a run (a `summary.csv` or a checkpoint) is only written by a run
resumed in place (`--resume auto`, or `--resume` of one of its checkpoints): a plain rerun
into it, or a second run started while the first is still writing, would overwrite its
checkpoints and mix its `summary.csv`. Such a start is refused with one line before anything
is written. The lock is an advisory `flock` on `<folder>/.lock`: the kernel releases it when
its process dies however it dies, so a killed run never leaves a folder locked; a finished run
removes the file.
"""
import fcntl
import glob
import os
from typing import List, Optional

from .args import ConfigError

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
