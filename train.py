#!/usr/bin/env python3
"""timm training with SDPGO self-distillation: timm's train.py workflow plus --sdpgo.

    python train.py digits --model resnet18 --sdpgo
    torchrun --nproc_per_node=8 train.py imagenet --model swin_tiny_patch4_window7_224 --sdpgo

Argument parsing and wiring only; the logic lives in sdpgo_timm.
"""
import json
import logging
import os
import sys
from contextlib import ExitStack
from datetime import datetime
from functools import partial

import torch
from timm.data import resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import NativeScaler, distribute_bn, random_seed

from sdpgo_timm.data.factory import check_training_classes, create_split_dataset, dataset_classes
from sdpgo_timm.protocol import SelfDistillationTask
from sdpgo_timm.runner import errors
from sdpgo_timm.runner.args import parse_args
from sdpgo_timm.runner.batches import batch_loss_scale
from sdpgo_timm.runner.builders import (
    check_aug_splits, create_mixup, create_train_loader, create_train_task, resolve_feed, skd_method)
from sdpgo_timm.runner.checkpoint import SUMMARY_ROW, TrainCheckpointSaver, append_summary
from sdpgo_timm.runner.engine import train_one_epoch, validate
from sdpgo_timm.runner.errors import Preempted, PushFailed, RunError
from sdpgo_timm.runner.naflex import check_naflex_args
from sdpgo_timm.runner.preemption import Interrupted, PreemptionSignal
from sdpgo_timm.runner.recovery import RecoveryCheckpoints, restore_recovery, set_rng_state
from sdpgo_timm.runner.resume import ResumePoint, resolve_resume, resume_in_place, resume_training
from sdpgo_timm.runner.tracking import start_wandb
from sdpgo_timm.runner.teacher import optimizer_module
from sdpgo_timm.runner.setup import (
    check_num_classes, create_autocast, create_eval_loader, create_output_dir, create_timm_model,
    gather_rank_states, init_device, resolve_lr, resolve_model_dtype, setup_script_logging)

_logger = logging.getLogger('train')


