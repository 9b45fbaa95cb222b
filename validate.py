#!/usr/bin/env python3
"""Evaluate timm models and SDPGO training checkpoints: timm's validate.py command line.

    python validate.py digits --checkpoint output/train/<run>/model_best.pth.tar
    python validate.py imagenet --model resnet50 --checkpoint model_best.pth.tar --use-ema --amp
    python validate.py /data/imagenet --model resnet50 --pretrained --results-file results.csv
    python validate.py imagenet --checkpoint model_best.pth.tar --real-labels real.json   # ImageNet-ReaL

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
from sdpgo_timm.runner.evaluation import create_eval_model, create_real_labels, write_results
from sdpgo_timm.runner.setup import create_autocast, create_eval_loader, default_device, setup_script_logging

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
    dataset = create_split_dataset(args, args.split, is_training=False)
    model = create_eval_model(args, dataset, checkpoint, path)
    param_count = sum(p.numel() for p in model.parameters())
    real_labels = create_real_labels(args.real_labels, dataset, model.num_classes) if args.real_labels else None
    random_seed(args.seed)
    data_config = resolve_data_config(vars(args), model=model, use_test_size=not args.use_train_size, verbose=True)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.num_gpu > 1:
        model = torch.nn.DataParallel(model, device_ids=list(range(args.num_gpu)))
    loader = create_eval_loader(args, dataset, data_config, device)
    amp_autocast, _ = create_autocast(args, device)
    metrics = validate(model, loader, device=device, amp_autocast=amp_autocast, channels_last=args.channels_last,
                       log_interval=args.log_freq, on_output=real_labels.add_result if real_labels else None)
    if real_labels is not None:  # as timm's validate.py: ReaL accuracy replaces top-1/top-5
        metrics.update(top1=real_labels.get_accuracy(k=1), top5=real_labels.get_accuracy(k=real_labels.topk[-1]))
    result = dict(
        model=args.model, checkpoint=path, split=args.split,
        top1=round(metrics['top1'], 4), top1_err=round(100 - metrics['top1'], 4),
        top5=round(metrics['top5'], 4), top5_err=round(100 - metrics['top5'], 4),
        loss=round(metrics['loss'], 4), img_per_sec=round(metrics['img_per_sec'], 1),
        param_count=round(param_count / 1e6, 2), img_size=data_config['input_size'][-1],
        crop_pct=data_config['crop_pct'], interpolation=data_config['interpolation'])
    _logger.info(f"{args.model} {path}: top1 {result['top1']:.3f} top5 {result['top5']:.3f} "
                 f"loss {result['loss']:.4f} ({result['img_per_sec']:.1f} img/s)")
    return result


def main(argv=None) -> int:
    setup_script_logging()
    try:
        args = parse_validate_args(argv)
        results = [evaluate(args, path) for path in checkpoint_paths(args.checkpoint)]
        if args.results_file:
            write_results(args.results_file, results)
    except RunError as e:  # bad options or checkpoints (2), a results file that cannot be written (5)
        _logger.error(e.line())
        return e.exit_status
    except ValueError as e:  # options that do not fit, found by timm or torch
        _logger.error(f"error: {e}")
        return errors.BAD_INPUT
    print(f'--result\n{json.dumps(results, indent=4)}')
    return errors.DONE


if __name__ == '__main__':
    sys.exit(main())
