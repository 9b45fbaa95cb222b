"""Mid-epoch recovery: save a run's exact place inside an epoch and continue from there.

A recovery checkpoint (timm's `recovery-<epoch>-<batch>.pth.tar`) is a training checkpoint
plus `position` (epoch, batches done in it, optimizer updates) and, for every process,
`recovery_ranks`: its loader state (see `ResumableLoader`), the epoch's running sums and
its skipped-image record; `runner.checkpoint` writes and reads those keys
(`gather_recovery_states`, `restore_recovery`). This module keeps the loader that can stop and
continue an epoch, and decides when to write one (`RecoveryCheckpoints`). Every file and RNG
state is plain data (tensors, numbers, lists), so it loads with `torch.load(weights_only=True)`.
"""
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from timm.data.loader import MultiEpochsDataLoader

from ..compat import swap_batch_sampler
from .checkpoint import RngState, get_rng_state, set_rng_state
from .errors import Preempted
from .preemption import PreemptionSignal


class ResumableBatchSampler(Sampler[List[int]]):
    """Wrap a loader's batch sampler: note the RNG state as each batch is drawn (`record`); start an epoch mid-way.

    `start(step, rng_states)` makes the next iteration skip the epoch's first `step` batches
    (indices only; no data is read) and restore `rng_states[i]` as it draws its i-th batch
    (the last state once more when the epoch ends first). The order itself comes from the
    wrapped sampler, drawn from the RNG states the epoch began with (`ResumableLoader.epoch_rng`).
    """

    def __init__(self, batch_sampler: Sampler, record: bool = True):
        self.batch_sampler = batch_sampler
        self.record = record
        self.drawn: Deque[Tuple[int, RngState]] = deque()  # (batch number, RNG state as it was drawn)
        self._start = 0
        self._replay: List[RngState] = []

    def start(self, step: int, rng_states: List[RngState]) -> None:
        self._start, self._replay = step, list(rng_states)

    def __iter__(self) -> Iterator[List[int]]:
        start, replay = self._start, self._replay
        self._start, self._replay = 0, []
        self.drawn.clear()
        batches = iter(self.batch_sampler)
        for _ in islice(batches, start):
            pass
        for number, batch in enumerate(batches, start):
            if replay:
                set_rng_state(replay.pop(0))
            if self.record:
                self.drawn.append((number, get_rng_state()))
            yield batch
        if replay:
            set_rng_state(replay[-1])

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def forget_before(self, step: int) -> None:
        """Drop the states of batches the training loop has received (they are no longer in flight)."""
        while self.drawn and self.drawn[0][0] < step:
            self.drawn.popleft()


def inner_data_loader(loader) -> DataLoader:
    """The torch DataLoader inside timm's PrefetchLoader and the replay/indexed loaders (their `.loader`)."""
    while not isinstance(loader, DataLoader):
        loader = loader.loader
    return loader


