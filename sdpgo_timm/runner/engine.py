"""Training and validation loops shared by train.py and validate.py.

One loop serves plain timm training (ClassificationTask) and the self-distillation tasks, which
it talks to only through the SelfDistillationTask protocol (`sdpgo_timm.protocol`): the loader
yields a `Batch` (or timm's (input, target) pair), the task prepares the step it forwards (Mixup
included), computes the loss and names the loss parts to log, timm's NativeScaler (or a plain
backward) steps the optimizer, and the epoch's metrics come back as a dict. Their running sums
live in a `TrainMeter`, which a recovery checkpoint saves to continue an epoch. The options of the
loop travel as one `LoopOptions`.
"""
import logging
import math
import os
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from timm.task import TrainingTask
from timm.utils import AverageMeter, accuracy, dispatch_clip_grad, reduce_tensor

from ..compat import amp_loss_scale
from ..protocol import SelfDistillationTask, Step, as_batch, prepare_step
from .errors import NonFiniteLossError
from .naflex import batch_rows, input_to

_logger = logging.getLogger(__name__)


class TrainMeter:
    """Running sums of one epoch's loss and the task's loss parts, and its counts, on the device (no per-step
    host sync).

    `state_dict()` goes into recovery checkpoints, so that an epoch resumed mid-way reports
    the same means as one never stopped; `batches` is how many loader batches it has seen.
    """

    def __init__(self, device: torch.device, parts: Sequence[str] = ()):
        # float64, as timm's AverageMeter sums Python floats: the epoch's mean loss is timm's to the last digit
        self.sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ('loss', *parts)}
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.batches = self.steps = self.fresh_seen = self.model_seen = 0
        self.last: Optional[torch.Tensor] = None  # the latest batch's loss (timm's progress line shows it)

    def update(self, out: Dict[str, torch.Tensor], loss: torch.Tensor, new: int) -> None:
        """Add a batch's loss and parts; `new` of its rows are samples not trained on before."""
        n = len(out['output'])
        self.last = loss.detach()
        self.model_seen += n
        self.fresh_seen += new  # the key recovery checkpoints have always held
        self.batches += 1
        self.finite &= torch.isfinite(loss.detach())
        for key, total in self.sums.items():  # no per-step set or list: this runs every step
            total += (loss if key == 'loss' else out[key]).detach().double() * n

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


@dataclass
class LoopOptions:
    """How the loop trains, the same for every epoch of a run.

    timm's options: the loss is divided by `grad_accum_steps` and the gradients clipped at `clip_grad`
    (`clip_mode`); inputs are cast to `input_dtype` (--model-dtype) and channels-last with `channels_last`;
    `batch_loss_scale(input)` weighs each batch's loss before backward (timm's --variable-batch-loss-scale,
    --naflex-loss-scale; the logged loss is the unweighted one); `loss_scaler` is timm's NativeScaler (None: a
    plain backward); the device is synchronized after each optimizer step with `synchronize_step` (timm's
    --synchronize-step); `save_images_dir` receives the input batch of each logged update as train-batch-N.jpg
    (--save-images). Progress lines are timm's (`Train:`), every `log_interval` optimizer updates, written where
    `log_enabled`.
    """
    device: torch.device
    amp_autocast: Callable = nullcontext
    loss_scaler: Any = None
    grad_accum_steps: int = 1
    clip_grad: Optional[float] = None
    clip_mode: str = 'norm'
    channels_last: bool = False
    world_size: int = 1
    log_interval: int = 50
    log_enabled: bool = True
    synchronize_step: bool = False
    input_dtype: Optional[torch.dtype] = None
    batch_loss_scale: Optional[Callable[[Any], Any]] = None
    save_images_dir: Optional[str] = None


