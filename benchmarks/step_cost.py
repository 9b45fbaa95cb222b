#!/usr/bin/env python3
"""Step cost of SDPGO against CE and its relatives (and teacher KD): time per optimizer step and peak memory.

For every model, each method trains the same timm model on the same synthetic batch of n
images (`--batch-size`), fed in the order its loader would give (views-mode replay batches
[previous fresh half; fresh half] with indices for SDPGO/DLB, plain batches with indices for
PS-KD), and one optimizer step (zero_grad + task forward + backward + SGD step) is timed.
Methods are timed round-robin in one process (A B C ... A B C ..., the order rotated each
round) after `--warmup` steps each, so that drifts of the machine hit all of them alike;
the table reports the median. Peak memory comes from a fresh process per method (this script
with `--single METHOD`): VmHWM of the process on CPU (Python, torch, model, optimizer state
and activations, nothing subtracted; ru_maxrss would inherit the parent's peak), and
`torch.cuda.max_memory_allocated` on CUDA.

    python benchmarks/step_cost.py                     # resnet50, deit_small, swin_tiny; 64 px, n=32, CPU
    python benchmarks/step_cost.py --device cuda --img-size 224 --batch-size 128 --amp
    python benchmarks/step_cost.py --quick             # resnet18 at 32 px: a smoke run

Transformers fix their token grid at creation, so ViT/DeiT get `img_size=` and Swin also a
`window_size` that tiles its stages (see `model_kwargs`).

KD is timm's logit distillation (timm.task.LogitDistillationTask, train.py's --kd-model-name) from a
teacher of `--kd-teacher` (default: the student's architecture) in random initialisation: its weights
do not change the cost of its forward, so none need be trained or downloaded.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Dict, Iterator, List, Optional

import timm
import torch
import torch.nn as nn
from timm.models import is_model_in_modules
from timm.task import ClassificationTask, LogitDistillationTask, TrainingTask
from torch.utils.data import BatchSampler, RandomSampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package
from sdpgo_timm.data.replay import ReplayBatchSampler  # noqa: E402
from sdpgo_timm.skd import create_skd_task  # noqa: E402

METHODS = {
    'ce': 'CE',
    'ce_ls': 'CE + label smoothing 0.1',
    'dlb': 'DLB, one forward (ours)',
    'dlb2': 'DLB, two forwards (authors)',
    'pskd': 'PS-KD',
    'sdpgo': 'SDPGO',
    'kd': 'KD (timm logit, frozen teacher)',
}
REPLAY_METHODS = ('dlb', 'dlb2', 'sdpgo')  # n/2 fresh samples per step, views mode
PSKD_EPOCHS = 2  # PS-KD runs at epoch 1 of 2: its soft targets are mixed (the cost is the same at any epoch)
SINGLE_STEPS = 3  # steps after warm-up in a --single memory run

DEFAULTS = dict(
    models=['resnet50', 'deit_small_patch16_224', 'swin_tiny_patch4_window7_224'],
    img_size=64, batch_size=32, warmup=3, repeats=10, num_samples=50000, threads=torch.get_num_threads(),
    out_md='benchmarks/results/step_cost.md', out_csv='benchmarks/results/step_cost.csv')
QUICK = dict(
    models=['resnet18'], img_size=32, batch_size=8, warmup=1, repeats=3, num_samples=1024, threads=1,
    out_md='benchmarks/results/step_cost_quick.md', out_csv='benchmarks/results/step_cost_quick.csv')

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--models', nargs='+', help=f"timm model names (default: {' '.join(DEFAULTS['models'])})")
parser.add_argument('--methods', nargs='+', choices=list(METHODS), default=list(METHODS),
                    help='methods to compare; CE is always run, ratios are to CE')
parser.add_argument('--img-size', type=int, help='input resolution (default: 64; Swin needs a multiple of 32)')
parser.add_argument('--batch-size', type=int, help='model batch n per step (default: 32; even)')
parser.add_argument('--warmup', type=int, help='untimed steps per method first (default: 3)')
parser.add_argument('--repeats', type=int, help='timed steps per method, interleaved (default: 10)')
parser.add_argument('--num-classes', type=int, default=100, help='classifier size (default: 100)')
parser.add_argument('--kd-teacher', default=None, metavar='MODEL',
                    help="KD's teacher architecture, random-init (default: each student's own)")
parser.add_argument('--num-samples', type=int,
                    help='dataset length: PS-KD table rows and sampler range (default: 50000)')
parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda[:i]' (default: cpu)")
parser.add_argument('--amp', action='store_true', help='bfloat16 autocast for forward and loss')
parser.add_argument('--channels-last', action='store_true', help='channels_last memory format (model and input)')
parser.add_argument('--compile', nargs='?', const='inductor', default=None, metavar='BACKEND', help=(
    "torch.compile (default backend inductor): the model for CE/PS-KD, the SKD tasks' regional compile around "
    "their taps"))
parser.add_argument('--threads', type=int, help=(
    f'torch CPU threads (default: {torch.get_num_threads()}; 1 with --quick, steadier on a busy machine)'))
parser.add_argument('--seed', type=int, default=0)
parser.add_argument('--pretrained-path', default=None, metavar='FILE', help=(
    'start every model from these weights (a checkpoint or weights file of the same architecture) with a new '
    '--num-classes head, as fine-tuning does (train.py --pretrained-path); default: random initialisation'))
parser.add_argument('--mem-jobs', type=int, default=2, help=(
    'memory subprocesses run side by side, sharing --threads; peaks are per process (default: 2)'))
parser.add_argument('--out-md', help=f"markdown table (default: {DEFAULTS['out_md']})")
parser.add_argument('--out-csv', help=f"CSV rows (default: {DEFAULTS['out_csv']})")
parser.add_argument('--quick', action='store_true',
                    help='smoke run: resnet18, 32 px, n=8, 1 warm-up, 3 repeats, 1 thread (unset options only)')
parser.add_argument('--single', choices=list(METHODS), help=argparse.SUPPRESS)


def resolve_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse `argv`; options left unset take the --quick or the full-run defaults."""
    args = parser.parse_args(argv)
    args.command = ' '.join(sys.argv[1:] if argv is None else argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch_size < 2 or args.batch_size % 2:
        parser.error(f'--batch-size must be even and >= 2 (half replay, half fresh), got {args.batch_size}')
    if args.repeats < 2:
        parser.error(f'--repeats must be >= 2 (median and IQR), got {args.repeats}')
    if 'ce' not in args.methods:
        args.methods = ['ce'] + args.methods
    return args


def model_kwargs(model_name: str, img_size: int, num_classes: int) -> dict:
    """timm.create_model arguments to train `model_name` from scratch at `img_size`.

    CNNs take any input size. ViT/DeiT fix their patch grid and position embedding at
    creation (`img_size`). Swin also needs a window that tiles every stage's feature map:
    `window_size = img_size // 32` keeps the original layout (224 px: 7, the last stage is
    one window; 64 px: 2) and timm shrinks windows larger than a stage.
    """
    kwargs = dict(num_classes=num_classes)
    if is_model_in_modules(model_name, ['swin_transformer']):
        if img_size % 32:
            raise ValueError(f'Swin needs --img-size divisible by 32, got {img_size}')
        kwargs.update(img_size=img_size, window_size=img_size // 32)
    elif is_model_in_modules(model_name, ['vision_transformer', 'deit']):
        kwargs.update(img_size=img_size)
    return kwargs


def create_task(method: str, model: nn.Module, num_samples: int, device: torch.device,
                teacher: Optional[nn.Module] = None) -> TrainingTask:
    """The library's task for `method`, with its default options (views-mode replay for SIL); KD takes `teacher`."""
    if method == 'kd':  # timm's defaults: task and distillation weights 1, temperature 4 (train.py's --kd-*)
        return LogitDistillationTask(model, teacher, nn.CrossEntropyLoss(), temperature=4.0, device=device,
                                     verbose=False)
    if method == 'ce':
        return ClassificationTask(model, device=device, verbose=False)
    if method == 'ce_ls':
        return ClassificationTask(model, criterion_kwargs=dict(smoothing=0.1), device=device, verbose=False)
    if method == 'pskd':
        task = create_skd_task(
            model, 'pskd', num_samples=num_samples, epochs=PSKD_EPOCHS, device=device, verbose=False)
        task.set_epoch(1)
        return task
    return create_skd_task(model, method, replay='views', device=device, verbose=False)


def index_stream(method: str, num_samples: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of dataset indices, in the order the method's training loader gives them."""
    if method in REPLAY_METHODS:
        sampler = ReplayBatchSampler(num_samples, batch_size, num_replicas=1, rank=0, seed=seed)
    else:
        generator = torch.Generator().manual_seed(seed)
        sampler = BatchSampler(RandomSampler(range(num_samples), generator=generator), batch_size, drop_last=True)
    epoch = 0
    while True:
        if isinstance(sampler, ReplayBatchSampler):
            sampler.set_epoch(epoch)
        for batch in sampler:
            yield torch.tensor(batch)
        epoch += 1


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class StepRunner:
    """One method's model, task, SGD optimizer and batch stream; `step()` times one optimizer step."""

    def __init__(self, method: str, model_name: str, args: argparse.Namespace, device: torch.device):
        torch.manual_seed(args.seed)
        kwargs = model_kwargs(model_name, args.img_size, args.num_classes)
        if args.pretrained_path:  # timm drops the file's classifier (num_classes -1 never matches) for a new head
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=args.pretrained_path, num_classes=-1))
        model = timm.create_model(model_name, **kwargs)
        model.to(device).train()
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        self.method = method
        self.device = device
        teacher = None
        if method == 'kd':
            name = args.kd_teacher or model_name
            teacher = timm.create_model(name, **model_kwargs(name, args.img_size, args.num_classes)).to(device).eval()
            if args.channels_last:
                teacher.to(memory_format=torch.channels_last)
        self.task = create_task(method, model, args.num_samples, device, teacher)
        if args.compile:  # the SKD tasks compile around their taps; timm's tasks compile the model
            self.task.compile(backend=args.compile)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        generator = torch.Generator().manual_seed(args.seed)
        self.input = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=generator).to(device)
        if args.channels_last:
            self.input = self.input.contiguous(memory_format=torch.channels_last)
        self.labels = torch.randint(0, args.num_classes, (args.num_samples,), generator=generator).to(device)
        self.indices = index_stream(method, args.num_samples, args.batch_size, args.seed)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()

    def step(self) -> float:
        """Seconds of one optimizer step; the batch is sliced and indexed before the clock starts.

        On CUDA the step is timed with CUDA events around it (device time, no host sync inside the step).
        """
        index = next(self.indices).to(self.device)
        input, target = self.input[:len(index)], self.labels[index]
        indexed = self.method not in ('ce', 'ce_ls', 'kd')
        cuda = self.device.type == 'cuda'
        synchronize(self.device)
        if cuda:
            start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start_event.record()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            out = self.task(input, target, index) if indexed else self.task(input, target)
        out['loss'].backward()
        self.optimizer.step()
        if cuda:
            end_event.record()
            end_event.synchronize()
            return start_event.elapsed_time(end_event) / 1e3
        return time.perf_counter() - start


