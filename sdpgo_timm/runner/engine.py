"""Training and validation loops shared by train.py and validate.py.

One loop serves plain timm training (ClassificationTask) and the self-distillation tasks:
the loader yields (input, target) or, for index-aware data paths, (input, target, index);
Mixup is applied here, the task computes the loss, timm's NativeScaler (or a plain
backward) steps the optimizer, and the epoch's metrics come back as a dict. Their running
sums live in a `TrainMeter`, which a recovery checkpoint saves to continue an epoch.
"""
import inspect
import logging
import math
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn as nn

from timm.task import TrainingTask
from timm.utils import AverageMeter, accuracy, dispatch_clip_grad, reduce_tensor

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


def _unpack(batch, device: torch.device):
    input, target, *rest = batch
    index = rest[0] if rest else None
    return input.to(device), target.to(device), index


class TrainMeter:
    """Running sums of one epoch's loss parts and its counts, on the device (no per-step host sync).

    `state_dict()` goes into recovery checkpoints, so that an epoch resumed mid-way reports
    the same means as one never stopped; `batches` is how many loader batches it has seen.
    """

    KEYS = ('loss', 'loss_ce', 'loss_sil', 'alpha', 'sparsity')

    def __init__(self, device: torch.device):
        self.sums = {k: torch.zeros((), device=device) for k in self.KEYS}
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.batches = self.steps = self.fresh_seen = self.model_seen = 0

    def update(self, out: Dict[str, torch.Tensor], loss: torch.Tensor, fresh: int) -> None:
        n = len(out['output'])
        self.model_seen += n
        self.fresh_seen += fresh
        self.batches += 1
        self.finite &= torch.isfinite(loss.detach())
        for key in self.KEYS:
            # plain CE reports its loss as loss_ce and zeros, so every run's summary.csv has the same columns
            value = out.get(key, loss if key == 'loss_ce' else None)
            if value is not None:
                self.sums[key] += value.detach().float() * n

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
        for k, v in state['sums'].items():
            self.sums[k] = v.to(self.finite.device)
        self.finite.fill_(state['finite'])
        self.batches, self.steps = state['batches'], state['steps']
        self.fresh_seen, self.model_seen = state['fresh_seen'], state['model_seen']


def amp_loss_scale(loss_scaler) -> Union[float, torch.Tensor]:
    """The factor timm's NativeScaler multiplies the loss by, without a host sync.

    GradScaler.get_scale() reads its scale tensor with .item(), one device sync per step; the
    SKD tasks only use the scale inside their backward hooks, so they get the device tensor
    itself (it changes only in scaler.update(), after the backward). Before the scaler's first
    step, and with no scaler, the scale is a plain float.
    """
    scaler = getattr(loss_scaler, '_scaler', None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    scale = scaler._get_scale_async()
    return float(scaler.get_scale()) if scale is None else scale


def train_one_epoch(
        epoch: int,
        task: TrainingTask,
        loader,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        fresh_size: int = 0,
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
) -> Dict[str, float]:
    """Train one epoch; returns mean loss parts, counts of optimizer steps and fresh samples.

    `fresh_size` is the fresh half of an index-aware replay batch (views mode): the rows
    before it are the replay half. `meter` continues an epoch stopped after `meter.batches`
    batches (the loader must start there); `on_step(num_updates, meter)` runs after each
    optimizer step.
    """
    # self-distillation tasks take the sample indices and the loss scale; timm's tasks take (input, target)
    skd = 'index' in inspect.signature(task.forward).parameters
    task.train()
    meter = meter if meter is not None else TrainMeter(device)
    num_batches = len(loader)
    progress = Progress(num_batches, log_interval, log_enabled)
    first_seen = meter.model_seen
    start = time.time()
    parameters = list(task.get_clip_parameters())
    optimizer.zero_grad()
    for batch_idx, batch in enumerate(loader, meter.batches):
        input, target, index = _unpack(batch, device)
        num_replay = len(input) - fresh_size if index is not None and fresh_size else 0
        if num_replay and getattr(task, 'cache', True) is None:
            # no teacher for this replay half (e.g. resumed from weights only): train on its fresh half
            input, target, index, num_replay = input[num_replay:], target[num_replay:], index[num_replay:], 0
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
    parts = [f"loss {means['loss']:.4f}"] + [f"{k} {means[k]:.3f}" for k in ('alpha', 'sparsity')]
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
        input, target, _ = _unpack(batch, device)
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
