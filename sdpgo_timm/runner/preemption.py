"""Preemption: stop on SIGTERM / SIGUSR1 / SIGINT / SIGHUP at a step every process agrees on.

Clusters announce a preemption with a signal (SIGTERM from Kubernetes, torchrun and SLURM's
`scancel`; SIGUSR1 from `sbatch --signal`) some time before they kill the job; a person at
the terminal presses Ctrl-C (SIGINT) or loses it (SIGHUP: a closed window, a dropped ssh
connection), which are treated the same way (a second Ctrl-C stops at once, saving nothing).
`PreemptionSignal` only records the signal; the training loop asks `stopping()` after each
optimizer step, writes a recovery checkpoint when it says so and raises `Preempted`, which
train.py turns into exit status 4. Under DDP the flag is all-reduced every step, so all
ranks stop after the same step even when only one of them was signalled; the result is
read one step later, so the check never waits on the device.
"""
import logging
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist


_logger = logging.getLogger(__name__)

# SIGHUP: the terminal closed (an ssh connection dropped, a window closed)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


class Interrupted(Exception):
    """A signal received inside `PreemptionSignal.raising()`; its message is the signal's name."""


class PreemptionSignal:
    """Record SIGTERM / SIGUSR1 / SIGINT / SIGHUP while active (a context manager); tell all ranks alike when to stop.

    Args:
        distributed: all-reduce the flag so that every rank stops after the same step.
        device: device of the flag tensor (the process's device: NCCL reduces CUDA tensors).
    """

    def __init__(self, distributed: bool = False, device: Optional[torch.device] = None):
        self.distributed = distributed
        self.device = device
        self.received: Optional[int] = None
        self._previous = {}
        self._flags: List[torch.Tensor] = []  # two, used in turn: one may still be in an all-reduce
        self._pending: Optional[Tuple[torch.Tensor, object]] = None

    def __enter__(self) -> 'PreemptionSignal':
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        if self._pending is not None:
            self._pending[1].wait()
            self._pending = None

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a recovery checkpoint
        if self.received is None:
            _logger.warning(f"Received {signal.Signals(signum).name}: stopping after this step to save a recovery "
                            "checkpoint")
        self.received = signum

    @contextmanager
    def raising(self) -> Iterator[None]:
        """While active, a signal raises Interrupted at once (so does one received before): for work that has no
        step to stop at, such as an upload."""
        if self.received is not None:
            raise Interrupted(self.name)

        def handle(signum, frame):
            raise Interrupted(signal.Signals(signum).name)
        previous = {signum: signal.signal(signum, handle) for signum in self._previous}  # where __enter__ set them
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @property
    def name(self) -> str:
        """The signal received, as its name ('a signal to another rank' when only another rank got one)."""
        return signal.Signals(self.received).name if self.received else 'a signal to another rank'

    def stopping(self, wait: bool = False) -> bool:
        """Whether to stop now; the same answer on every rank when called at the same step.

        Under DDP the answer is the flag reduced at the previous call (`wait=True`: at this one).
        """
        if not self.distributed:
            return self.received is not None
        if not self._flags:
            self._flags = [torch.zeros(1, dtype=torch.int32, device=self.device) for _ in range(2)]
        self._flags.reverse()
        flag = self._flags[0].fill_(0 if self.received is None else 1)  # a kernel, no host-to-device copy
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        previous, self._pending = self._pending, (flag, work)
        stop = False
        if previous is not None:
            previous[1].wait()
            stop = bool(previous[0].item())
        if wait:
            work.wait()
            self._pending = None
            stop = stop or bool(flag.item())
        return stop

    def barrier(self) -> None:
        """Wait until every rank got here (rank 0 has finished writing) before exiting."""
        if self.distributed:
            dist.barrier()