def time_methods(model_name: str, args: argparse.Namespace, device: torch.device) -> Dict[str, List[float]]:
    """Step times (s) of every method, measured round-robin in this process."""
    runners = [StepRunner(method, model_name, args, device) for method in args.methods]
    times = {method: [] for method in args.methods}
    for round_ in range(args.warmup + args.repeats):
        shift = round_ % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            elapsed = runner.step()
            if round_ >= args.warmup:
                times[runner.method].append(elapsed)
    return times


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory, or the resident set high-water mark."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    with open('/proc/self/status') as status:  # VmHWM, in kB
        return next(int(line.split()[1]) for line in status if line.startswith('VmHWM')) / 1024


def run_single(args: argparse.Namespace, device: torch.device) -> None:
    """--single METHOD: warm-up plus a few steps in this fresh process, then print its peak memory.

    Also prints the peak before the model is built (`base_mib`: Python, torch and timm on CPU).
    """
    base = peak_memory_mib(device)
    runner = StepRunner(args.single, args.models[0], args, device)
    for _ in range(args.warmup + SINGLE_STEPS):
        runner.step()
    print(json.dumps(dict(method=args.single, peak_mib=peak_memory_mib(device), base_mib=base)))


def measure_memory(model_name: str, method: str, args: argparse.Namespace) -> Dict[str, float]:
    """Peak MiB of `method` on `model_name` (and its base_mib), from a fresh process running --single."""
    command = [
        sys.executable, os.path.abspath(__file__), '--single', method, '--models', model_name,
        '--img-size', str(args.img_size), '--batch-size', str(args.batch_size), '--warmup', str(args.warmup),
        '--num-classes', str(args.num_classes), '--num-samples', str(args.num_samples),
        '--device', args.device, '--threads', str(max(1, args.threads // args.mem_jobs)), '--seed', str(args.seed)]
    command += ['--amp'] if args.amp else []
    command += ['--channels-last'] if args.channels_last else []
    command += ['--compile', args.compile] if args.compile else []
    command += ['--kd-teacher', args.kd_teacher] if args.kd_teacher else []
    command += ['--pretrained-path', args.pretrained_path] if args.pretrained_path else []
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"memory run {' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarize(model_name: str, times: Dict[str, List[float]], memory: Dict[str, dict], args) -> List[dict]:
    """One row per method, with ratios to CE per step, per epoch and in memory."""
    ce_time, ce_memory = statistics.median(times['ce']), memory['ce']['peak_mib']
    rows = []
    for method in args.methods:
        step = statistics.median(times[method])
        q1, _, q3 = statistics.quantiles(times[method], n=4)
        fresh = args.batch_size // 2 if method in REPLAY_METHODS else args.batch_size
        rows.append(dict(
            model=model_name, method=method, label=METHODS[method], device=args.device,
            img_size=args.img_size, batch_size=args.batch_size, fresh_per_step=fresh,
            timings=len(times[method]), step_ms=1e3 * step, step_iqr_ms=1e3 * (q3 - q1),
            step_min_ms=1e3 * min(times[method]),
            step_ratio=step / ce_time, epoch_ratio=step / ce_time * args.batch_size / fresh,
            img_per_sec=args.batch_size / step,
            peak_mib=memory[method]['peak_mib'], memory_ratio=memory[method]['peak_mib'] / ce_memory,
            base_mib=memory[method]['base_mib']))
    return rows


def markdown(rows: List[dict], args: argparse.Namespace) -> str:
    """The results table with the settings and the command that produced it."""
    memory_metric = 'torch.cuda.max_memory_allocated' if args.device.startswith('cuda') else 'VmHWM (peak RSS)'
    lines = [
        '# Step cost: SDPGO against CE and its relatives', '',
        f'`python benchmarks/step_cost.py {args.command}`', '',
        f'device {args.device} ({args.threads} CPU threads), torch {torch.__version__}, '
        f'timm {timm.__version__}; {args.img_size} px, model batch n = {args.batch_size}, '
        f"{args.num_classes} classes, {'bf16 autocast' if args.amp else 'fp32'}"
        f"{', channels_last' if args.channels_last else ''}{f', torch.compile ({args.compile})' if args.compile else ''}, SGD"
        f"{f', started from {args.pretrained_path} with a new head' if args.pretrained_path else ''}; "
        f'{args.warmup} warm-up steps, then {args.repeats} timed steps per method, interleaved.', '',
        '| model | method | fresh/step | step ms (median) | IQR ms | min ms | img/s | step / CE | epoch / CE '
        '| peak MiB | memory / CE | of which before the model MiB |',
        '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['label']} | {r['fresh_per_step']} | {r['step_ms']:.1f} | {r['step_iqr_ms']:.1f} "
            f"| {r['step_min_ms']:.1f} | {r['img_per_sec']:.0f} | {r['step_ratio']:.3f} | {r['epoch_ratio']:.3f} | {r['peak_mib']:.0f} "
            f"| {r['memory_ratio']:.3f} | {r['base_mib']:.0f} |")
    lines += [
        '',
        '- step: zero_grad + forward + backward + SGD step on the same model batch of n images; '
        'step / CE is the ratio of medians.',
        '- epoch / CE: an epoch is one pass over fresh samples. SDPGO and both DLBs train on '
        '[replay half; fresh half], n/2 fresh samples per step, so at equal --batch-size their epoch '
        'has twice the optimizer steps of a CE epoch: epoch ratio = 2 x step ratio. PS-KD and CE see n fresh.',
        f'- peak memory: one fresh process per method, {memory_metric} after {args.warmup + SINGLE_STEPS} '
        'steps, nothing subtracted; the last column is the same measure just before the model is built '
        '(on CPU: Python, torch and timm).',
        f'- SDPGO/DLB in views mode; PS-KD with its N x C table on the CPU (N = {args.num_samples}).',
    ]
    if 'kd' in args.methods:
        lines.append(f"- KD: timm's LogitDistillationTask (task + KL at temperature 4), the teacher "
                     f"{args.kd_teacher or 'of the same architecture as each student'} in random initialisation (the "
                     "cost of its forward does not depend on its weights); its memory includes the teacher.")
    return '\n'.join(lines) + '\n'


def write_outputs(rows: List[dict], text: str, args: argparse.Namespace) -> None:
    for path in (args.out_md, args.out_csv):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(args.out_md, 'w') as f:
        f.write(text)
    with open(args.out_csv, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Optional[List[str]] = None) -> None:
    args = resolve_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    if args.single:
        run_single(args, device)
        return
    rows = []
    for model_name in args.models:
        times = time_methods(model_name, args, device)
        with ThreadPoolExecutor(args.mem_jobs) as pool:
            peaks = pool.map(lambda method: measure_memory(model_name, method, args), args.methods)
            memory = dict(zip(args.methods, peaks))
        rows += summarize(model_name, times, memory, args)
        print(f'{model_name}: done', file=sys.stderr)
    text = markdown(rows, args)
    print(text)
    write_outputs(rows, text, args)


if __name__ == '__main__':
    main()
