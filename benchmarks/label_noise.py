#!/usr/bin/env python3
"""Robustness to noisy labels on `digits`: CE, label smoothing, DLB, PS-KD and SDPGO.

Every run is a real `train.py digits ...` run (in-process, through `train.main`), so the
numbers come from the product. Symmetric (or `--noise asym`: class c -> c+1) noise of rate
η is put on the training labels; top-1 is measured on the clean validation split at the
last epoch (not the best epoch, which would peek at the validation set).

Equal budget: every method trains the same number of epochs AND the same number of
optimizer steps over the same fresh samples per step. The replay methods (SDPGO, DLB) run
`--batch-size B` (B/2 replay + B/2 fresh); CE, label smoothing and PS-KD run
`--batch-size B/2`, so each step of every method sees B/2 new samples.

    python benchmarks/label_noise.py                 # full table (several minutes per seed)
    python benchmarks/label_noise.py --quick         # smoke run
    python benchmarks/label_noise.py --jobs 2 --threads 1   # two runs at a time on 2 cores
"""
import argparse
import csv
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (the product's own entry point)

# method -> extra train.py flags; `replay` methods take the full batch, the others half of it
METHODS: Dict[str, Dict] = {
    'CE': dict(flags=['--smoothing', '0'], replay=False),
    'CE+LS': dict(flags=['--smoothing', '0.1'], replay=False),
    'DLB': dict(flags=['--smoothing', '0', '--skd', 'dlb'], replay=True),
    'PS-KD': dict(flags=['--smoothing', '0', '--skd', 'pskd'], replay=False),
    'SDPGO': dict(flags=['--smoothing', '0', '--sdpgo'], replay=True),
}
COLORS = {'CE': (80, 80, 80), 'CE+LS': (150, 150, 150), 'DLB': (31, 119, 180), 'PS-KD': (44, 160, 44),
          'SDPGO': (214, 39, 40)}


def run_one(method: str, eta: float, seed: int, args: argparse.Namespace, out_dir: str) -> Dict[str, float]:
    """Train once; return the last epoch's clean validation top-1 and the run's step count."""
    spec = METHODS[method]
    batch = args.batch_size if spec['replay'] else args.batch_size // 2
    extra = [f for f in args.extra.split() if f]
    experiment = f"{method}-{args.noise}{eta}-s{seed}".replace('+', 'p')
    argv = ['digits', '--model', args.model, '--epochs', str(args.epochs), '--batch-size', str(batch),
            '--seed', str(seed), '--label-noise', str(eta), '--label-noise-mode', args.noise,
            '--input-size', '3', str(args.img_size), str(args.img_size), '--workers', '0',
            '--log-interval', '1000', '--output', out_dir, '--experiment', experiment, '--checkpoint-hist', '1',
            *spec['flags'], *extra]
    status = train.main(argv)
    if status != 0:
        raise RuntimeError(f"train.py {' '.join(argv)} exited with {status}")
    with open(os.path.join(out_dir, experiment, 'summary.csv')) as f:
        rows = list(csv.DictReader(f))
    return dict(top1=float(rows[-1]['eval_top1']), steps=sum(int(float(r['train_steps'])) for r in rows))


class _Serial(Executor):
    """Runs each submitted call at once, in this process (--jobs 1)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(threads)


def _executor(args: argparse.Namespace) -> Executor:
    """--jobs worker processes (forked, each with --threads torch threads), or this process."""
    if args.jobs == 1:
        return _Serial()
    return ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context('fork'),
                               initializer=_set_threads, initargs=(args.threads,))


def mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def plot(results: Dict[str, Dict[float, List[float]]], etas: Sequence[float], path: str, title: str) -> None:
    """A line per method: mean top-1 over η (drawn with Pillow, no plotting dependency)."""
    w, h, left, right, top, bottom = 720, 460, 70, 150, 40, 60
    img = Image.new('RGB', (w, h), 'white')
    draw = ImageDraw.Draw(img)
    means = {m: [statistics.mean(results[m][e]) for e in etas] for m in results}
    lo = min(min(v) for v in means.values())
    lo = max(0.0, 10 * int(lo // 10) - 10)
    hi = 100.0

    def xy(i, acc):
        x = left + (w - left - right) * (i / max(1, len(etas) - 1))
        y = top + (h - top - bottom) * (1 - (acc - lo) / (hi - lo))
        return x, y

    draw.rectangle([left, top, w - right, h - bottom], outline='black')
    for tick in range(int(lo), int(hi) + 1, 10):
        _, y = xy(0, tick)
        draw.line([left - 5, y, left, y], fill='black')
        draw.text((left - 35, y - 6), f"{tick}", fill='black')
    for i, eta in enumerate(etas):
        x, _ = xy(i, lo)
        draw.line([x, h - bottom, x, h - bottom + 5], fill='black')
        draw.text((x - 10, h - bottom + 10), f"{eta:g}", fill='black')
    draw.text((left + (w - left - right) // 2 - 40, h - 25), 'label noise eta', fill='black')
    draw.text((10, top - 25), title, fill='black')
    for k, (method, values) in enumerate(means.items()):
        color = COLORS.get(method, (0, 0, 0))
        points = [xy(i, v) for i, v in enumerate(values)]
        draw.line(points, fill=color, width=3)
        for x, y in points:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        draw.line([w - right + 15, top + 20 * k + 8, w - right + 40, top + 20 * k + 8], fill=color, width=3)
        draw.text((w - right + 45, top + 20 * k), method, fill='black')
    img.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    parser.add_argument('--etas', nargs='+', type=float, default=[0.0, 0.2, 0.4])
    parser.add_argument('--noise', default='sym', choices=('sym', 'asym'))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--model', default='resnet10t')
    parser.add_argument('--img-size', type=int, default=16)
    parser.add_argument('--epochs', type=int, default=10)
    parser.add_argument('--batch-size', type=int, default=64, help='batch of the replay methods (others: half)')
    parser.add_argument('--extra', default='', help='more train.py flags for every run, e.g. "--sdpgo-topk 3"')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    parser.add_argument('--jobs', type=int, default=1,
                        help='runs in parallel, one process each (e.g. --jobs 2 --threads 1 on 2 cores); '
                             'the results do not depend on it')
    for ext in ('md', 'csv', 'png'):
        parser.add_argument(f'--out-{ext}', help=f"default: benchmarks/results/label_noise.{ext} "
                                                f"(label_noise_quick.{ext} with --quick)")
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: one seed, eta 0 and 0.4, 1 epoch of timm test_resnet at 8 px')
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.etas, args.epochs, args.img_size, args.model = args.seeds[:1], [0.0, 0.4], 1, 8, 'test_resnet'
    stem = 'label_noise_quick' if args.quick else 'label_noise'
    for ext in ('md', 'csv', 'png'):  # a smoke run never overwrites the full tables
        if getattr(args, f'out_{ext}') is None:
            setattr(args, f'out_{ext}', str(ROOT / 'benchmarks' / 'results' / f'{stem}.{ext}'))
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    _set_threads(args.threads)

    results: Dict[str, Dict[float, List[float]]] = {m: {e: [] for e in args.etas} for m in args.methods}
    rows = []
    start = time.time()
    runs = [(method, eta, seed) for seed in args.seeds for eta in args.etas for method in args.methods]
    with tempfile.TemporaryDirectory() as out_dir, _executor(args) as pool:
        futures = [pool.submit(run_one, method, eta, seed, args, out_dir) for method, eta, seed in runs]
        for (method, eta, seed), future in zip(runs, futures):
            r = future.result()
            results[method][eta].append(r['top1'])
            rows.append(dict(method=method, noise=args.noise, eta=eta, seed=seed, **r))
            print(f"{method:6s} eta={eta:<4g} seed={seed} top1={r['top1']:.2f} steps={r['steps']}", flush=True)

    for path in (args.out_md, args.out_csv, args.out_png):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out_csv, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    steps = {m: next(r['steps'] for r in rows if r['method'] == m) for m in args.methods}
    lines = [
        f"# Label noise ({args.noise}) on digits: clean validation top-1 (%) at the last epoch",
        '',
        f"`{shlex.join(['python', 'benchmarks/label_noise.py', *(argv if argv is not None else sys.argv[1:])])}`",
        '',
        f"{args.model} at {args.img_size} px, {args.epochs} epochs, seeds {args.seeds}, torch {torch.__version__}; "
        f"replay methods at --batch-size {args.batch_size}, the others at {args.batch_size // 2}; "
        f"optimizer steps per run: " + ', '.join(f"{m} {s}" for m, s in steps.items()) + '. '
        f"Wall time {time.time() - start:.0f} s.",
        '',
        '| method | ' + ' | '.join(f"η = {e:g}" for e in args.etas) + ' |',
        '|---|' + '---:|' * len(args.etas),
    ]
    for method in args.methods:
        lines.append(f"| {method} | " + ' | '.join(mean_std(results[method][e]) for e in args.etas) + ' |')
    table = '\n'.join(lines) + '\n'
    Path(args.out_md).write_text(table)
    plot(results, args.etas, args.out_png, f"digits, {args.noise} label noise, {args.model}, {args.epochs} epochs "
                                           f"{args.extra}: last-epoch top-1 vs eta")
    print(table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
