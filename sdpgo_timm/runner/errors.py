"""The ways a run ends early, each with the exit status train.py returns for it.

Every error here carries its one-line message (naming the problem and the fix) and its exit
status, so that a script's `main` needs one `except RunError` to report any of them.
"""
import re
from typing import Optional

import torch

DONE = 0
PUSH_FAILED = 1  # trained and saved; only the Hub upload failed
BAD_INPUT = 2  # stopped before training and before writing anything
NON_FINITE_LOSS = 3
PREEMPTED = 4  # a recovery checkpoint was written: resume with --resume auto
WRITE_FAILED = 5  # earlier checkpoints are intact
OUT_OF_MEMORY = 6  # earlier checkpoints are intact
INTERRUPTED = 130  # a second Ctrl-C, as shells report a process ended by SIGINT (128 + 2)


class RunError(Exception):
    """A run that cannot go on; `exit_status` is what train.py returns, `line()` what it prints."""
    exit_status = 1
    prefix = 'error: '

    def line(self) -> str:
        return self.prefix + str(self)


class ConfigError(RunError, ValueError):
    """A configuration file or option that cannot be used; the message says how to fix it."""
    exit_status = BAD_INPUT


class CheckpointError(RunError, ValueError):
    """A file that cannot be used as a checkpoint; the message says why and what to do."""
    exit_status = BAD_INPUT


class NonFiniteLossError(RunError, RuntimeError):
    """The training loss became NaN or inf; the run stops without saving."""
    exit_status = NON_FINITE_LOSS


class Preempted(RunError):
    """The run stopped on a preemption signal after saving where it was; resume with --resume auto."""
    exit_status = PREEMPTED
    prefix = ''


class WriteError(RunError, RuntimeError):
    """A checkpoint or run file could not be written (disk full, permissions); the previous one is intact."""
    exit_status = WRITE_FAILED


class OutOfMemory(RunError):
    """The device (or the host) ran out of memory; `out_of_memory` builds it from torch's error."""
    exit_status = OUT_OF_MEMORY


def out_of_memory(error: BaseException, batch_size: int) -> Optional[OutOfMemory]:
    """An OutOfMemory naming the batch size and the peak (CUDA) or the allocation that failed (CPU) when `error` is
    torch's out-of-memory error (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError) or Python's
    MemoryError; None for any other error."""
    message = str(error)
    if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
        detail = f"CUDA, peak {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB allocated"
    elif isinstance(error, (torch.OutOfMemoryError, MemoryError)) or 'DefaultCPUAllocator' in message:
        tried = re.search(r'allocate (\d+) bytes', message)
        detail = f"an allocation of {int(tried.group(1)) / 2 ** 30:.2f} GiB failed" if tried else 'host memory'
    else:
        return None
    return OutOfMemory(f"out of memory at --batch-size {batch_size} ({detail}): lower --batch-size (add "
                       "--grad-accum-steps to keep the effective batch) or --img-size; checkpoints already written "
                       "are intact")


class PushFailed(RunError):
    """The run finished and is saved, but pushing it to the Hub failed."""
    exit_status = PUSH_FAILED


def one_line(error: Exception, limit: int = 300) -> str:
    """An exception's message on one line (load_state_dict's spans several), cut at `limit` characters."""
    return ' '.join(str(error).split())[:limit]


def first_line(error: Exception) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