def run(args, args_text: str, cleanup: ExitStack) -> dict:
    """Train as `args` say; the run folder's lock is released when `cleanup` closes."""
    check_aug_splits(args)
    check_naflex_args(args)
    device = init_device(args)
    # from here on SIGTERM / SIGUSR1 / SIGINT stop the run at a step (or before the first) instead of killing it
    preemption = cleanup.enter_context(PreemptionSignal(args.distributed, device))
    primary = args.rank == 0
    if args.distributed:
        _logger.info(f"Training in distributed mode with multiple processes, 1 device per process. Process "
                     f"{args.rank}, total {args.world_size}, device {args.device}.")
    else:
        _logger.info(f"Training with a single process on 1 device ({args.device}).")
    if primary and args.push_to_hub:
        from sdpgo_timm.hub import check_push_target
        check_push_target(args.push_to_hub)  # before training: a bad repo id or a missing token is found now
    random_seed(args.seed, args.rank)

    dataset_train = create_split_dataset(args, args.train_split, is_training=True)
    # as timm: an empty --val-split trains without evaluation, and the training loss picks the best checkpoint
    dataset_eval = create_split_dataset(args, args.val_split, is_training=False) if args.val_split else None
    if dataset_eval is not None:
        check_training_classes(dataset_train, dataset_eval)
    eval_metric = args.eval_metric if dataset_eval is not None else 'loss'
    check_num_classes(args, dataset_train)
    skipped = getattr(dataset_train, 'skipped', None)
    model = create_timm_model(args, dataset_train)
    if primary:
        _logger.info(f"Model {safe_model_name(args.model)} created, param count:"
                     f"{sum(p.numel() for p in model.parameters())}")
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    model_dtype = resolve_model_dtype(args)
    if model_dtype == torch.float16:  # timm's train.py warns so too
        _logger.warning('float16 is not recommended for training, for half precision bfloat16 is recommended.')
    model.to(device=device, dtype=model_dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        # timm's conversion keeps its norm+act layers' activation (torch's would drop it); the statistics are then
        # synchronized every step, so --dist-bn has nothing left to do, as in timm
        model = convert_sync_batchnorm(model)
        args.dist_bn = ''
    if args.torchscript:
        model = torch.jit.script(model)

    method = skd_method(args)
    feed = resolve_feed(args, dataset_train)
    task = create_train_task(args, model, feed, device, num_samples=len(dataset_train))
    amp_autocast, amp_dtype = create_autocast(args, device)
    # as timm: a loss scaler for float16 on CUDA only (bfloat16 needs none)
    loss_scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 and device.type == 'cuda' else None
    if primary:
        _logger.info('Using native Torch AMP. Training in mixed precision.' if amp_dtype else
                     f'AMP not enabled. Training in {model_dtype or torch.float32}.')
    resolve_lr(args, log=primary)
    optimizer = create_optimizer_v2(optimizer_module(task, model), **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    if primary:
        defaults = {**optimizer.defaults, 'weight_decay': args.weight_decay}  # timm's line: wd is not in defaults
        _logger.info(f"Created {type(optimizer).__name__} ({args.opt}) optimizer: "
                     + ', '.join(f'{k}: {v}' for k, v in defaults.items()))

    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)
    mixup_fn, mixup_collate = create_mixup(args, model.num_classes, feed)
    loader_train = create_train_loader(args, dataset_train, data_config, device, feed, collate_fn=mixup_collate,
                                       model=model)
    if args.recovery_interval and not loader_train.resumable:
        raise ValueError(f"--recovery-interval: {loader_train.not_resumable}; drop it (epoch checkpoints still "
                         "resume)")
    loader_eval = create_eval_loader(args, dataset_eval, data_config, device, model=model) if dataset_eval else None

    resume_path = resolve_resume(args)
    point = ResumePoint()
    if resume_path:
        point = resume_training(args, resume_path, task, optimizer, loss_scaler, mixup_fn)
    if args.start_epoch is not None:
        point = ResumePoint(args.start_epoch)
    meter = restore_recovery(point.recovery, loader_train, device, skipped) if point.recovery else None
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None,
                                 broadcast_buffers=not args.no_ddp_bb)

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=eval_metric == 'loss'),
        updates_per_epoch=updates_per_epoch)
    num_updates = point.epoch * updates_per_epoch if point.num_updates is None else point.num_updates
    if num_updates > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(num_updates)
        else:
            lr_scheduler.step(point.epoch)

    output_dir = saver = None
    log_wandb = False
    if primary:
        # timm's name (time, model, image size), then the self-distillation method if any
        exp_name = args.experiment or '-'.join([
            datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(data_config['input_size'][-1]),
            *([method] if method else [])])
        output_dir = os.path.join(args.output or './output/train', exp_name)
        in_place = bool(resume_path) and os.path.isdir(output_dir) and os.path.samefile(
            os.path.dirname(os.path.abspath(resume_path)), output_dir)
        create_output_dir(output_dir, args_text, in_place, cleanup)
        log_wandb = start_wandb(args, exp_name)
        saver = TrainCheckpointSaver(
            model=model, optimizer=optimizer, args=args, amp_scaler=loss_scaler, checkpoint_dir=output_dir,
            recovery_dir=output_dir, decreasing=eval_metric == 'loss', max_history=args.checkpoint_hist,
            task=task, classes=dataset_classes(dataset_train))
        if in_place:
            resume_in_place(saver, resume_path, output_dir, point)
        if point.epoch >= num_epochs:
            _logger.info(
                f"Nothing left to train: resumed at epoch {point.epoch} of {num_epochs}; raise --epochs to train on")
        else:
            _logger.info(f"Training {args.model} ({method or 'cross-entropy'}) for {num_epochs} epochs, "
                         f"{len(loader_train)} steps per epoch, output {output_dir}")
            explain = ('(warmup_epochs + epochs + cooldown_epochs). Warmup added to total when warmup_prefix=True'
                       if args.warmup_prefix else
                       '(epochs + cooldown_epochs). Warmup within epochs when warmup_prefix=False')
            _logger.info(f"Scheduled epochs: {num_epochs} {explain}. "
                         f"LR stepped per {'epoch' if lr_scheduler.t_in_epochs else 'update'}.")
    collect = partial(gather_rank_states, task, mixup_fn, args)
    eval_model = task.get_eval_model()
    best = None
    results = []  # each evaluated epoch's metrics, for timm's `--result` print
    if preemption.stopping(wait=True):
        raise Preempted(f"preempted by {preemption.name} during start-up, before the first step: nothing to save. "
                        "Run the same command (with --resume auto) to start again.")
    recovery = RecoveryCheckpoints(interval=args.recovery_interval, loader=loader_train, preemption=preemption,
                                   collect=collect, saver=saver, skipped=skipped)
    if point.rng is not None:  # a resumed run draws what the stopped one would have (no per-epoch reseed, as timm)
        set_rng_state(point.rng)
    for epoch in range(point.epoch, num_epochs):
        loader_train.set_epoch(epoch)
        if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            for mixup in (mixup_fn, mixup_collate):
                if mixup is not None:
                    mixup.mixup_enabled = False
        if isinstance(task, SelfDistillationTask):
            task.set_epoch(epoch)

        train_metrics = train_one_epoch(
            epoch, task, loader_train, optimizer, device=device,
            lr_scheduler=lr_scheduler, mixup_fn=mixup_fn, loss_scaler=loss_scaler, amp_autocast=amp_autocast,
            grad_accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
            channels_last=args.channels_last, num_updates=num_updates, world_size=args.world_size,
            log_interval=args.log_interval, log_enabled=primary, meter=meter, on_step=partial(recovery, epoch),
            synchronize_step=args.synchronize_step, input_dtype=model_dtype, batch_loss_scale=batch_loss_scale(args),
            save_images_dir=output_dir if args.save_images else None)
        meter = None
        num_updates = int(train_metrics.pop('num_updates'))
        train_metrics['skipped'] = skipped.pop_count(args.distributed) if skipped is not None else 0
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            distribute_bn(model, args.world_size, args.dist_bn == 'reduce')

        if (epoch + 1) % args.val_interval and epoch + 1 != num_epochs:
            # timm's --val-interval: no evaluation, checkpoint or summary row this epoch (a stop signal is
            # answered after the next step, with a recovery checkpoint)
            lr_scheduler.step(epoch + 1, None)
            if primary:
                _logger.info(f"epoch {epoch}: train loss {train_metrics['loss']:.4f}; no evaluation or checkpoint "
                             f"(--val-interval {args.val_interval})")
            continue
        eval_metrics = {}
        if loader_eval is not None:
            evaluate = partial(validate, loader=loader_eval, device=device, amp_autocast=amp_autocast,
                               channels_last=args.channels_last, distributed=args.distributed,
                               world_size=args.world_size, log_interval=args.log_interval if primary else 0,
                               input_dtype=model_dtype, tta=args.tta)
            eval_metrics = evaluate(eval_model)
            if task.has_ema() and not args.model_ema_force_cpu:
                ema_model = task.get_trainable_module(ema=True)
                if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                    distribute_bn(ema_model, args.world_size, args.dist_bn == 'reduce')
                eval_metrics = evaluate(task.get_eval_model(ema=True), log_suffix=' (EMA)')
        metric = (eval_metrics or train_metrics)[eval_metric]
        results.append(dict(epoch=epoch, train=train_metrics, **({'validation': eval_metrics} if eval_metrics else {})))
        extra = collect()
        if primary:
            # the rate the epoch trained with (as timm's summary): read before the scheduler steps to the next one
            lr = sum(g['lr'] for g in optimizer.param_groups) / len(optimizer.param_groups)
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
            best = saver.save_checkpoint(epoch, metric=metric, extra={**extra, SUMMARY_ROW: row})
            append_summary(epoch, train_metrics, eval_metrics, os.path.join(output_dir, 'summary.csv'), lr=lr,
                           log_wandb=log_wandb)
        lr_scheduler.step(epoch + 1, metric)
        if epoch + 1 < num_epochs and preemption.stopping(wait=True):
            raise Preempted(f"preempted by {preemption.name} at the end of epoch {epoch}; its checkpoint is "
                            "saved. Resume with the same command and --resume auto.")

    if best is None and saver is not None and saver.best_metric is not None:  # resumed in place, nothing left to train
        best = (saver.best_metric, saver.best_epoch)
    result = dict(output_dir=output_dir, best_metric=best[0] if best else None, best_epoch=best[1] if best else None)
    if primary:
        if best is None:
            _logger.info("*** No epoch was trained in this run")
        else:
            _logger.info(f"*** Best metric: {result['best_metric']} (epoch {result['best_epoch']})")
        # timm's parsable result: the ten best evaluated epochs, best last (none when nothing was left to train)
        ranked = sorted(results, key=lambda r: r.get('validation', r['train'])[eval_metric],
                        reverse=eval_metric == 'loss')
        if ranked:
            print(f"--result\n{json.dumps(ranked[-10:], indent=4)}")
    if primary and args.push_to_hub and output_dir:
        from sdpgo_timm.hub import HubError, push_checkpoint
        best_path = os.path.join(output_dir, 'model_best.pth.tar')
        try:
            with preemption.raising():  # an upload has no step to stop at: a signal stops it at once
                result['hub_url'] = push_checkpoint(best_path, args.push_to_hub, use_ema=task.has_ema())
        except (HubError, Interrupted) as e:  # the run is complete and saved; only the upload is left to do
            reason = f"the push was interrupted by {e}" if isinstance(e, Interrupted) else str(e)
            raise PushFailed(f"{reason}. The run itself is complete in {output_dir!r}: push it later with "
                             f"python -m sdpgo_timm.hub push {best_path} {args.push_to_hub}") from None
    return result


def main(argv=None) -> int:
    """The exit status of sdpgo_timm.runner.errors: 0 done, 1 trained but the Hub push failed, 2 bad input, 3
    non-finite loss, 4 preempted or Ctrl-C (resume with --resume auto), 5 a write failed, 6 out of memory, 130 a
    second Ctrl-C."""
    setup_script_logging()
    args = None
    try:
        args, args_text = parse_args(argv)
        with ExitStack() as cleanup:
            run(args, args_text, cleanup)
    except RunError as e:
        _logger.error(e.line())
        return e.exit_status
    except ValueError as e:  # bad input found by timm or torch while setting up
        _logger.error(f"error: {e}")
        return errors.BAD_INPUT
    except (RuntimeError, MemoryError) as e:
        oom = errors.out_of_memory(e, args.batch_size) if args is not None else None
        if oom is None:
            raise
        _logger.error(oom.line())
        return oom.exit_status
    except KeyboardInterrupt:
        _logger.error("error: interrupted twice (Ctrl-C): stopped at once, without a recovery checkpoint; the "
                      "checkpoints already written are intact")
        return errors.INTERRUPTED
    return errors.DONE


if __name__ == '__main__':
    sys.exit(main())
