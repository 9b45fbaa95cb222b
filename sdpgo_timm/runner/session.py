"""One training run of train.py, in phases.

`TrainSession(args, args_text, cleanup).run()` trains as timm's train.py does: each phase below is one step of
its workflow, called in timm's order (the order of random draws that keeps a plain run equal to timm's, see
docs/ARCHITECTURE.md), and leaves what later phases need on the session:

1. `setup_environment`: checks of the flags, the device, the stop signals, the seed;
2. `create_data`: the training and evaluation datasets;
3. `create_model_and_task`: the model, the method's task, AMP;
4. `create_optimizer`: the optimizer and the EMA;
5. `create_loaders`: Mixup/CutMix and the loaders;
6. `resume`: the checkpoint to continue from, then compilation and DDP;
7. `create_schedule`: timm's scheduler at the resumed update;
8. `open_output`: the run folder, its lock and the checkpoint saver (rank 0);
9. `train_epochs`: the epochs, each trained, evaluated, saved and summarized;
10. `finish`: the best epoch, timm's `--result` print and the Hub push.

The Hub push (--push-to-hub) is train.py's: it overrides `check_push_target` and `push`, so that the runner does
not import `hub/`, which builds on it.
"""
import argparse
import json
import logging
import os
from contextlib import ExitStack
from datetime import datetime
from functools import partial
from typing import Any, Dict, List, Optional

import torch
from timm.data import resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import NativeScaler, distribute_bn, random_seed

from ..data.factory import (
    check_evaluation_split, check_training_classes, create_split_dataset, dataset_classes)
from ..data.images import CheckedImageDataset, check_image_headers
from ..data.noise import noisy_label_mask, weight_noise_metrics
from ..methods import bce_active, get_method
from ..protocol import SelfDistillationTask
from .batches import batch_loss_scale
from .builders import (
    check_aug_splits, create_mixup, create_train_loader, create_train_task, optimizer_module, resolve_feed)
from .checkpoint import (
    SUMMARY_ROW, ResumePoint, TrainCheckpointSaver, gather_rank_states, gather_recovery_states, restore_recovery,
    resume_training, set_rng_state)
from .engine import LoopOptions, TrainMeter, train_one_epoch, validate
from .errors import ConfigError, Preempted, first_line
from .naflex import check_naflex_args
from .preemption import PreemptionSignal
from .recovery import RecoveryCheckpoints
from .resume import resolve_resume, resume_in_place
from .rundir import create_output_dir
from .setup import (
    check_cpu_bfloat16_convolutions, check_num_classes, check_same_data_across_ranks, check_taps_get_gradients,
    create_autocast, create_eval_loader, create_timm_model, init_device, resolve_lr, resolve_model_dtype)
from .summary import append_summary
from .tracking import start_wandb

_logger = logging.getLogger('train')