def train_one_epoch(
        epoch: int,
        task: TrainingTask,
        loader,
        optimizer: torch.optim.Optimizer,
        options: LoopOptions,
        *,
        lr_scheduler=None,
        mixup_fn: Optional[Callable] = None,
        num_updates: int = 0,
        meter: Optional[TrainMeter] = None,
        on_step: Optional[Callable[[int, TrainMeter], None]] = None,
) -> Dict[str, float]:
    """Train one epoch; returns the mean loss and loss parts, counts of optimizer steps and new samples.

    The task turns each loader batch into the step it forwards (`sdpgo_timm.protocol.prepare_step`). `meter`
    continues an epoch stopped after `meter.batches` batches (the loader must start there);
    `on_step(num_updates, meter)` runs after each optimizer step. Progress lines carry the task's loss parts
    after timm's fields; under DDP their losses are means over the processes (a collective on every rank).
    """
    skd = isinstance(task, SelfDistillationTask)  # takes the loss scale; timm's tasks do not
    o = options
    device, grad_accum_steps = o.device, o.grad_accum_steps
    task.train()
    meter = meter if meter is not None else TrainMeter(device, getattr(task, 'loss_parts', ()))
    num_batches = len(loader)
    updates_per_epoch = (num_batches + grad_accum_steps - 1) // grad_accum_steps
    log = _TrainLog(epoch, updates_per_epoch, o.log_interval, o.world_size, grad_accum_steps, o.log_enabled)
    first_seen = meter.model_seen
    start = time.time()
    # timm leaves the head out of adaptive gradient clipping
    parameters = list(task.get_clip_parameters(exclude_head='agc' in o.clip_mode))
    second_order = getattr(optimizer, 'is_second_order', False)  # e.g. AdaHessian: backward keeps the graph
    optimizer.zero_grad()
    for batch_idx, batch in enumerate(loader, meter.batches):
        step = _to_step(task, batch, mixup_fn, o)
        input = step.input
        log.data_ready(batch_rows(input))

        update = (batch_idx + 1) % grad_accum_steps == 0 or batch_idx + 1 == num_batches
        weight = o.batch_loss_scale(input) if o.batch_loss_scale is not None else 1.
        scale = amp_loss_scale(o.loss_scaler) * weight / grad_accum_steps
        with nullcontext() if update else task.no_sync():
            with o.amp_autocast():
                out = task(input, step.target, **step.kwargs, loss_scale=scale) if skd else task(input, step.target)
            loss = out['loss']
            _backward(loss if o.batch_loss_scale is None else loss * weight, optimizer, o, parameters, update,
                      second_order)
        meter.update(out, loss, step.num_new)
        if not update:
            log.batch_done()
            continue
        optimizer.zero_grad()
        num_updates += 1
        meter.steps += 1
        task.update_ema(step=num_updates)  # timm's count: the updates done, this one included
        if o.synchronize_step and device.type == 'cuda':
            torch.cuda.synchronize(device)
        update_idx = batch_idx // grad_accum_steps
        log.update_done(update_idx, meter, optimizer)
        if o.save_images_dir and log.due(update_idx):
            _save_input_batch(input, o.save_images_dir, batch_idx)
        if on_step is not None:
            on_step(num_updates, meter)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        log.batch_done()

    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()
    meter.check_finite(epoch)
    elapsed = time.time() - start
    metrics = meter.means()
    metrics.update(
        steps=meter.steps, samples=meter.fresh_seen * o.world_size,
        img_per_sec=(meter.model_seen - first_seen) * o.world_size / max(elapsed, 1e-6), epoch_time=elapsed,
        num_updates=num_updates)
    return metrics


def _to_step(task: TrainingTask, batch: Any, mixup_fn: Optional[Callable], options: LoopOptions) -> Step:
    """The step the task forwards for a loader batch; its input on the device in the loop's dtype and layout."""
    batch = as_batch(batch)
    device = options.device
    step = prepare_step(task, batch._replace(input=input_to(batch.input, device, options.input_dtype),
                                             target=batch.target.to(device)), mixup_fn)
    if options.channels_last:
        step = step._replace(input=step.input.contiguous(memory_format=torch.channels_last))
    return step