class ResumableLoader:
    """A training loader that knows how far into the epoch it is, and can continue a stopped epoch.

    Wraps timm's loader or the replay loader. `state_dict()` is the number of batches handed
    out this epoch, the RNG states the epoch began with (the sample order is drawn from them), and
    the RNG states to replay: those the stopped run had when it drew the
    batches still in flight (prefetched, not yet trained on), then its state at the
    checkpoint. After `load_state_dict()` the next epoch skips the batches done and replays
    those states, so with `--workers 0` the rest of the epoch is the one the stopped run
    would have had, augmentations included. With worker processes the sample order is, but
    augmentations happen in the workers, whose RNG states are not saved: only the state at the
    checkpoint is restored (and none is noted per batch, which costs ~0.1 ms). Streaming
    (iterable) datasets cannot skip batches without reading them, and timm's multi-epochs
    loader runs one pass on across epochs: `resumable` is False, and `not_resumable` says why.
    """

    def __init__(self, loader):
        self.loader = loader
        data_loader = inner_data_loader(loader)
        # timm's ScheduledBatchSampler: its epoch sets the batch shapes (and its sampler's order)
        self._epoch_batch_sampler = data_loader.batch_sampler if hasattr(data_loader.batch_sampler, 'set_epoch') \
            else None
        self.batch_sampler: Optional[ResumableBatchSampler] = None
        self.not_resumable = ''
        if isinstance(data_loader, MultiEpochsDataLoader):
            self.not_resumable = '--use-multi-epochs-loader runs one loader pass on across epochs, so an epoch ' \
                                 'cannot resume mid-way'
        elif isinstance(data_loader.dataset, IterableDataset):
            self.not_resumable = 'a streaming dataset cannot resume mid-epoch'
        else:
            sampler = ResumableBatchSampler(data_loader.batch_sampler, record=data_loader.num_workers == 0)
            if swap_batch_sampler(data_loader, sampler):
                self.batch_sampler = sampler
            else:
                self.not_resumable = f'torch {torch.__version__} cannot resume mid-epoch'
        self.consumed = 0
        self.epoch_rng: Optional[RngState] = None  # the RNG states as this epoch began: its order was drawn from them
        self._start: Tuple[int, List[RngState], Optional[RngState]] = (0, [], None)

    @property
    def resumable(self) -> bool:
        """Whether an epoch can stop and continue mid-way (else `not_resumable` says why)."""
        return self.batch_sampler is not None

    def __iter__(self) -> Iterator[Any]:
        step, rng_states, epoch_rng = self._start
        self._start = (0, [], None)
        if epoch_rng is not None:  # a resumed epoch: draw its order (the sampler's permutation) as the stopped run did
            set_rng_state(epoch_rng)
        self.epoch_rng = get_rng_state()
        if self.batch_sampler is not None:
            self.batch_sampler.start(step, rng_states)
        self.consumed = step
        for batch in self.loader:
            self.consumed += 1
            if self.batch_sampler is not None:
                self.batch_sampler.forget_before(self.consumed)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order: the replay loader's, timm's scheduled batch sampler's, or the
        DistributedSampler's; and a dataset's own that orders itself by epoch (timm's NaFlex loader's, a streaming
        one's), as timm's train.py does."""
        if hasattr(self.loader, 'set_epoch'):
            self.loader.set_epoch(epoch)
        elif self._epoch_batch_sampler is not None:
            self._epoch_batch_sampler.set_epoch(epoch)
        elif hasattr(self.loader.sampler, 'set_epoch'):
            self.loader.sampler.set_epoch(epoch)
        dataset = inner_data_loader(self.loader).dataset
        if hasattr(dataset, 'set_epoch'):
            dataset.set_epoch(epoch)

    def state_dict(self) -> Dict[str, Any]:
        """Batches done this epoch, and the RNG states to replay from there (collect at the checkpoint)."""
        if not self.resumable:
            raise RuntimeError(self.not_resumable)
        in_flight = [state for number, state in self.batch_sampler.drawn if number >= self.consumed]
        return dict(step=self.consumed, rng=in_flight + [get_rng_state()], epoch_rng=self.epoch_rng)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Start the next epoch (the one the state was saved in) after its first `step` batches."""
        if state['step'] and not self.resumable:
            raise ValueError(self.not_resumable)
        self._start = (int(state['step']), list(state['rng']), state.get('epoch_rng'))


@dataclass(kw_only=True)
class RecoveryCheckpoints:
    """Called after each optimizer step: write a recovery checkpoint every `interval` steps, and on preemption.

    On a preemption signal it writes one (every rank contributes its state; rank 0 writes),
    then raises `Preempted`. `collect(epoch, num_updates, loader, meter, skipped)` returns the
    checkpoint's extra keys (`runner.checkpoint.gather_recovery_states`, a collective call under
    DDP); `saver` is None on other ranks.
    """
    interval: int
    loader: ResumableLoader
    preemption: PreemptionSignal
    collect: Callable[..., Dict[str, Any]]
    saver: Any = None
    skipped: Any = None
    last_path: Optional[str] = field(default=None, init=False)

    def __call__(self, epoch: int, num_updates: int, meter) -> None:
        stop = self.preemption.stopping()
        if not stop and not (self.interval and num_updates % self.interval == 0):
            return
        if not self.loader.resumable:  # stop; the last epoch checkpoint is where to resume
            raise Preempted(f"preempted by {self.preemption.name} in epoch {epoch}; {self.loader.not_resumable}: "
                            "--resume auto continues from the last epoch checkpoint")
        meter.check_finite(epoch)
        step = self.loader.consumed
        extra = self.collect(epoch, num_updates, self.loader, meter, self.skipped)
        if self.saver is not None:
            self.last_path = self.saver.save_recovery(epoch, step, extra=extra)
        if stop:
            self.preemption.barrier()
            where = f"; recovery checkpoint {self.last_path!r}" if self.last_path else ''
            raise Preempted(f"preempted by {self.preemption.name} after step {step} of epoch {epoch} "
                            f"(update {num_updates}){where}. Resume with the same command and --resume auto.")
