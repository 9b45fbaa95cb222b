"""SelfDistillationTask: the protocol between the training loop and a self-distillation task.

timm's training loop calls `task(input, target)` and reads `loss`. A task that distils from
itself needs more from the loop, and the loop (`sdpgo_timm.runner.engine`) needs to know a few
things about the task; this base class names both sides, so that neither peeks at the other:

- the loaders yield a `Batch`: input, target, the rows' dataset indices when the task needs
  them, and `fresh_start`, where the fresh half starts when the batch begins with a half
  replayed from the previous step (`sdpgo_timm.data.replay`);
- `forward(input, target, index=None, loss_scale=1.0)`: `index` is the batch's, `loss_scale`
  the factor the loss is multiplied by before backward (AMP scale / accumulation steps), for
  tasks that read gradients;
- `loss_parts`: the scalar entries `forward` returns beside `loss`, `output` and `target`; the
  loop averages and logs each of them (`train_<name>` in summary.csv) and knows no names;
- `prepare(batch, mixup_fn)`: the `Step` the loop forwards for a loader batch: its input and
  target (Mixup applied), the keyword arguments of `forward` and the number of new samples. The
  default drops the replayed rows the task has no teacher for (`replay_rows(num_replay)`; the
  first step feeds the fresh half alone) and mixes the replay half as it was mixed before;
  `prepare_step` gives timm's tasks their plain step;
- `set_epoch(epoch)` at every epoch start, and `state_shared_across_ranks`: whether the
  task state (`get_task_state`) is the same on every rank, so that rank 0's copy is saved once;
- `training_state()` / `load_training_state(state)`: what the task keeps between steps and a
  resume restores; timm's `get_task_state` / `load_task_state` carry it for the trained model,
  none for its EMA copy (weights only), and a checkpoint without it leaves the task fresh;
- `log_sample_weights()` / `sample_weights()`: a task that weighs its self-teacher per sample (SDPGO's α)
  can keep each weight with its dataset index, so that the run can ask how the weights relate to the
  labels (e.g. whether flipped labels get more trust in the self-teacher under `--label-noise`).

SDPGO (`sdpgo_timm.task.SDPGOTask`), DLB in both forms and PS-KD (`sdpgo_timm.skd`) subclass it.
"""
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch
from timm.task import TrainingTask


class Batch(NamedTuple):
    """One training batch as the loaders of this package yield it.

    `index`: the rows' int64 dataset indices, for tasks that look samples up, else None.
    `fresh_start`: the row where the fresh half starts; the rows before it replay the previous
    step's fresh half (0: no replay half).
    """
    input: torch.Tensor
    target: torch.Tensor
    index: Optional[torch.Tensor] = None
    fresh_start: int = 0


def as_batch(batch: Union[Batch, Tuple[torch.Tensor, ...]]) -> Batch:
    """A Batch from what a loader yields: a Batch, or timm's (input, target) pair."""
    return batch if isinstance(batch, Batch) else Batch(*batch)


class Step(NamedTuple):
    """What the loop forwards for one batch: `task(input, target, **kwargs)`; `num_new` of its rows are samples
    not trained on before (the epoch's sample count)."""
    input: Any  # a tensor, or a NaFlex dict of patches
    target: torch.Tensor
    kwargs: Dict[str, Any]
    num_new: int


class SelfDistillationTask(TrainingTask):
    """A timm TrainingTask that distils from the model itself; see the module docstring for the protocol."""

    #: the entries of `forward`'s result, besides loss/output/target, that the loop averages and logs
    loss_parts: Tuple[str, ...] = ()
    #: whether `get_task_state()` is the same on every rank (saved once, from rank 0)
    state_shared_across_ranks: bool = False

    def forward(
            self,
            input: torch.Tensor,
            target: torch.Tensor,
            index: Optional[torch.Tensor] = None,
            loss_scale: Union[float, torch.Tensor] = 1.0,
    ):
        raise NotImplementedError

    def prepare(self, batch: Batch, mixup_fn: Optional[Callable] = None) -> Step:
        """The step for a loader batch (already on the device): the replayed rows this step can use
        (`replay_rows`), Mixup (the replay half keeps its recorded mix), and the rows' indices for `forward`."""
        input, target, index, num_replay = batch.input, batch.target, batch.index, 0
        if batch.fresh_start:
            num_replay = self.replay_rows(batch.fresh_start)
            skip = batch.fresh_start - num_replay  # replayed rows without a teacher
            input, target = input[skip:], target[skip:]
            index = index[skip:] if index is not None else None
        if mixup_fn is not None:
            input, target = mixup_fn(input, target, num_replay) if num_replay else mixup_fn(input, target)
        return Step(input, target, dict(index=index), len(target) - num_replay)

    def replay_rows(self, num_replay: int) -> int:
        """How many of a batch's `num_replay` replayed rows this step can use (all, by default)."""
        return num_replay

    def set_epoch(self, epoch: int) -> None:
        """Called at every epoch start (0-based); nothing by default."""

    def training_state(self) -> Dict[str, Any]:
        """What the task keeps between steps, for a resume to restore (nothing by default)."""
        return {}

    def load_training_state(self, state: Dict[str, Any]) -> None:
        """Restore a `training_state()` (nothing by default)."""

    def get_task_state(self, module: Optional[torch.nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """timm's task state: `training_state()`; none for the EMA model, which copies the weights only."""
        return {} if ema else self.training_state()

    def load_task_state(
            self,
            state: Optional[Dict[str, Any]],
            strict: bool = True,
            module: Optional[torch.nn.Module] = None,
            ema: bool = False,
    ) -> None:
        """Load timm's task state into `load_training_state`; nothing for the EMA model, and a checkpoint without
        one (saved by a task that kept nothing yet) leaves the task as it is."""
        if state and not ema:
            self.load_training_state(state)

    def log_sample_weights(self) -> bool:
        """Keep, from now on, each sample's self-teacher weight with its dataset index (for `sample_weights`);
        returns whether this task has per-sample weights to keep (none by default)."""
        return False

    def sample_weights(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(dataset indices, weights) kept since the previous call, on the CPU; None when none are kept."""
        return None


def prepare_step(task: TrainingTask, batch: Batch, mixup_fn: Optional[Callable] = None) -> Step:
    """The step of `batch` for any timm task: a self-distillation task prepares its own, timm's own tasks take the
    batch as it is (Mixup applied), every row new."""
    if isinstance(task, SelfDistillationTask):
        return task.prepare(batch, mixup_fn)
    input, target = (batch.input, batch.target) if mixup_fn is None else mixup_fn(batch.input, batch.target)
    return Step(input, target, {}, len(target))