def _backward(step_loss: torch.Tensor, optimizer: torch.optim.Optimizer, options: LoopOptions,
              parameters: List[torch.Tensor], update: bool, second_order: bool) -> None:
    """timm's backward of one batch's loss (divided by the accumulation steps) and, at an `update`, its clipped
    optimizer step: through timm's NativeScaler, else plain."""
    o = options
    if o.loss_scaler is not None:
        o.loss_scaler(step_loss / o.grad_accum_steps, optimizer, clip_grad=o.clip_grad, clip_mode=o.clip_mode,
                      parameters=parameters, create_graph=second_order, need_update=update)
        return
    (step_loss / o.grad_accum_steps).backward(create_graph=second_order)
    if update:
        if o.clip_grad is not None:
            dispatch_clip_grad(parameters, o.clip_grad, mode=o.clip_mode)
        optimizer.step()


def _mean_over_ranks(values: Sequence[float], world_size: int, device: torch.device) -> List[float]:
    """`values` averaged over the DDP processes (a collective: every rank calls it at the same place)."""
    if world_size == 1 or not dist.is_initialized():
        return list(values)
    return reduce_tensor(torch.tensor(values, dtype=torch.float64, device=device), world_size).tolist()


class _TrainLog:
    """timm's training progress line: update index, loss (latest, running mean), time per update and images per
    second (latest, mean), learning rate, data-wait time; the task's own loss parts follow timm's fields.

    Times are host time between optimizer updates (the device is not synchronized for them, as in timm's);
    data time is the wait for each batch, times the accumulation steps (per update, as timm's).
    """

    def __init__(self, epoch: int, updates_per_epoch: int, interval: int, world_size: int, accum_steps: int,
                 enabled: bool):
        self.epoch, self.updates, self.interval = epoch, updates_per_epoch, max(1, interval)
        self.world_size, self.accum_steps, self.enabled = world_size, accum_steps, enabled
        self.update_time, self.data_time = AverageMeter(), AverageMeter()
        self.update_start = self.data_start = time.time()
        self.samples = 0  # images of the latest update, over all processes

    def data_ready(self, n: int) -> None:
        """A batch of `n` images (this process) arrived."""
        self.data_time.update(self.accum_steps * (time.time() - self.data_start))
        self.samples += n * self.world_size

    def batch_done(self) -> None:
        self.data_start = time.time()

    def due(self, update_idx: int) -> bool:
        """Whether update `update_idx` gets a line: every `interval`-th from 0, and the epoch's last."""
        return update_idx % self.interval == 0 or update_idx + 1 == self.updates

    def update_done(self, update_idx: int, meter: TrainMeter, optimizer: torch.optim.Optimizer) -> None:
        """An optimizer update ended: time it, and write its line when due (the same updates on every rank)."""
        now = time.time()
        self.update_time.update(now - self.update_start)
        self.update_start = now
        if self.due(update_idx):
            meter.check_finite(self.epoch)
            self._write(update_idx, meter, optimizer)
        self.samples = 0

    def _write(self, update_idx: int, meter: TrainMeter, optimizer: torch.optim.Optimizer) -> None:
        means = meter.means()
        losses = _mean_over_ranks([meter.last.item(), *means.values()], self.world_size, meter.finite.device)
        loss_now, means = losses[0], dict(zip(means, losses[1:]))
        if not self.enabled:
            return
        lr = sum(g['lr'] for g in optimizer.param_groups) / len(optimizer.param_groups)
        t, d = self.update_time, self.data_time
        parts = ''.join(f"  {k}: {v:#.3g}" for k, v in means.items() if k != 'loss')
        _logger.info(
            f"Train: {self.epoch} [{update_idx:>4d}/{self.updates} ({100. * (update_idx + 1) / self.updates:>3.0f}%)]  "
            f"Loss: {loss_now:#.3g} ({means['loss']:#.3g})  "
            f"Time: {t.val:.3f}s, {self.samples / max(t.val, 1e-9):>7.2f}/s  "
            f"({t.avg:.3f}s, {self.samples / max(t.avg, 1e-9):>7.2f}/s)  "
            f"LR: {lr:.3e}  Data: {d.val:.3f} ({d.avg:.3f}){parts}")


