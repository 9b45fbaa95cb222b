#!/usr/bin/env python3
"""One prepared GPU check: the CUDA tests, train.py and validate.py end to end, and the step-cost tables.

    python benchmarks/gpu_check.py OUT_DIR              # on a GPU machine (about 8 minutes on one H200)
    python benchmarks/gpu_check.py OUT_DIR --dry-run    # the same steps on the CPU, tiny (a minute or two)

Each step writes its log to OUT_DIR/<step>.log and a line to OUT_DIR/summary.md (status, wall
time); the step-cost tables land in OUT_DIR/step_cost_*.md/.csv. A failing step does not stop
the others. The exit status is 0 only if every step passed.

Steps:
1. `env`: GPU, driver, torch and timm versions.
2. `cuda_tests`: `pytest -m cuda` (bf16/fp16 α against fp32, channels_last and compile gradients,
   no host sync per step, bit-exact GPU resume).
3. `train_fp16`: train.py on a generated ImageNet-shaped folder, `--amp --amp-dtype float16`,
   then `train_bf16_compiled`: bf16 with `--channels-last --torchcompile`, then `validate` of the
   last checkpoint.
4. `step_cost_eager` / `step_cost_compiled`: benchmarks/step_cost.py at 224 px, batch 128, bf16,
   channels_last, for resnet50, deit_small_patch16_224 and swin_tiny_patch4_window7_224 (eager: every
   method; compiled: CE, SDPGO and the authors' two-forward DLB, to stay within the time).
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODELS = ['resnet50', 'deit_small_patch16_224', 'swin_tiny_patch4_window7_224']


def write_folder(root: Path, size: int, classes: int, per_class: int) -> Path:
    """An ImageFolder (train/, validation/) of JPEGs: a class-coloured square on noise, so classes are learnable."""
    rng = np.random.RandomState(0)
    for split, count in (('train', per_class), ('validation', max(2, per_class // 4))):
        for c in range(classes):
            folder = root / split / f'class_{c:03d}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.randint(0, 96, size=(size, size, 3), dtype=np.uint8)
                y, x = rng.randint(0, size // 2, size=2)
                img[y:y + size // 2, x:x + size // 2, c % 3] = 255 - 20 * (c // 3)
                Image.fromarray(img).save(folder / f'{i:04d}.jpg', quality=90)
    return root


def plan(out: Path, dry_run: bool) -> List[Tuple[str, List[str]]]:
    """(step name, command) pairs; the dry run keeps every step but runs it on the CPU at toy sizes."""
    py = sys.executable
    data = out / 'data'
    if dry_run:
        train = ['--model', 'test_resnet', '--img-size', '32', '-b', '8', '--epochs', '1', '--workers', '0',
                 '--device', 'cpu', '--sdpgo', '--warmup-epochs', '0']
        cost = ['--device', 'cpu', '--img-size', '32', '--batch-size', '8', '--warmup', '1', '--repeats', '2',
                '--num-samples', '64', '--models', 'resnet18', '--threads', '1', '--mem-jobs', '2']
        compiled = ['--compile', 'aot_eager']
        torchcompile = ['--torchcompile', 'aot_eager']
    else:
        train = ['--model', 'resnet50', '--img-size', '224', '-b', '64', '--epochs', '2', '--workers', '8',
                 '--sdpgo', '--warmup-epochs', '0', '--lr', '0.05']
        cost = ['--device', 'cuda', '--img-size', '224', '--batch-size', '128', '--amp', '--channels-last',
                '--warmup', '3', '--repeats', '15', '--models', *MODELS, '--mem-jobs', '6']
        compiled = ['--compile']
        torchcompile = ['--torchcompile']
    runs = out / 'runs'
    steps = [
        ('env', [py, '-c', 'import shutil, subprocess, torch, timm; print("torch", torch.__version__, "cuda", '
                 'torch.version.cuda, "timm", timm.__version__); print(torch.cuda.get_device_name() if '
                 'torch.cuda.is_available() else "no CUDA device"); '
                 'shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi"], check=False)']),
        ('cuda_tests', [py, '-m', 'pytest', '-q', '-m', 'cuda', 'tests/test_cuda.py']),
        ('train_fp16', [py, 'train.py', str(data), *train, '--amp', '--amp-dtype', 'float16',
                        '--output', str(runs), '--experiment', 'fp16']),
        ('train_bf16_compiled', [py, 'train.py', str(data), *train, '--amp', '--amp-dtype', 'bfloat16',
                                 '--channels-last', *torchcompile, '--output', str(runs), '--experiment', 'bf16']),
        ('validate', [py, 'validate.py', str(data), '--checkpoint', str(runs / 'bf16' / 'last.pth.tar'),
                      '--workers', '0' if dry_run else '8', *(['--device', 'cpu'] if dry_run else ['--amp'])]),
        ('step_cost_eager', [py, 'benchmarks/step_cost.py', *cost, '--out-md', str(out / 'step_cost_eager.md'),
                             '--out-csv', str(out / 'step_cost_eager.csv')]),
        ('step_cost_compiled', [py, 'benchmarks/step_cost.py', *cost, *compiled, '--methods', 'ce', 'sdpgo', 'dlb2',
                                '--out-md', str(out / 'step_cost_compiled.md'),
                                '--out-csv', str(out / 'step_cost_compiled.csv')]),
    ]
    return steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir', help='folder for the logs, tables and summary (created)')
    parser.add_argument('--dry-run', action='store_true', help='run every step on the CPU at toy sizes')
    parser.add_argument('--steps', nargs='+', default=None, metavar='STEP',
                        help='run only these steps (default: all; validate reads train_bf16_compiled\'s checkpoint)')
    args = parser.parse_args(argv)
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    size, classes, per_class = (32, 3, 16) if args.dry_run else (224, 10, 64)
    write_folder(out / 'data', size, classes, per_class)
    summary = [f"# GPU check{' (dry run, CPU)' if args.dry_run else ''}", '',
               '| step | status | wall s | log |', '|---|---|---:|---|']
    failed = 0
    steps = plan(out, args.dry_run)
    unknown = sorted(set(args.steps or ()) - {name for name, _ in steps})
    if unknown:
        parser.error(f"unknown step(s) {unknown}; steps: {', '.join(name for name, _ in steps)}")
    for name, command in steps:
        if args.steps and name not in args.steps:
            continue
        start = time.time()
        with open(out / f'{name}.log', 'w') as log:
            log.write('$ ' + ' '.join(command) + '\n')
            log.flush()
            status = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, PYTHONPATH=str(ROOT))).returncode
        failed += status != 0
        summary.append(f"| {name} | {'ok' if status == 0 else f'FAILED ({status})'} | {time.time() - start:.0f} "
                       f"| {name}.log |")
        print(summary[-1], flush=True)
    (out / 'summary.md').write_text('\n'.join(summary) + '\n')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
