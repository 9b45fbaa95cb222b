"""PS-KD (Kim et al., ICCV 2021): progressive self-knowledge distillation as a timm task.

A sample's target is softened with the model's own prediction for it one epoch earlier:
t_i = (1 − α_t)·y_i + α_t·p_i, α_t = α_T·epoch/epochs. The predictions p live in a per-sample
table (N × C, fp32) that every training step refreshes with its batch's softmax, so the next
epoch reads them. The sampler hands a sample to another rank next epoch, so under DDP every
rank writes the rows of every rank. Rows need their dataset index: see
`sdpgo_timm.data.replay.create_indexed_loader`.
"""
import logging
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from timm.data.mixup import one_hot
from timm.loss import SoftTargetCrossEntropy
from timm.task import ClassificationTask
from timm.utils import unwrap_model

from ..protocol import SelfDistillationTask
from ..sil import per_sample_kl, teacher_probabilities

_logger = logging.getLogger(__name__)


def _all_gather_rows(index: torch.Tensor, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(index, rows) of this step from every rank, in rank order; as given when not distributed.

    Every rank must pass the same number of rows, as timm's distributed samplers and
    drop_last training loaders (and the ReplayBatchSampler) guarantee.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return index, rows
    world = dist.get_world_size()
    indices = [torch.empty_like(index) for _ in range(world)]
    gathered = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(indices, index.contiguous())
    dist.all_gather(gathered, rows.contiguous())
    return torch.cat(indices), torch.cat(gathered)


def _last_write_wins(index: torch.Tensor, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(index, rows) where each repeated index carries the row of its last occurrence.

    `index_copy_` keeps an unspecified one of several rows written to the same index (CUDA),
    so ranks could disagree on a sample seen twice in a step (padding, repeated augmentation);
    writing the same row for every duplicate keeps all tables equal, without a host sync.
    """
    sorted_index, order = torch.sort(index, stable=True)
    last = torch.searchsorted(sorted_index, sorted_index, right=True) - 1
    return sorted_index, rows[order[last]]


class PSKDTask(SelfDistillationTask, ClassificationTask):
    """PS-KD: cross-entropy to the target softened with the sample's last-epoch prediction.

    Trains the plain timm model like timm's ClassificationTask (DDP wraps the model), with
    timm's SoftTargetCrossEntropy as the criterion. Call `set_epoch(epoch)` (0-based, as timm's
    train loop counts) at every epoch start; α_t = α_T·min(epoch / epochs, 1), so epoch 0 is
    plain CE, and a sample not seen yet uses its target alone. (The authors' code uses
    (epoch + 1) / epochs; here the last epoch, epochs − 1, uses α_T·(epochs − 1)/epochs.)

    Args:
        model: a timm model.
        num_samples: N, the length of the training set (rows of the table).
        epochs: length of the α schedule in epochs.
        alpha_t: α_T, the weight of the previous prediction at the end of the schedule.
        smoothing: label smoothing of class-index targets; soft (Mixup/CutMix) targets are
            used as given, already smoothed by timm's Mixup.
        table_device: where the N×C table lives: 'cpu' (default, as the authors: it costs
            N·C·4 bytes per process) or a device; None keeps it on the task's device.

    Call `task(input, target, index, loss_scale=1.0)` (the SelfDistillationTask protocol); `index`
    holds the rows' dataset indices, `loss_scale` is not used.
    Under Mixup/CutMix the table keeps the prediction of the mixed image under the row's
    index (a choice; the paper does not say).
    """
    #: the table is all-gathered at every step, so rank 0's copy is the state of every rank
    state_shared_across_ranks = True
    loss_parts = ('loss_ce', 'loss_sil', 'alpha')

    def __init__(
            self,
            model: nn.Module,
            num_samples: int,
            *,
            epochs: int,
            alpha_t: float = 0.8,
            smoothing: float = 0.0,
            table_device: Optional[Union[str, torch.device]] = 'cpu',
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        if num_samples < 1:
            raise ValueError(f"pskd num_samples must be >= 1, got {num_samples}")
        if epochs < 1:
            raise ValueError(f"pskd epochs must be >= 1, got {epochs}")
        if not 0.0 <= alpha_t <= 1.0:
            raise ValueError(f"pskd alpha_t must be in [0, 1], got {alpha_t}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        super().__init__(model, criterion=SoftTargetCrossEntropy(), device=device, dtype=dtype, verbose=verbose)
        self.num_classes = unwrap_model(model).num_classes
        self.epochs = epochs
        self.alpha_t = alpha_t
        self.smoothing = smoothing
        self.table_device = table_device
        self.epoch = 0
        where = self._table_device()
        self.table = torch.zeros(num_samples, self.num_classes, dtype=torch.float32, device=where)
        self.seen = torch.zeros(num_samples, dtype=torch.bool, device=where)
        if self.verbose:
            _logger.info(
                f"PSKDTask: alpha_T={alpha_t} epochs={epochs} table={num_samples}x{self.num_classes} on {where}")

    @property
    def alpha(self) -> float:
        """α_t of the current epoch."""
        return self.alpha_t * min(self.epoch / self.epochs, 1.0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose α_t the next steps use."""
        self.epoch = epoch

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The plain timm model, not its DDP wrapper (or the compiled model after `compile`)."""
        resolved = super().get_eval_model(module=module, ema=ema)
        return resolved.module if isinstance(resolved, DistributedDataParallel) else resolved

    def training_state(self) -> Dict[str, Any]:
        """The prediction table (the same on every rank) and the epoch."""
        return dict(table=self.table, seen=self.seen, epoch=self.epoch)

    def load_training_state(self, state: Dict[str, Any]) -> None:
        """Restore the table (onto `table_device`) and the epoch; a table of another shape is refused."""
        if tuple(state['table'].shape) != tuple(self.table.shape):
            raise ValueError(
                f"PS-KD table in the checkpoint is {tuple(state['table'].shape)}, this task needs "
                f"{tuple(self.table.shape)} (num_samples x num_classes)")
        where = self._table_device()
        self.table = state['table'].to(where, torch.float32)
        self.seen = state['seen'].to(where)
        self.epoch = state['epoch']

    def _table_device(self) -> torch.device:
        return self.device if self.table_device is None else torch.device(self.table_device)

    def _dense_target(self, target: torch.Tensor) -> torch.Tensor:
        """y as (B, C) fp32: smoothed one-hot rows for class indices, soft targets as given."""
        if target.ndim == 2:
            return target.float()
        off = self.smoothing / self.num_classes
        return one_hot(target, self.num_classes, on_value=1.0 - self.smoothing + off, off_value=off)

    def _lookup(self, index: torch.Tensor, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Previous predictions and seen flags of the rows, on `device`."""
        where = self._table_device()
        if self.table.device != where:
            self.table, self.seen = self.table.to(where), self.seen.to(where)
        rows = index.to(where)
        return self.table[rows].to(device), self.seen[rows].to(device)

    def _update(self, index: torch.Tensor, prob: torch.Tensor) -> None:
        """Write this step's predictions of every rank into the table."""
        index, prob = _all_gather_rows(index, prob)
        index, prob = _last_write_wins(index.to(self.table.device), prob.to(self.table.device))
        self.table.index_copy_(0, index, prob)
        self.seen[index] = True

    def forward(
            self,
            input: torch.Tensor,
            target: torch.Tensor,
            index: Optional[torch.Tensor] = None,
            loss_scale: Union[float, torch.Tensor] = 1.0,
    ) -> Dict[str, torch.Tensor]:
        """One PS-KD step.

        Returns loss (CE to the softened target), output (logits), target (as given), loss_ce
        (mean CE to y), loss_sil (the KD term: mean KL(p_prev ‖ softmax(z)) over rows that
        have a previous prediction, 0 without; not weighted by α_t) and alpha (α_t).
        """
        if index is None:
            raise ValueError(
                "PS-KD needs the dataset index of every row: task(input, target, index) "
                "(see sdpgo_timm.data.replay.create_indexed_loader)")
        logits = self.trainable_module(input)
        y = self._dense_target(target)
        prev, seen = self._lookup(index, logits.device)
        alpha = self.alpha
        soft_target = torch.where(seen.unsqueeze(1), (1.0 - alpha) * y + alpha * prev, y)
        loss = self.criterion(logits, soft_target)
        with torch.no_grad():
            loss_ce = self.criterion(logits, y)
            loss_sil = per_sample_kl(prev, logits, 1.0).mul(seen).sum() / seen.sum().clamp_min(1)
        if torch.is_grad_enabled():
            self._update(index, teacher_probabilities(logits, 1.0))
        return dict(
            loss=loss,
            output=logits,
            target=target,
            loss_ce=loss_ce,
            loss_sil=loss_sil,
            alpha=logits.new_full((), alpha, dtype=torch.float32),
        )
