"""Training and validation loops shared by train.py and validate.py.

One loop serves plain timm training (ClassificationTask) and the self-distillation tasks:
the loader yields (input, target) or, for index-aware data paths, (input, target, index);
Mixup is applied here, the task computes the loss, timm's NativeScaler (or a plain
backward) steps the optimizer, and the epoch's metrics come back as a dict.
"""
import logging
import math
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from timm.task import ClassificationTask, TrainingTask
from timm.utils import AverageMeter, accuracy, dispatch_clip_grad, reduce_tensor

_logger = logging.getLogger('train')


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the run stops without saving."""


class Progress:
    """A one-line progress bar on an interactive terminal, periodic log lines otherwise."""

    def __init__(self, total: int, interval: int, enabled: bool = True):
        self.total = total
        self.interval = max(1, interval)
        self.tty = enabled and sys.stderr.isatty()
        self.enabled = enabled

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        last = step + 1 == self.total
        if self.tty:
            filled = int(30 * (step + 1) / max(1, self.total))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {step + 1}/{self.total} {text}")
            if last:
                sys.stderr.write('\n')
            sys.stderr.flush()
        elif step % self.interval == 0 or last:
            _logger.info(f"[{step + 1:>4d}/{self.total}] {text}")


def _unpack(batch, device: torch.device):
    input, target, *rest = batch
    index = rest[0] if rest else None
    return input.to(device), target.to(device), index


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
        on_step: Optional[Callable[[int], None]] = None,
) -> Dict[str, float]:
    """Train one epoch; returns mean loss parts, counts of optimizer steps and fresh samples.

    `fresh_size` is the fresh half of an index-aware replay batch (views mode): the rows
    before it are the replay half. `on_step(step)` runs after each optimizer step.
    """
    plain = isinstance(task, ClassificationTask)
    task.train()
    meters = defaultdict(AverageMeter)
    num_batches = len(loader)
    progress = Progress(num_batches, log_interval, log_enabled)
    steps = fresh_seen = model_seen = 0
    start = time.time()
    parameters = list(task.get_clip_parameters())
    optimizer.zero_grad()
    for batch_idx, batch in enumerate(loader):
        input, target, index = _unpack(batch, device)
        num_replay = len(input) - fresh_size if index is not None and fresh_size else 0
        if num_replay and getattr(task, 'cache', True) is None:
            # no teacher for this replay half (e.g. resumed from weights only): train on its fresh half
            input, target, index, num_replay = input[num_replay:], target[num_replay:], index[num_replay:], 0
        if mixup_fn is not None:
            input, target = mixup_fn(input, target) if plain else mixup_fn(input, target, num_replay)
        if channels_last:
            input = input.contiguous(memory_format=torch.channels_last)

        update = (batch_idx + 1) % grad_accum_steps == 0 or batch_idx + 1 == num_batches
        scale = 1.0 / grad_accum_steps
        if loss_scaler is not None:
            scale *= float(loss_scaler._scaler.get_scale())
        sync = nullcontext() if update else task.no_sync()
        with sync:
            with amp_autocast():
                out = task(input, target) if plain else task(input, target, index=index, loss_scale=scale)
            loss = out['loss']
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite loss {loss.item()} at epoch {epoch} step {batch_idx}; stopping without saving. "
                    "Lower --lr, use --clip-grad, or check the data.")
            if loss_scaler is not None:
                loss_scaler(loss / grad_accum_steps, optimizer, clip_grad=clip_grad, clip_mode=clip_mode,
                            parameters=parameters, need_update=update)
            else:
                (loss / grad_accum_steps).backward()
                if update:
                    if clip_grad is not None:
                        dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
                    optimizer.step()
        if update:
            optimizer.zero_grad()
            task.update_ema(step=num_updates)
            num_updates += 1
            steps += 1
            if lr_scheduler is not None:
                lr_scheduler.step_update(num_updates=num_updates)
            if on_step is not None:
                on_step(num_updates)

        n = len(out['output'])
        model_seen += n
        fresh_seen += len(input) - num_replay
        meters['loss'].update(loss.item(), n)
        for key in ('loss_ce', 'loss_sil', 'alpha', 'sparsity'):
            if key in out:
                meters[key].update(float(out[key]), n)
        rate = model_seen * world_size / max(time.time() - start, 1e-6)
        progress.update(batch_idx, f"loss {meters['loss'].avg:.4f} " + ' '.join(
            f"{k} {meters[k].avg:.3f}" for k in ('alpha', 'sparsity') if k in meters) + f" {rate:.1f} img/s")

    elapsed = time.time() - start
    metrics = {k: m.avg for k, m in meters.items()}
    metrics.update(
        steps=steps, samples=fresh_seen * world_size,
        img_per_sec=model_seen * world_size / max(elapsed, 1e-6), epoch_time=elapsed, num_updates=num_updates)
    return metrics


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
) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%), mean cross-entropy and throughput of a model on a loader."""
    model.eval()
    criterion = nn.CrossEntropyLoss()
    meters = defaultdict(AverageMeter)
    start = time.time()
    seen = 0
    for batch in loader:
        input, target, _ = _unpack(batch, device)
        if channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(input)
        if isinstance(output, (tuple, list)):
            output = output[0]
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
    elapsed = max(time.time() - start, 1e-6)
    metrics = {k: m.avg for k, m in meters.items()}
    metrics['img_per_sec'] = seen * world_size / elapsed
    if not math.isfinite(metrics.get('loss', 0.0)):
        _logger.warning('validation loss is not finite')
    return metrics
