#!/usr/bin/env python3
"""Evaluate timm models and SDPGO training checkpoints: timm's validate.py command line.

    python validate.py digits --checkpoint output/train/<run>/model_best.pth.tar
    python validate.py imagenet --model resnet50 --checkpoint model_best.pth.tar --use-ema --amp
    python validate.py /data/imagenet --model resnet50 --pretrained --results-file results.csv
    python validate.py imagenet --checkpoint model_best.pth.tar --real-labels real.json   # ImageNet-ReaL
    python validate.py /data/imagenet-r -m resnet50 --pretrained --valid-labels r_classes.txt --retry

The positional argument is a data folder or a benchmark name, as for train.py. What the
command line leaves unset (--model, input size, mean/std, crop, interpolation, classes) comes
from the checkpoint's training args, else from the benchmark's recipe. `--checkpoint DIR`
evaluates every *.pth.tar in DIR. Prints one result dict per model (JSON, after a `--result`
line); bad input is one error line and exit status 2.

Argument parsing and wiring only; the logic lives in sdpgo_timm.
"""
import glob
import json
import logging
import os
import sys
from typing import Any, Dict, List

import torch
from timm.data import resolve_data_config
from timm.utils import random_seed

from sdpgo_timm.data.factory import create_split_dataset
from sdpgo_timm.runner import errors
from sdpgo_timm.runner.args import parse_validate_args, resolve_eval_args
from sdpgo_timm.runner.checkpoint import load_weights_file
from sdpgo_timm.runner.engine import validate
from sdpgo_timm.runner.errors import ConfigError, RunError
from sdpgo_timm.runner.evaluation import (
    ClassMetrics, EvaluationFailed, ValidLabels, apply_test_pool, call_all, compile_eval_model, create_eval_model,
    create_real_labels, create_validate_loader, evaluate_with_retry,
    read_valid_labels, write_results)
from sdpgo_timm.runner.naflex import model_patch_size
from sdpgo_timm.runner.setup import create_autocast, default_device, resolve_model_dtype, setup_script_logging

_logger = logging.getLogger('validate')


def checkpoint_paths(checkpoint: str) -> List[str]:
    """[checkpoint] ('' evaluates the model without one), or every *.pth.tar of a folder in name order."""
    if not os.path.isdir(checkpoint):
        return [checkpoint]
    paths = sorted(glob.glob(os.path.join(checkpoint, '*.pth.tar')))
    if not paths:
        raise ConfigError(f"--checkpoint folder {checkpoint!r} holds no *.pth.tar file")
    return paths


def evaluate(args, path: str) -> Dict[str, Any]:
    """Evaluate one model, with the weights of the checkpoint at `path` if given; its result dict."""
    checkpoint = load_weights_file(path) if path else None
    args = resolve_eval_args(args, checkpoint.get('args') if checkpoint else None)
    device = torch.device(default_device(args.device))
    if args.num_gpu > 1 and (device.type != 'cuda' or args.num_gpu > torch.cuda.device_count()):
        raise ConfigError(f"--num-gpu {args.num_gpu} needs that many CUDA devices; this run has "
                          f"{torch.cuda.device_count() if device.type == 'cuda' else 0} on {device.type}")
    dtype = resolve_model_dtype(args)
    dataset = create_split_dataset(args, args.split, is_training=False)
    model = create_eval_model(args, dataset, checkpoint, path)
    param_count = sum(p.numel() for p in model.parameters())
    valid_labels = read_valid_labels(args.valid_labels, model.num_classes, dataset) if args.valid_labels else None
    num_outputs = len(valid_labels) if valid_labels else model.num_classes
    real_labels = create_real_labels(args.real_labels, dataset, num_outputs) if args.real_labels else None
    patch_size = model_patch_size(model, args.model) if args.naflex_loader else None
    random_seed(args.seed)
    data_config = resolve_data_config(vars(args), model=model, use_test_size=not args.use_train_size, verbose=True)
    if args.test_pool:
        model = apply_test_pool(model, data_config)
    model.to(device=device, dtype=dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model = compile_eval_model(model, args)
    if args.num_gpu > 1:
        model = torch.nn.DataParallel(model, device_ids=list(range(args.num_gpu)))
    if valid_labels:
        model = ValidLabels(model, valid_labels, device)
    loader = create_validate_loader(args, dataset, data_config, device, patch_size)
    scores = ClassMetrics(args.metrics_avg) if args.metrics_avg else None
    on_output = call_all(real_labels.add_result if real_labels else None, scores.add_output if scores else None)
    amp_autocast, _ = create_autocast(args, device)
    metrics = validate(model, scores.batches(loader) if scores else loader, device=device, amp_autocast=amp_autocast,
                       channels_last=args.channels_last, log_interval=args.log_freq, log_style='validate',
                       on_output=on_output)
    if real_labels is not None:  # as timm's validate.py: ReaL accuracy replaces top-1/top-5
        metrics.update(top1=real_labels.get_accuracy(k=1), top5=real_labels.get_accuracy(k=real_labels.topk[-1]))
    class_metrics = scores.results() if scores else {}
    # timm's result keys in timm's order, then ours
    result = dict(
        model=args.model, top1=round(metrics['top1'], 4), top1_err=round(100 - metrics['top1'], 4),
        top5=round(metrics['top5'], 4), top5_err=round(100 - metrics['top5'], 4), **class_metrics,
        param_count=round(param_count / 1e6, 2), img_size=data_config['input_size'][-1],
        crop_pct=data_config['crop_pct'], interpolation=data_config['interpolation'],
        checkpoint=path, split=args.split, loss=round(metrics['loss'], 4),
        img_per_sec=round(metrics['img_per_sec'], 1))
    line = (f" * Acc@1 {result['top1']:.3f} ({result['top1_err']:.3f}) "
            f"Acc@5 {result['top5']:.3f} ({result['top5_err']:.3f})")
    if class_metrics:
        avg = args.metrics_avg
        line += (f" | Precision({avg}) {class_metrics[f'{avg}_precision']:.3f} | Recall({avg}) "
                 f"{class_metrics[f'{avg}_recall']:.3f} | F1-score({avg}) {class_metrics[f'{avg}_f1_score']:.3f}")
    _logger.info(f"{line} | loss {result['loss']:.4f} | {result['img_per_sec']:.1f} img/s | {args.model} {path}")
    return result


def main(argv=None) -> int:
    setup_script_logging()
    args = None
    try:
        args = parse_validate_args(argv)
        results, failed = [], 0
        for path in checkpoint_paths(args.checkpoint):
            try:
                results.append(evaluate_with_retry(evaluate, args, path) if args.retry else evaluate(args, path))
            except EvaluationFailed as e:  # --retry: every batch size failed; go on with the other checkpoints
                _logger.error(e.line())
                failed += 1
        if args.results_file and results:
            write_results(args.results_file, results, args.results_format)
    except RunError as e:  # bad options or checkpoints (2), a results file that cannot be written (5)
        _logger.error(e.line())
        return e.exit_status
    except ValueError as e:  # options that do not fit, found by timm or torch
        _logger.error(f"error: {e}")
        return errors.BAD_INPUT
    except (RuntimeError, MemoryError) as e:  # out of memory without --retry
        oom = errors.out_of_memory(e, args.batch_size) if args is not None else None
        if oom is None:
            raise
        _logger.error(oom.line())
        return oom.exit_status
    print(f'--result\n{json.dumps(results, indent=4)}')
    return EvaluationFailed.exit_status if failed else errors.DONE


if __name__ == '__main__':
    sys.exit(main())
