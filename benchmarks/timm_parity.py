#!/usr/bin/env python3
"""Plain runs (no --sdpgo) of our train.py against timm's own train.py: same command line, same seed.

    python benchmarks/timm_parity.py --timm-scripts ~/pytorch-image-models            # run both, compare
    python benchmarks/timm_parity.py --timm-scripts DIR --write tests/data/timm_parity.json

timm's train.py is not in the timm package; `--timm-scripts` is a checkout of
huggingface/pytorch-image-models (its train.py runs against the installed timm). Each case trains
timm's `test_resnet` for 3 epochs on a generated 3-class image folder, on the CPU with `--workers 0`
and one thread, and compares what both scripts report: summary.csv's timm columns (epoch,
train_loss, eval_loss, eval_top1, eval_top5, lr), the numbers of every `Train:` progress line
(epoch, update, loss now, running loss, lr) and the loss of every backward pass at full precision (each
script runs under a recorder that reads the 0-dim tensor `Tensor.backward` is called on). Run side by
side, both must agree exactly. `--write` records timm's side as the reference that
tests/test_timm_parity.py holds our train.py to (naming the timm commit it came from); the test compares
the machine-independent part exactly and the float results with margins argued from the kernels.
"""
import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ('cat', 'dog', 'fox')
SUMMARY_COLUMNS = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr')
COMMON = ['--model', 'test_resnet', '--num-classes', '3', '--img-size', '32', '-b', '16', '--epochs', '3',
          '--workers', '0', '--warmup-epochs', '1', '--seed', '0', '--device', 'cpu', '--lr', '0.05',
          '--log-interval', '2']
# each case exercises a part of timm's loop: the plain step, Mixup/CutMix in the prefetcher's collate, Mixup in the
# loop with accumulation, clipping, per-update schedule and EMA, and RandAugment / random erasing / AdamW / a step
# schedule / drop path / bfloat16 autocast / BCE, and training without evaluation
CASES: Dict[str, List[str]] = {
    'plain': [],
    'mixup_prefetcher': ['--mixup', '0.4', '--cutmix', '1.0'],
    'mixup_accum_ema': ['--mixup', '0.4', '--cutmix', '1.0', '--grad-accum-steps', '2', '--clip-grad', '1',
                        '--sched-on-updates', '--no-prefetcher', '--model-ema', '--model-ema-decay', '0.9',
                        '--model-ema-warmup'],
    'augment_adamw_bf16': ['--aa', 'rand-m9-mstd0.5', '--reprob', '0.25', '--opt', 'adamw', '--lr', '0.002',
                           '--sched', 'step', '--decay-epochs', '1', '--amp', '--amp-dtype', 'bfloat16',
                           '--drop-path', '0.1'],
    'bce_lamb': ['--bce-loss', '--smoothing', '0.1', '--opt', 'lamb', '--lr', '0.01', '--clip-mode', 'agc',
                 '--clip-grad', '0.05'],
    'no_validation': ['--val-split', ''],  # no evaluation: the training loss picks the best checkpoint
}
_LOSS_LINE = 'timm-parity backward loss: '
# runs a train.py (sys.argv[1]) as `python train.py ...` would, printing the loss of each backward pass
_RECORDER = f'''
import os, runpy, sys, torch
backward = torch.Tensor.backward
def recorded(loss, *args, **kwargs):
    if loss.dim() == 0:
        print({_LOSS_LINE!r} + repr(loss.item()), file=sys.stderr, flush=True)
    return backward(loss, *args, **kwargs)
torch.Tensor.backward = recorded
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python train.py` sets it
runpy.run_path(sys.argv[0], run_name='__main__')
'''
_PROGRESS = re.compile(r'Train: (\d+) \[\s*(\d+)/\d+ \(\s*\d+%\)\]\s+Loss: (\S+) \((\S+)\).*LR: (\S+)')


