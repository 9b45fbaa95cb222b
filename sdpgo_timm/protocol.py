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
- `replay_rows(num_replay)`: how many of a batch's replayed rows the task can use now; 0 when
  it has no teacher for them (the loop then feeds the fresh half alone);
- `set_epoch(epoch)` at every epoch start, and `state_shared_across_ranks`: whether the
  task state (`get_task_state`) is the same on every rank, so that rank 0's copy is saved once;
- `log_sample_weights()` / `sample_weights()`: a task that weighs its self-teacher per sample (SDPGO's α)
  can keep each weight with its dataset index, so that the run can ask how the weights relate to the
  labels (e.g. whether flipped labels get more trust in the self-teacher under `--label-noise`).

SDPGO (`sdpgo_timm.task.SDPGOTask`), DLB in both forms and PS-KD (`sdpgo_timm.skd`) subclass it.
"""
from typing import NamedTuple, Optional, Tuple, Union

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

    def replay_rows(self, num_replay: int) -> int:
        """How many of a batch's `num_replay` replayed rows this step can use (all, by default)."""
        return num_replay

    def set_epoch(self, epoch: int) -> None:
        """Called at every epoch start (0-based); nothing by default."""

    def log_sample_weights(self) -> bool:
        """Keep, from now on, each sample's self-teacher weight with its dataset index (for `sample_weights`);
        returns whether this task has per-sample weights to keep (none by default)."""
        return False

    def sample_weights(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(dataset indices, weights) kept since the previous call, on the CPU; None when none are kept."""
        return None