class TrainSession:
    """The state of one training run, built up phase by phase (see the module docstring); the run folder's lock
    is released when `cleanup` closes."""

    def __init__(self, args: argparse.Namespace, args_text: str, cleanup: ExitStack):
        self.args, self.args_text, self.cleanup = args, args_text, cleanup
        self.output_dir: Optional[str] = None
        self.saver: Optional[TrainCheckpointSaver] = None
        self.log_wandb = False
        self.best = None
        self.results: List[Dict[str, Any]] = []  # each evaluated epoch's metrics, for timm's `--result` print

    @property
    def primary(self) -> bool:
        """Whether this process is rank 0 (known once `setup_environment` set up the device)."""
        return self.args.rank == 0

    def run(self) -> dict:
        """Every phase in order; the run's output folder, best metric and epoch (and Hub URL when pushed)."""
        for phase in (self.setup_environment, self.create_data, self.create_model_and_task, self.create_optimizer,
                      self.create_loaders, self.resume, self.create_schedule, self.open_output, self.train_epochs):
            phase()
        return self.finish()

    def setup_environment(self) -> None:
        args = self.args
        check_aug_splits(args)
        check_naflex_args(args)
        self.device = init_device(args)
        # from here on SIGTERM / SIGUSR1 / SIGINT stop the run at a step (or before the first) instead of killing it
        self.preemption = self.cleanup.enter_context(PreemptionSignal(args.distributed, self.device))
        if args.distributed:
            _logger.info(f"Training in distributed mode with multiple processes, 1 device per process. Process "
                         f"{args.rank}, total {args.world_size}, device {args.device}.")
        else:
            _logger.info(f"Training with a single process on 1 device ({args.device}).")
        if self.primary and args.push_to_hub:
            self.check_push_target()  # before training: a bad repo id or a missing token is found now
        if self.primary and args.bce_loss and not bce_active(args):  # timm's train.py ignores it without a word
            _logger.warning("--bce-loss is used only with Mixup/CutMix or --smoothing (soft targets), as in timm's "
                            "train.py: this run trains with cross-entropy")
        random_seed(args.seed, args.rank)

    def create_data(self) -> None:
        args = self.args
        check_evaluation_split(args)
        self.dataset_train = create_split_dataset(args, args.train_split, is_training=True)
        # as timm: an empty --val-split trains without evaluation, and the training loss picks the best checkpoint
        self.dataset_eval = create_split_dataset(args, args.val_split, is_training=False) if args.val_split else None
        if self.dataset_eval is not None:
            check_training_classes(self.dataset_train, self.dataset_eval)
        check_same_data_across_ranks(args, {'the training split': self.dataset_train,
                                            'the validation split': self.dataset_eval})
        if isinstance(self.dataset_eval, CheckedImageDataset):  # found now rather than after the first epoch
            check_image_headers(self.dataset_eval)
        self.eval_metric = args.eval_metric if self.dataset_eval is not None else 'loss'
        check_num_classes(args, self.dataset_train)
        self.skipped = getattr(self.dataset_train, 'skipped', None)

    def create_model_and_task(self) -> None:
        args, device = self.args, self.device
        model = create_timm_model(args, self.dataset_train)
        if self.primary:
            _logger.info(f"Model {safe_model_name(args.model)} created, param count:"
                         f"{sum(p.numel() for p in model.parameters())}")
        self.data_config = resolve_data_config(vars(args), model=model, verbose=self.primary)
        self.model_dtype = resolve_model_dtype(args)
        if self.model_dtype == torch.float16:  # timm's train.py warns so too
            _logger.warning('float16 is not recommended for training, for half precision bfloat16 is recommended.')
        model.to(device=device, dtype=self.model_dtype)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        check_cpu_bfloat16_convolutions(args, model, device, self.data_config['input_size'])
        if args.distributed and args.sync_bn:
            # timm's conversion keeps its norm+act layers' activation (torch's would drop it); the statistics are
            # then synchronized every step, so --dist-bn has nothing left to do, as in timm
            model = convert_sync_batchnorm(model)
            args.dist_bn = ''
        if args.torchscript:
            model = torch.jit.script(model)
        self.model = model
        self.method = get_method(args.method)
        self.feed = resolve_feed(args, self.dataset_train)
        self.task = create_train_task(args, model, self.feed, device, num_samples=len(self.dataset_train))
        # under --label-noise the run knows which labels it flipped: SDPGO's α per sample is scored against them
        self.noisy = noisy_label_mask(self.dataset_train)
        self.alpha_vs_noise = (self.noisy is not None and isinstance(self.task, SelfDistillationTask)
                               and self.task.log_sample_weights())
        self.amp_autocast, amp_dtype = create_autocast(args, device)
        # as timm: a loss scaler for float16 on CUDA only (bfloat16 needs none)
        self.loss_scaler = (NativeScaler(device=device.type) if amp_dtype == torch.float16 and device.type == 'cuda'
                            else None)
        if self.primary:
            _logger.info('Using native Torch AMP. Training in mixed precision.' if amp_dtype else
                         f'AMP not enabled. Training in {self.model_dtype or torch.float32}.')

    def create_optimizer(self) -> None:
        args = self.args
        resolve_lr(args, log=self.primary)
        try:
            self.optimizer = create_optimizer_v2(
                optimizer_module(self.task, self.model), **optimizer_kwargs(cfg=args), **args.opt_kwargs)
        except TypeError as e:  # an --opt-kwargs key the optimizer does not take, or one with its own option
            if not args.opt_kwargs or 'keyword argument' not in str(e):
                raise
            raise ConfigError(f"--opt-kwargs {args.opt_kwargs}: {first_line(e)}; give only arguments of the "
                              f"{args.opt!r} optimizer that have no option of their own (--lr, --momentum, "
                              "--weight-decay, --opt-eps, --opt-betas, ...)") from None
        # timm's --layer-decay-no-opt-scale froze the layers below that scale just now: PWA's taps must still train
        check_taps_get_gradients(args, self.task, self.model, self.data_config['input_size'])
        if self.primary:
            defaults = {**self.optimizer.defaults, 'weight_decay': args.weight_decay}  # timm's: wd not in defaults
            _logger.info(f"Created {type(self.optimizer).__name__} ({args.opt}) optimizer: "
                         + ', '.join(f'{k}: {v}' for k, v in defaults.items()))
        if args.model_ema:
            self.task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                                device='cpu' if args.model_ema_force_cpu else None)

    def create_loaders(self) -> None:
        args, device = self.args, self.device
        self.mixup_fn, self.mixup_collate = create_mixup(args, self.model.num_classes, self.feed)
        self.loader_train = create_train_loader(args, self.dataset_train, self.data_config, device, self.feed,
                                                collate_fn=self.mixup_collate, model=self.model)
        if args.recovery_interval and not self.loader_train.resumable:
            raise ValueError(f"--recovery-interval: {self.loader_train.not_resumable}; drop it (epoch checkpoints "
                             "still resume)")
        self.loader_eval = create_eval_loader(
            args, self.dataset_eval, self.data_config, device, model=self.model) if self.dataset_eval else None

    def resume(self) -> None:
        args, task, device = self.args, self.task, self.device
        self.resume_path = resolve_resume(args)
        point = ResumePoint()
        if self.resume_path:
            point = resume_training(args, self.resume_path, task, self.optimizer, self.loss_scaler, self.mixup_fn)
        if args.start_epoch is not None:
            point = ResumePoint(args.start_epoch)
        self.point = point
        self.meter = None
        if point.recovery:  # the epoch continues mid-way, with its running sums
            self.meter = TrainMeter(device)
            restore_recovery(point.recovery, self.loader_train, self.meter, self.skipped)
        if args.torchcompile:
            task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if args.distributed:
            task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None,
                                     broadcast_buffers=not args.no_ddp_bb)

    def create_schedule(self) -> None:
        args, point = self.args, self.point
        updates_per_epoch = (len(self.loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
        self.lr_scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer, **scheduler_kwargs(args, decreasing_metric=self.eval_metric == 'loss'),
            updates_per_epoch=updates_per_epoch)
        self.num_updates = point.epoch * updates_per_epoch if point.num_updates is None else point.num_updates
        if self.num_updates > 0:
            if args.sched_on_updates:
                self.lr_scheduler.step_update(self.num_updates)
            else:
                self.lr_scheduler.step(point.epoch)

    def open_output(self) -> None:
        """Rank 0: the run folder (locked, args.yaml written), wandb and the checkpoint saver."""
        if not self.primary:
            return
        args, method = self.args, self.method
        # timm's name (time, model, image size), then the self-distillation method if any
        exp_name = args.experiment or '-'.join([
            datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model),
            str(self.data_config['input_size'][-1]), *([method.name] if method.self_distillation else [])])
        self.output_dir = output_dir = os.path.join(args.output or './output/train', exp_name)
        in_place = bool(self.resume_path) and os.path.isdir(output_dir) and os.path.samefile(
            os.path.dirname(os.path.abspath(self.resume_path)), output_dir)
        create_output_dir(output_dir, self.args_text, in_place, self.cleanup)
        self.log_wandb = start_wandb(args, exp_name)
        self.saver = TrainCheckpointSaver(
            model=self.model, optimizer=self.optimizer, args=args, amp_scaler=self.loss_scaler,
            checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=self.eval_metric == 'loss',
            max_history=args.checkpoint_hist, task=self.task, classes=dataset_classes(self.dataset_train))
        if in_place:
            resume_in_place(self.saver, self.resume_path, output_dir, self.point)
        if self.point.epoch >= self.num_epochs:
            _logger.info(f"Nothing left to train: resumed at epoch {self.point.epoch} of {self.num_epochs}; raise "
                         "--epochs to train on")
            return
        _logger.info(f"Training {args.model} ({method.name if method.self_distillation else method.summary}) for "
                     f"{self.num_epochs} epochs, {len(self.loader_train)} steps per epoch, output {output_dir}")
        explain = ('(warmup_epochs + epochs + cooldown_epochs). Warmup added to total when warmup_prefix=True'
                   if args.warmup_prefix else
                   '(epochs + cooldown_epochs). Warmup within epochs when warmup_prefix=False')
        _logger.info(f"Scheduled epochs: {self.num_epochs} {explain}. "
                     f"LR stepped per {'epoch' if self.lr_scheduler.t_in_epochs else 'update'}.")

    def train_epochs(self) -> None:
        """From the resumed epoch to the last: train, then evaluate, save and summarize (every --val-interval);
        a stop signal ends the run at the next epoch boundary (or, inside an epoch, at a step)."""
        args, point = self.args, self.point
        self.collect = partial(gather_rank_states, self.task, self.mixup_fn, args)
        self.eval_model = self.task.get_eval_model()
        if self.preemption.stopping(wait=True):
            raise Preempted(f"preempted by {self.preemption.name} during start-up, before the first step: nothing "
                            "to save. Run the same command (with --resume auto) to start again.")
        self.recovery = RecoveryCheckpoints(
            interval=args.recovery_interval, loader=self.loader_train, preemption=self.preemption,
            collect=partial(gather_recovery_states, self.task, self.mixup_fn, args), saver=self.saver,
            skipped=self.skipped)
        self.loop_options = LoopOptions(
            device=self.device, amp_autocast=self.amp_autocast, loss_scaler=self.loss_scaler,
            grad_accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
            channels_last=args.channels_last, world_size=args.world_size, log_interval=args.log_interval,
            log_enabled=self.primary, synchronize_step=args.synchronize_step, input_dtype=self.model_dtype,
            batch_loss_scale=batch_loss_scale(args), save_images_dir=self.output_dir if args.save_images else None)
        if point.rng is not None:  # a resumed run draws what the stopped one would have (no per-epoch reseed, as timm)
            set_rng_state(point.rng)
        for epoch in range(point.epoch, self.num_epochs):
            train_metrics = self.train_epoch(epoch)
            if (epoch + 1) % args.val_interval and epoch + 1 != self.num_epochs:
                # timm's --val-interval: no evaluation, checkpoint or summary row this epoch (a stop signal is
                # answered after the next step, with a recovery checkpoint)
                self.lr_scheduler.step(epoch + 1, None)
                if self.primary:
                    _logger.info(f"epoch {epoch}: train loss {train_metrics['loss']:.4f}; no evaluation or "
                                 f"checkpoint (--val-interval {args.val_interval})")
                continue
            self.end_epoch(epoch, train_metrics)
            if epoch + 1 < self.num_epochs and self.preemption.stopping(wait=True):
                raise Preempted(f"preempted by {self.preemption.name} at the end of epoch {epoch}; its checkpoint "
                                "is saved. Resume with the same command and --resume auto.")

    def train_epoch(self, epoch: int) -> Dict[str, Any]:
        """One epoch's training; its metrics (with the unreadable samples skipped)."""
        args, task = self.args, self.task
        self.loader_train.set_epoch(epoch)
        if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            for mixup in (self.mixup_fn, self.mixup_collate):
                if mixup is not None:
                    mixup.mixup_enabled = False
        if isinstance(task, SelfDistillationTask):
            task.set_epoch(epoch)
        train_metrics = train_one_epoch(
            epoch, task, self.loader_train, self.optimizer, self.loop_options, lr_scheduler=self.lr_scheduler,
            mixup_fn=self.mixup_fn, num_updates=self.num_updates, meter=self.meter,
            on_step=partial(self.recovery, epoch))
        self.meter = None
        self.num_updates = int(train_metrics.pop('num_updates'))
        train_metrics['skipped'] = self.skipped.pop_count(args.distributed) if self.skipped is not None else 0
        if self.alpha_vs_noise:  # this process's samples (a share of the epoch under DDP)
            train_metrics.update(weight_noise_metrics(*task.sample_weights(), self.noisy))
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            distribute_bn(self.model, args.world_size, args.dist_bn == 'reduce')
        return train_metrics

    def evaluate(self) -> Dict[str, float]:
        """The evaluation metrics of the model (and of its EMA, which then count), {} without an evaluation set."""
        args, task = self.args, self.task
        if self.loader_eval is None:
            return {}
        evaluate = partial(validate, loader=self.loader_eval, device=self.device, amp_autocast=self.amp_autocast,
                           channels_last=args.channels_last, distributed=args.distributed,
                           world_size=args.world_size, log_interval=args.log_interval if self.primary else 0,
                           input_dtype=self.model_dtype, tta=args.tta)
        eval_metrics = evaluate(self.eval_model)
        if task.has_ema() and not args.model_ema_force_cpu:
            ema_model = task.get_trainable_module(ema=True)
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                distribute_bn(ema_model, args.world_size, args.dist_bn == 'reduce')
            eval_metrics = evaluate(task.get_eval_model(ema=True), log_suffix=' (EMA)')
        return eval_metrics

    def end_epoch(self, epoch: int, train_metrics: Dict[str, Any]) -> None:
        """Evaluate, then (rank 0) log, save the checkpoint holding its summary row, append that row and remove the
        recovery files it supersedes; step the scheduler."""
        eval_metrics = self.evaluate()
        metric = (eval_metrics or train_metrics)[self.eval_metric]
        self.results.append(dict(epoch=epoch, train=train_metrics,
                                 **({'validation': eval_metrics} if eval_metrics else {})))
        extra = self.collect()
        if self.primary:
            # the rate the epoch trained with (as timm's summary): read before the scheduler steps to the next one
            lr = sum(g['lr'] for g in self.optimizer.param_groups) / len(self.optimizer.param_groups)
            unreadable = f", {train_metrics['skipped']} unreadable skipped" if train_metrics['skipped'] else ''
            evaluated = (f"eval top1 {eval_metrics['top1']:.2f} top5 {eval_metrics['top5']:.2f} "
                         f"loss {eval_metrics['loss']:.4f}" if eval_metrics else 'no evaluation (--val-split empty)')
            _logger.info(
                f"epoch {epoch}: train loss {train_metrics['loss']:.4f} ({train_metrics['steps']} steps, "
                f"{train_metrics['samples']} samples{unreadable}, {train_metrics['img_per_sec']:.1f} img/s) | "
                f"{evaluated}")
            # the checkpoint first, holding its row: summary.csv never lists an epoch without a checkpoint, and
            # a run stopped between the two writes gets the row back when it resumes
            row = dict(epoch=epoch, train=train_metrics, eval=eval_metrics, lr=lr)
            self.best = self.saver.save_checkpoint(epoch, metric=metric, extra={**extra, SUMMARY_ROW: row})
            append_summary(epoch, train_metrics, eval_metrics, os.path.join(self.output_dir, 'summary.csv'), lr=lr,
                           log_wandb=self.log_wandb)
            # the epoch checkpoint (written and fsynced above) supersedes this epoch's recovery files
            self.saver.remove_superseded_recovery(epoch)
        self.lr_scheduler.step(epoch + 1, metric)

    def finish(self) -> dict:
        """The best epoch, timm's parsable `--result`, and the push of the best checkpoint (--push-to-hub)."""
        args, saver, best, output_dir = self.args, self.saver, self.best, self.output_dir
        if best is None and saver is not None and saver.best_metric is not None:  # resumed in place, nothing to train
            best = (saver.best_metric, saver.best_epoch)
        result = dict(output_dir=output_dir, best_metric=best[0] if best else None,
                      best_epoch=best[1] if best else None)
        if not self.primary:
            return result
        if best is None:
            _logger.info("*** No epoch was trained in this run")
        else:
            _logger.info(f"*** Best metric: {result['best_metric']} (epoch {result['best_epoch']})")
        # timm's parsable result: the ten best evaluated epochs, best last (none when nothing was left to train)
        ranked = sorted(self.results, key=lambda r: r.get('validation', r['train'])[self.eval_metric],
                        reverse=self.eval_metric == 'loss')
        if ranked:
            print(f"--result\n{json.dumps(ranked[-10:], indent=4)}")
        if args.push_to_hub and output_dir:
            result['hub_url'] = self.push(os.path.join(output_dir, 'model_best.pth.tar'))
        return result

    def check_push_target(self) -> None:
        """A bad --push-to-hub target found before training; the Hub side is train.py's (hub/ builds on the
        runner), this session has none."""
        raise ConfigError("--push-to-hub: this session cannot push; train with train.py")

    def push(self, path: str) -> str:
        """Push the checkpoint at `path` to --push-to-hub; its URL."""
        raise ConfigError("--push-to-hub: this session cannot push; train with train.py")