def _save_input_batch(input: torch.Tensor, folder: str, batch_idx: int) -> None:
    """timm's --save-images: the model's input batch as one normalized image grid, train-batch-<batch_idx>.jpg."""
    from torchvision.utils import save_image  # torchvision comes with timm; imported only when asked for
    save_image(input.detach().float(), os.path.join(folder, f'train-batch-{batch_idx}.jpg'), padding=0,
               normalize=True)


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
        log_style: str = 'train',
        log_suffix: str = '',
        on_output: Optional[Callable[[torch.Tensor], None]] = None,
        input_dtype: Optional[torch.dtype] = None,
        tta: int = 0,
) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%), mean cross-entropy and throughput of a model on a loader.

    `log_interval` > 0 logs timm's `Test:` line every that many batches: as timm's train.py does (`log_style`
    'train': also the last batch; `log_suffix` e.g. ' (EMA)') or as timm's validate.py does ('validate', its
    --log-freq). `on_output(logits)` sees every batch's output in loader order (e.g. timm's RealLabelsImagenet).
    Inputs are cast to `input_dtype`; `tta` > 1 (timm's --tta) averages the outputs of each `tta` consecutive
    inputs, the augmented views of one image, which are scored as that image with its first view's target.
    """
    model.eval()
    criterion = nn.CrossEntropyLoss()
    meters = defaultdict(AverageMeter)
    batch_time = AverageMeter()
    last_idx = len(loader) - 1
    start = end = time.time()
    seen = 0
    for batch_idx, batch in enumerate(loader):
        batch = as_batch(batch)
        input, target = input_to(batch.input, device, input_dtype), batch.target.to(device)
        if channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(input)
        if isinstance(output, (tuple, list)):
            output = output[0]
        if tta > 1:  # a last group short of `tta` views is dropped, as unfold does
            output = output.unfold(0, tta, tta).mean(dim=2)
            target = target[:len(output) * tta:tta]
        if on_output is not None:
            on_output(output)
        loss = criterion(output.float(), target)
        k = min(5, output.shape[1])
        top1, top5 = accuracy(output, target, topk=(1, k))
        if distributed:
            loss, top1, top5 = (reduce_tensor(t, world_size) for t in (loss, top1, top5))
        n = target.size(0)
        seen += batch_rows(input)
        meters['loss'].update(loss.item(), n)
        meters['top1'].update(top1.item(), n)
        meters['top5'].update(top5.item(), n)
        batch_time.update(time.time() - end)
        end = time.time()
        if log_interval > 0 and (batch_idx % log_interval == 0 or (log_style == 'train' and batch_idx == last_idx)):
            _log_test_line(log_style, log_suffix, batch_idx, last_idx, batch_time, meters, n)
    elapsed = max(time.time() - start, 1e-6)
    metrics = {k: m.avg for k, m in meters.items()}
    metrics['img_per_sec'] = seen * world_size / elapsed
    if not math.isfinite(metrics.get('loss', 0.0)):
        _logger.warning('validation loss is not finite')
    return metrics


def _log_test_line(style: str, suffix: str, batch_idx: int, last_idx: int, batch_time: AverageMeter,
                   meters: Dict[str, AverageMeter], batch_size: int) -> None:
    """timm's `Test:` progress line, as its train.py (`style` 'train') or its validate.py ('validate') writes it."""
    loss, top1, top5 = meters['loss'], meters['top1'], meters['top5']
    accuracy_text = (f"Acc@1: {top1.val:>7.3f} ({top1.avg:>7.3f})  "
                     f"Acc@5: {top5.val:>7.3f} ({top5.avg:>7.3f})")
    if style == 'train':
        _logger.info(
            f"Test{suffix}: [{batch_idx:>4d}/{last_idx}]  Time: {batch_time.val:.3f} ({batch_time.avg:.3f})  "
            f"Loss: {loss.val:>7.3f} ({loss.avg:>6.3f})  {accuracy_text}")
    else:
        rate = batch_size / max(batch_time.avg, 1e-9)
        _logger.info(
            f"Test: [{batch_idx:>4d}/{last_idx + 1}]  "
            f"Time: {batch_time.val:.3f}s ({batch_time.avg:.3f}s, {rate:>7.2f}/s)  "
            f"Loss: {loss.val:>7.4f} ({loss.avg:>6.4f})  {accuracy_text}")
