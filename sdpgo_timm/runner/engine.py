"""Training and validation loops shared by train.py and validate.py.

One loop serves plain timm training (ClassificationTask) and the self-distillation tasks, which
it talks to only through the SelfDistillationTask protocol (`sdpgo_timm.protocol`): the loader
yields a `Batch` (or timm's (input, target) pair), Mixup is applied here, the task computes the
loss and names the loss parts to log, timm's NativeScaler (or a plain backward) steps the
optimizer, and the epoch's metrics come back as a dict. Their running sums live in a
`TrainMeter`, which a recovery checkpoint saves to continue an epoch.
"""
import logging
import math
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from timm.task import TrainingTask
from timm.utils import AverageMeter, accuracy, dispatch_clip_grad, reduce_tensor

from ..compat import amp_loss_scale
from ..protocol import Batch, SelfDistillationTask, as_batch
from .errors import NonFiniteLossError

_logger = logging.getLogger(__name__)


class Progress:
    """A one-line progress bar on an interactive terminal, periodic log lines otherwise.

    The text (which reads device values) is only built every `interval` steps, so logging
    adds no per-step host sync.
    """

    def __init__(self, total: int, interval: int, enabled: bool = True):
        self.total = total
        self.interval = max(1, interval)
        self.tty = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.text = ''

    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step + 1 == self.total

    def update(self, step: int, text: Callable[[], str]) -> None:
        if not self.enabled:
            return
        due = self.due(step)
        if due:
            self.text = text()
        if self.tty:
            filled = int(30 * (step + 1) / max(1, self.total))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {step + 1}/{self.total} {self.text}")
            if step + 1 == self.total:
                sys.stderr.write('\n')
            sys.stderr.flush()
        elif due:
            _logger.info(f"[{step + 1:>4d}/{self.total}] {self.text}")


class TrainMeter:
    """Running sums of one epoch's loss and the task's loss parts, and its counts, on the device (no per-step
    host sync).

    `state_dict()` goes into recovery checkpoints, so that an epoch resumed mid-way reports
    the same means as one never stopped; `batches` is how many loader batches it has seen.
    """

    def __init__(self, device: torch.device, parts: Sequence[str] = ()):
        self.sums = {k: torch.zeros((), device=device) for k in ('loss', *parts)}
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.batches = self.steps = self.fresh_seen = self.model_seen = 0

    def update(self, out: Dict[str, torch.Tensor], loss: torch.Tensor, fresh: int) -> None:
        n = len(out['output'])
        self.model_seen += n
        self.fresh_seen += fresh
        self.batches += 1
        self.finite &= torch.isfinite(loss.detach())
        for key, total in self.sums.items():  # no per-step set or list: this runs every step
            total += (loss if key == 'loss' else out[key]).detach().float() * n

    def means(self) -> Dict[str, float]:
        return {k: v.item() / max(self.model_seen, 1) for k, v in self.sums.items()}

    def check_finite(self, epoch: int) -> None:
        """Raise NonFiniteLossError once a non-finite loss was seen (reads the device: call at log points)."""
        if not self.finite.item():
            raise NonFiniteLossError(
                f"non-finite loss in epoch {epoch} (by step {self.batches - 1}); stopping without saving. "
                "Lower --lr, use --clip-grad, or check the data.")

    def state_dict(self) -> Dict[str, Any]:
        return dict(sums={k: v.detach().cpu() for k, v in self.sums.items()}, finite=bool(self.finite.item()),
                    batches=self.batches, steps=self.steps, fresh_seen=self.fresh_seen, model_seen=self.model_seen)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sums = {k: v.to(self.finite.device) for k, v in state['sums'].items()}
        self.finite.fill_(state['finite'])
        self.batches, self.steps = state['batches'], state['steps']
        self.fresh_seen, self.model_seen = state['fresh_seen'], state['model_seen']