def write_image_folder(root: Path) -> Path:
    """train/ (32 per class) and validation/ (12 per class) 32x32 PNGs: a class-coloured square on noise."""
    for split, seed, count in (('train', 0, 32), ('validation', 1, 12)):
        rng = np.random.RandomState(seed)
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.randint(0, 64, size=(32, 32, 3), dtype=np.uint8)
                y, x = rng.randint(0, 16, size=2)
                img[y:y + 16, x:x + 16, c] = 255
                Image.fromarray(img).save(folder / f'{name}_{i}.png')
    return root


def parse_progress(lines: List[str]) -> List[List[float]]:
    """[epoch, update, loss now, running loss, lr] of each timm `Train:` progress line."""
    return [[float(v) for v in m.groups()] for m in map(_PROGRESS.search, lines) if m]


def parse_losses(lines: List[str]) -> List[float]:
    """The loss of each backward pass, as the recorder printed it."""
    return [float(line.split(_LOSS_LINE, 1)[1]) for line in lines if _LOSS_LINE in line]


def read_summary(path: Path) -> List[Dict[str, float]]:
    """summary.csv's rows, timm's columns only (those it has: no eval_* without evaluation)."""
    with open(path, newline='') as f:
        return [{k: float(row[k]) for k in SUMMARY_COLUMNS if k in row} for row in csv.DictReader(f)]


def run_script(script: Path, data: Path, case: List[str], output: Path, name: str) -> Dict[str, list]:
    """Run a train.py (ours or timm's) on one thread; its summary rows, progress lines and backward losses."""
    argv = [sys.executable, '-c', _RECORDER, str(script), str(data), *COMMON, *case, '--output', str(output),
            '--experiment', name]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    done = subprocess.run(argv, cwd=script.parent, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{script} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    log = (done.stdout + done.stderr).splitlines()
    return dict(summary=read_summary(output / name / 'summary.csv'), progress=parse_progress(log),
                losses=parse_losses(log))


def timm_commit(scripts: Path) -> str:
    done = subprocess.run(['git', '-C', str(scripts), 'rev-parse', 'HEAD'], capture_output=True, text=True)
    return done.stdout.strip() or 'unknown'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--timm-scripts', required=True, type=Path,
                        help='folder holding timm\'s train.py (a pytorch-image-models checkout)')
    parser.add_argument('--write', type=Path, default=None, help='record timm\'s results to this JSON file')
    parser.add_argument('--timm-commit', default=None,
                        help='the commit the scripts are from, recorded with --write (default: the checkout\'s HEAD)')
    parser.add_argument('--cases', nargs='+', default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_image_folder(Path(tmp) / 'data')
        reference = {}
        failed = []
        for name in args.cases:
            theirs = run_script(args.timm_scripts / 'train.py', data, CASES[name], Path(tmp) / 'out', f'{name}-timm')
            reference[name] = dict(argv=CASES[name], **theirs)
            if args.write:
                continue
            ours = run_script(ROOT / 'train.py', data, CASES[name], Path(tmp) / 'out', f'{name}-ours')
            same = np.allclose(np.array([list(r.values()) for r in ours['summary']]),
                               np.array([list(r.values()) for r in theirs['summary']]), rtol=1e-9, atol=0) and \
                ours['progress'] == theirs['progress'] and ours['losses'] == theirs['losses']
            print(f"{name}: {'same' if same else 'DIFFERENT'}")
            for a, b in zip(theirs['summary'], ours['summary']):
                print(f"  epoch {int(a['epoch'])}: timm loss {a['train_loss']:.10f} top1 {a.get('eval_top1', '-')} | "
                      f"ours loss {b['train_loss']:.10f} top1 {b.get('eval_top1', '-')}")
            if not same:
                failed.append(name)
    if args.write:
        args.write.write_text(json.dumps(dict(
            timm_commit=args.timm_commit or timm_commit(args.timm_scripts), common=COMMON, cases=reference), indent=1) + '\n')
        print(f"wrote {args.write}")
        return 0
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