def train_one_epoch(
        epoch: int,
        task: TrainingTask,
        loader,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        lr_scheduler=None,
        mixup_fn: Optional[Callable] = None,
        loss_scaler=None,
        amp_autocast=nullcontext,
        grad_accum_steps: int = 1,
        clip_grad: Optional[float] = None,
        clip_mode: str = 'norm',
        channels_last: bool = False,
        num_updates: int = 0,
        world_size: int = 1,
        log_interval: int = 50,
        log_enabled: bool = True,
        meter: Optional[TrainMeter] = None,
        on_step: Optional[Callable[[int, TrainMeter], None]] = None,
        synchronize_step: bool = False,
) -> Dict[str, float]:
    """Train one epoch; returns the mean loss and loss parts, counts of optimizer steps and fresh samples.

    A batch's rows before its `fresh_start` replay the previous step's fresh half; the task says how many of
    them it can use (`replay_rows`). `meter` continues an epoch stopped after `meter.batches` batches (the
    loader must start there); `on_step(num_updates, meter)` runs after each optimizer step, after the device
    is synchronized if `synchronize_step` (timm's --synchronize-step).
    """
    skd = isinstance(task, SelfDistillationTask)  # takes sample indices and the loss scale; timm's tasks do not
    task.train()
    meter = meter if meter is not None else TrainMeter(device, getattr(task, 'loss_parts', ()))
    num_batches = len(loader)
    progress = Progress(num_batches, log_interval, log_enabled)
    first_seen = meter.model_seen
    start = time.time()
    parameters = list(task.get_clip_parameters())
    optimizer.zero_grad()
    for batch_idx, batch in enumerate(loader, meter.batches):
        batch: Batch = as_batch(batch)
        input, target, index, num_replay = batch.input.to(device), batch.target.to(device), batch.index, 0
        if batch.fresh_start:
            num_replay = task.replay_rows(batch.fresh_start)
            skip = batch.fresh_start - num_replay  # replayed rows the task has no teacher for
            input, target = input[skip:], target[skip:]
            index = index[skip:] if index is not None else None
        if mixup_fn is not None:
            input, target = mixup_fn(input, target, num_replay) if num_replay else mixup_fn(input, target)
        if channels_last:
            input = input.contiguous(memory_format=torch.channels_last)

        update = (batch_idx + 1) % grad_accum_steps == 0 or batch_idx + 1 == num_batches
        scale = amp_loss_scale(loss_scaler) / grad_accum_steps
        sync = nullcontext() if update else task.no_sync()
        with sync:
            with amp_autocast():
                out = task(input, target, index=index, loss_scale=scale) if skd else task(input, target)
            loss = out['loss']
            if loss_scaler is not None:
                loss_scaler(loss / grad_accum_steps, optimizer, clip_grad=clip_grad, clip_mode=clip_mode,
                            parameters=parameters, need_update=update)
            else:
                (loss / grad_accum_steps).backward()
                if update:
                    if clip_grad is not None:
                        dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
                    optimizer.step()
        meter.update(out, loss, len(input) - num_replay)
        if update:
            optimizer.zero_grad()
            task.update_ema(step=num_updates)
            num_updates += 1
            meter.steps += 1
            if lr_scheduler is not None:
                lr_scheduler.step_update(num_updates=num_updates)
            if synchronize_step and device.type == 'cuda':
                torch.cuda.synchronize(device)
            if on_step is not None:
                on_step(num_updates, meter)
        if progress.due(batch_idx):
            meter.check_finite(epoch)
        progress.update(batch_idx, lambda: _status(meter, world_size, start, first_seen))

    meter.check_finite(epoch)
    elapsed = time.time() - start
    metrics = meter.means()
    metrics.update(
        steps=meter.steps, samples=meter.fresh_seen * world_size,
        img_per_sec=(meter.model_seen - first_seen) * world_size / max(elapsed, 1e-6), epoch_time=elapsed,
        num_updates=num_updates)
    return metrics


def _status(meter: TrainMeter, world_size: int, start: float, first_seen: int) -> str:
    means = meter.means()
    parts = [f"loss {means['loss']:.4f}"] + [f"{k} {v:.3f}" for k, v in means.items() if k != 'loss']
    rate = (meter.model_seen - first_seen) * world_size / max(time.time() - start, 1e-6)
    return ' '.join(parts) + f" {rate:.1f} img/s"


@torch.no_grad()
def validate(
        model: nn.Module,
        loader,
        *,
        device: torch.device,
        amp_autocast=nullcontext,
        channels_last: bool = False,
        distributed: bool = False,
        world_size: int = 1,
        log_interval: int = 0,
        on_output: Optional[Callable[[torch.Tensor], None]] = None,
) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%), mean cross-entropy and throughput of a model on a loader.

    `log_interval` > 0 logs the running metrics every that many batches (validate.py's --log-freq);
    `on_output(logits)` sees every batch's output in loader order (e.g. timm's RealLabelsImagenet).
    """
    model.eval()
    criterion = nn.CrossEntropyLoss()
    meters = defaultdict(AverageMeter)
    progress = Progress(len(loader), log_interval, enabled=log_interval > 0)
    start = time.time()
    seen = 0
    for batch_idx, batch in enumerate(loader):
        batch = as_batch(batch)
        input, target = batch.input.to(device), batch.target.to(device)
        if channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(input)
        if isinstance(output, (tuple, list)):
            output = output[0]
        if on_output is not None:
            on_output(output)
        loss = criterion(output.float(), target)
        k = min(5, output.shape[1])
        top1, top5 = accuracy(output, target, topk=(1, k))
        if distributed:
            loss, top1, top5 = (reduce_tensor(t, world_size) for t in (loss, top1, top5))
        n = input.size(0)
        seen += n
        meters['loss'].update(loss.item(), n)
        meters['top1'].update(top1.item(), n)
        meters['top5'].update(top5.item(), n)
        progress.update(batch_idx, lambda: ' '.join(f"{k} {meters[k].avg:.4f}" for k in ('loss', 'top1', 'top5')))
    elapsed = max(time.time() - start, 1e-6)
    metrics = {k: m.avg for k, m in meters.items()}
    metrics['img_per_sec'] = seen * world_size / elapsed
    if not math.isfinite(metrics.get('loss', 0.0)):
        _logger.warning('validation loss is not finite')
    return metrics
