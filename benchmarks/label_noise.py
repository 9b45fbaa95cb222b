#!/usr/bin/env python3
"""Accuracy under noisy labels and little data: CE, CE at equal compute, label smoothing, DLB, PS-KD, SDPGO, KD.

Every run is a real `train.py <dataset> ...` run (in-process, through `train.main`), so the
numbers come from the product. The datasets are the in-memory benchmarks `digits` (default)
and `fashion-mnist`. A condition is a label noise rate η (`--etas`, of kind `--noise`: sym, or
asym = the dataset's class flips) on a share of the training split (`--fractions`: stratified,
the same share for every method and seed). Top-1 is measured on a clean split at the last epoch
(not the best epoch, which would peek at that split): `--eval-split validation` (carved from the
training data) to choose settings, `test` (fashion-mnist) once, for the reported number.

Equal budget: every method trains the same number of epochs AND the same number of optimizer
steps over the same fresh samples per step. The replay methods (SDPGO, DLB) run `--batch-size B`
(B/2 replay + B/2 fresh); CE, label smoothing and PS-KD run `--batch-size B/2`, so each step of
every method sees B/2 new samples. A replay step forwards B images, twice CE's, so the row
`CE×2` (CE for twice the epochs) is CE at the replay methods' compute.

`KD` (not run by default: `--methods ... KD`) is the teacher-distillation baseline: its teacher is the CE
run of the same model, data, noisy labels, batch, epochs and seed (the study's own CE run when CE is among
--methods, else one trained first for it), and a student is distilled from its last-epoch weights with timm's logit KD
(train.py --kd-model-name/--kd-checkpoint, timm's defaults: task and distillation weights 1, temperature
4). Its `steps` are the student's; a KD result costs the teacher's run plus a student run with one more
forward per step. `teacher_top1` in the CSV is the teacher's own last-epoch top-1.

    python benchmarks/label_noise.py                 # digits table (several minutes per seed)
    python benchmarks/label_noise.py --quick         # smoke run
    python benchmarks/label_noise.py --dataset fashion-mnist --etas 0 --fractions 0.25 0.5 --jobs 2 --threads 1
"""
import argparse
import csv
import multiprocessing
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (the product's own entry point)

# method -> extra train.py flags; `replay` methods take the full batch, the others half of it; `epochs`: factor
METHODS: Dict[str, Dict] = {
    'CE': dict(flags=['--smoothing', '0'], replay=False, epochs=1),
    'CE×2': dict(flags=['--smoothing', '0'], replay=False, epochs=2),
    'CE+LS': dict(flags=['--smoothing', '0.1'], replay=False, epochs=1),
    'DLB': dict(flags=['--smoothing', '0', '--skd', 'dlb'], replay=True, epochs=1),
    'DLB2': dict(flags=['--smoothing', '0', '--skd', 'dlb2'], replay=True, epochs=1),
    'PS-KD': dict(flags=['--smoothing', '0', '--skd', 'pskd'], replay=False, epochs=1),
    'SDPGO': dict(flags=['--smoothing', '0', '--sdpgo'], replay=True, epochs=1),
    'KD': dict(flags=['--smoothing', '0'], replay=False, epochs=1, teacher='CE'),
}
DEFAULT_METHODS = ['CE', 'CE+LS', 'DLB', 'PS-KD', 'SDPGO']
COLORS = {'CE': '#505050', 'CE×2': '#000000', 'CE+LS': '#969696', 'DLB': '#1f77b4', 'DLB2': '#17becf',
          'PS-KD': '#2ca02c', 'SDPGO': '#d62728', 'KD': '#9467bd'}
# per dataset: defaults of --model, --img-size (None: the recipe's) and --epochs, and the output file stem
DATASETS = {
    'digits': dict(model='resnet10t', img_size=16, epochs=10, stem='label_noise'),
    'fashion-mnist': dict(model='test_resnet', img_size=None, epochs=3, stem='fashion_mnist'),
}
Condition = Tuple[str, float, float]  # (noise mode, eta, fraction)
# --preset: a whole study by name; its values are defaults, any option given on the command line wins
PRESETS = {
    # the memorisation regime of hparams/fashion-mnist/memorize.yaml (issue 22): every method, clean, symmetric and
    # class-flip noise at η = 0.4, and a quarter of the regime's share
    'memorize': dict(dataset='fashion-mnist', model='test_resnet', img_size=None, epochs=60, fractions=[0.02],
                     conditions=['clean', 'sym0.4', 'asym0.4', 'clean@0.005'],
                     methods=['CE', 'CE×2', 'CE+LS', 'DLB', 'DLB2', 'PS-KD', 'KD', 'SDPGO'],
                     # evaluated every 10 epochs (and at the last): the test split's 10,000 images cost
                     extra='-c hparams/fashion-mnist/memorize.yaml --val-interval 10', stem='fashion_mnist_memorize'),
}
SMOKE_NOTE = ("**Smoke run (--quick): one seed, one epoch at 8 px. These numbers check that every method runs end "
              "to end; they say nothing about which method is better.**")
ALPHA_COLUMNS = ('alpha_flipped', 'alpha_clean', 'alpha_auc')  # summary.csv's train_<column> under --label-noise


def experiment_name(method: str, condition: Condition, seed: int) -> str:
    """The run folder of a method's run of a condition and seed."""
    noise, eta, fraction = condition
    return f"{method}-{noise}{eta}-f{fraction}-s{seed}".replace('+', 'p').replace('×', 'x')


def run_name_parts(name: str) -> Tuple[str, str, str]:
    """(method, condition, seed) of a run folder named by `experiment_name` (e.g. PS-KD-asym0.4-f0.02-s1 ->
    PS-KD, asym0.4-f0.02, 1); another name is a method of its own, with no condition or seed."""
    match = re.fullmatch(r'(.+)-((?:a?sym)[0-9.]+-f[0-9.]+)-s(\d+)', name)
    return match.groups() if match else (name, '', '')


def parse_condition(text: str, fractions: Sequence[float]) -> List[Condition]:
    """`clean`, `sym0.4` or `asym0.4`, optionally `@F` for a share F of the training split (else each of
    `fractions`): the conditions it names."""
    match = re.fullmatch(r'(clean|(a?sym)([0-9]*\.?[0-9]+))(?:@([0-9]*\.?[0-9]+))?', text)
    if match:
        _, noise, rate, share = match.groups()
        eta, shares = float(rate or 0), [float(share)] if share else list(fractions)
    if not match or not eta < 1 or any(not 0 < f <= 1 for f in shares):
        raise ValueError(f"condition {text!r}: expected clean, symETA or asymETA (0 <= ETA < 1), optionally "
                         f"@FRACTION in (0, 1], e.g. sym0.4 or clean@0.25")
    return [(noise or 'sym', eta, f) for f in shares]


def run_one(method: str, condition: Condition, seed: int, args: argparse.Namespace, out_dir: str,
            teacher_top1: Optional[float] = None) -> Dict[str, float]:
    """Train once; return the last epoch's clean top-1 on --eval-split and the run's step count.

    A method with a `teacher` (KD) distils from the last-epoch checkpoint of the teacher method's run of the same
    condition and seed, and also returns the teacher's own top-1 (`teacher_top1`): that run's when the study
    has it (`teacher_top1` given: its run is done), else one trained here first.
    """
    spec = METHODS[method]
    experiment = experiment_name(method, condition, seed)
    if not spec.get('teacher'):
        return _train(spec, condition, seed, args, out_dir, experiment, spec['flags'])
    teacher_experiment = experiment_name(spec['teacher'], condition, seed)
    if teacher_top1 is None or not os.path.exists(os.path.join(out_dir, teacher_experiment, 'last.pth.tar')):
        teacher_experiment += '-for-kd'
        teacher_top1 = _train(METHODS[spec['teacher']], condition, seed, args, out_dir, teacher_experiment,
                              METHODS[spec['teacher']]['flags'])['top1']
    weights = os.path.join(out_dir, teacher_experiment, 'last.pth.tar')
    flags = [*spec['flags'], '--kd-model-name', args.model, '--kd-checkpoint', weights]
    return dict(**_train(spec, condition, seed, args, out_dir, experiment, flags), teacher_top1=teacher_top1)


def run_all(runs: List[Tuple[str, Condition, int]], args: argparse.Namespace, out_dir: str,
            pool: Executor, done: Dict[Tuple[str, Condition, int], Dict]) -> Dict[Tuple[str, Condition, int], Future]:
    """Submit every run not `done` (those hold their results) and return at once; one whose teacher method is in the
    study (KD beside CE) is submitted when the teacher's run of its condition and seed ends, and distils from it
    instead of training the same teacher again (when its checkpoint is still in `out_dir`)."""
    futures: Dict[Tuple[str, Condition, int], Future] = {}
    for run, result in done.items():
        futures[run] = Future()
        futures[run].set_result(result)
    taught = [run for run in runs if run not in done and METHODS[run[0]].get('teacher') in args.methods]
    for run in runs:
        if run not in done and run not in taught:
            futures[run] = pool.submit(run_one, *run, args, out_dir)
    for run in taught:
        teacher = futures[(METHODS[run[0]]['teacher'], *run[1:])]
        futures[run] = _then(teacher, lambda result, run=run: pool.submit(run_one, *run, args, out_dir, result['top1']))
    return futures


def _then(first: Future, submit: Callable[[Dict], Future]) -> Future:
    """A future of the future that `submit(result of first)` returns, started when `first` ends."""
    out: Future = Future()

    def finish(second: Future) -> None:
        if second.exception() is not None:
            out.set_exception(second.exception())
        else:
            out.set_result(second.result())

    def start(done: Future) -> None:
        try:
            submit(done.result()).add_done_callback(finish)
        except BaseException as e:  # the teacher's run failed, or the pool is shut down: the run fails with it
            out.set_exception(e)

    first.add_done_callback(start)
    return out


def _train(spec: Dict, condition: Condition, seed: int, args: argparse.Namespace, out_dir: str, experiment: str,
           flags: List[str]) -> Dict[str, float]:
    """One train.py run of a method `spec` with its `flags` into `out_dir/experiment`: last top-1, steps."""
    noise, eta, fraction = condition
    batch = args.batch_size if spec['replay'] else args.batch_size // 2
    extra = shlex.split(args.extra)
    size = ['--input-size', '3', str(args.img_size), str(args.img_size)] if args.img_size else []
    argv = [args.dataset, '--model', args.model, '--epochs', str(args.epochs * spec['epochs']),
            '--batch-size', str(batch), '--seed', str(seed), '--label-noise', str(eta),
            '--label-noise-mode', noise, '--train-fraction', str(fraction), '--val-split', args.eval_split,
            *size, '--workers', '0', '--log-interval', '100000', '--output', out_dir, '--experiment', experiment,
            '--checkpoint-hist', '1', *flags, *extra]
    status = train.main(argv)
    if status != 0:
        raise RuntimeError(f"train.py {' '.join(argv)} exited with {status}")
    with open(os.path.join(out_dir, experiment, 'summary.csv')) as f:
        rows = list(csv.DictReader(f))
    eval_losses = [float(r['eval_loss']) for r in rows]
    # every epoch takes the same number of steps; summary.csv has a row for the evaluated ones (--val-interval)
    steps = int(float(rows[-1]['train_steps'])) * args.epochs * spec['epochs']
    result = dict(top1=float(rows[-1]['eval_top1']), steps=steps, train_loss=float(rows[-1]['train_loss']),
                  eval_loss=eval_losses[-1], eval_loss_min=min(eval_losses))
    # SDPGO under label noise: PWA's α of flipped and clean samples at the last epoch, and its ROC AUC
    result.update({k: float(rows[-1][f'train_{k}']) for k in ALPHA_COLUMNS if rows[-1].get(f'train_{k}')})
    return result


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


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def condition_label(condition: Condition) -> str:
    noise, eta, fraction = condition
    label = f"{noise} η = {eta:g}" if eta else 'clean'
    return label if fraction == 1 else f"{100 * fraction:g}% data, {label}"


def plot(results: Dict[str, Dict[Condition, List[float]]], conditions: Sequence[Condition], path: str,
         title: str, label: Callable[[Condition], str] = condition_label) -> bool:
    """Mean last-epoch top-1 per method and condition (named on the x axis by `label`), with error bars of one std
    over seeds; a method without runs of a condition has no point there.

    matplotlib is optional (`pip install -e ".[plot]"`): without it no PNG is written and False is returned.
    """
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    x = list(range(len(conditions)))
    width = 0.8 / max(1, len(results))
    for k, (method, by_condition) in enumerate(results.items()):
        present = [i for i, c in enumerate(conditions) if by_condition.get(c)]
        values = [by_condition[conditions[i]] for i in present]
        means = [statistics.mean(v) for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        offsets = [i - 0.4 + width * (k + 0.5) for i in present]
        ax.errorbar(offsets, means, yerr=stds, fmt='o', capsize=3, color=COLORS.get(method), label=method)
    ax.set_xticks(x, [label(c) for c in conditions], fontsize=8)
    ax.set_ylabel('last-epoch top-1 (%), mean ± std over seeds')
    ax.set_title(title, fontsize=9)
    ax.grid(axis='y', alpha=0.3)
    ax.legend(fontsize=8, loc='lower left')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_tables(args: argparse.Namespace, argv: Sequence[str], conditions: Sequence[Condition],
                 results: Dict[str, Dict[Condition, List[float]]], rows: List[Dict], wall: float, kept: int = 0) -> str:
    """The Markdown report: the command, the setting, mean ± std per method and condition, and per-seed numbers;
    `kept` of the rows come from an earlier invocation (--resume), not timed by `wall`."""
    steps = {m: next(r['steps'] for r in rows if r['method'] == m) for m in args.methods}
    labels = [condition_label(c) for c in conditions]
    lines = [
        f"# {args.dataset}: clean {args.eval_split} top-1 (%) at the last epoch",
        '',
        f"`{shlex.join(['python', 'benchmarks/label_noise.py', *argv])}`",
        '',
        *([SMOKE_NOTE, ''] if args.quick else []),
        f"{args.model} at {f'{args.img_size} px' if args.img_size else 'the recipe input size'}, {args.epochs} epochs"
        + (f" (CE×2: {2 * args.epochs})" if 'CE×2' in args.methods else '') + ', '
        f"seeds {args.seeds}, torch {torch.__version__}; replay methods at --batch-size {args.batch_size}, the others "
        f"at {args.batch_size // 2}; optimizer steps per run at the first condition: "
        + ', '.join(f"{m} {s}" for m, s in steps.items()) + '. '
        f"{args.jobs} run(s) at a time, {args.threads or 'default'} torch thread(s) each; wall time {wall:.0f} s"
        + (f" for the {len(rows) - kept} runs this invocation made ({kept} kept from --out-csv by --resume)."
           if kept else '.'),
        '',
    ]
    if 'KD' in args.methods:
        kd_rows = [r for r in rows if r['method'] == 'KD']
        teachers = [mean_std([r['teacher_top1'] for r in kd_rows if (r['noise'], r['eta'], r['fraction']) == c])
                    for c in conditions]
        lines += [
            "KD: timm's logit distillation (train.py --kd-model-name/--kd-checkpoint; task and distillation weights "
            "1, temperature 4) from a CE teacher of the same model, trained first on the same data, labels, batch, "
            "epochs and seed; its steps are the student's, its cost a CE run plus a student run with a teacher "
            "forward per step. The teachers' own top-1: " + ', '.join(f"{t} ({label})" for t, label in
                                                                       zip(teachers, labels)) + '.', '']
    lines += [
        '| method | ' + ' | '.join(labels) + ' |',
        '|---|' + '---:|' * len(conditions),
    ]
    for method in args.methods:
        lines.append(f"| {method} | " + ' | '.join(mean_std(results[method][c]) for c in conditions) + ' |')
    lines += ['', 'Per seed (' + ', '.join(str(s) for s in args.seeds) + '):', '',
              '| method | ' + ' | '.join(labels) + ' |', '|---|' + '---:|' * len(conditions)]
    for method in args.methods:
        lines.append(f"| {method} | " + ' | '.join(
            ' / '.join(f"{v:.2f}" for v in results[method][c]) for c in conditions) + ' |')
    lines += ['', 'Losses at the last epoch, mean over seeds: training loss · evaluated split\'s loss at the end '
              '(its minimum over the evaluated epochs). A training loss near 0 with the end above the minimum: the run '
              'memorised its labels and overfits.', '',
              '| method | ' + ' | '.join(labels) + ' |', '|---|' + '---:|' * len(conditions)]
    for method in args.methods:
        cells = []
        for c in conditions:
            runs = _rows_of(rows, method, c)
            cells.append(f"{statistics.mean(r['train_loss'] for r in runs):.4f} · "
                         f"{statistics.mean(r['eval_loss'] for r in runs):.3f} "
                         f"({statistics.mean(r['eval_loss_min'] for r in runs):.3f})")
        lines.append(f"| {method} | " + ' | '.join(cells) + ' |')
    noisy = [c for c in conditions if any('alpha_auc' in r for r in _rows_of(rows, None, c))]
    if noisy:
        lines += ['', "PWA's α at the last epoch under label noise: mean α of the samples whose label was flipped / "
                  "of the clean ones, and the ROC AUC of α for picking out the flipped ones (0.5: chance), "
                  "mean ± std over seeds.", '',
                  '| method | ' + ' | '.join(condition_label(c) for c in noisy) + ' |', '|---|' + '---:|' * len(noisy)]
        for method in args.methods:
            if not any('alpha_auc' in r for c in noisy for r in _rows_of(rows, method, c)):
                continue
            cells = []
            for c in noisy:
                runs = _rows_of(rows, method, c)
                cells.append(f"{statistics.mean(r['alpha_flipped'] for r in runs):.3f} / "
                             f"{statistics.mean(r['alpha_clean'] for r in runs):.3f}, AUC "
                             + mean_std([r['alpha_auc'] for r in runs], digits=3))
            lines.append(f"| {method} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def write_csv(path: str, rows: List[Dict]) -> None:
    """The result rows as CSV (KD rows add teacher_top1, SDPGO rows under noise the α columns; empty elsewhere)."""
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval='')
        writer.writeheader()
        writer.writerows(rows)


def read_results(path: str) -> Dict[Tuple[str, Condition, int], Dict]:
    """The results a study wrote to `path` (none when it does not exist), keyed as `run_all` keys its runs."""
    if not os.path.exists(path):
        return {}
    done = {}
    with open(path, newline='') as f:
        for row in csv.DictReader(f):
            key = (row['method'], (row['noise'], float(row['eta']), float(row['fraction'])), int(row['seed']))
            skip = ('method', 'noise', 'eta', 'fraction', 'seed')
            done[key] = {k: int(float(v)) if k == 'steps' else float(v) for k, v in row.items()
                         if k not in skip and v != ''}
    return done


def _rows_of(rows: List[Dict], method: Optional[str], condition: Condition) -> List[Dict]:
    """The result rows of a method (None: any) under a condition."""
    return [r for r in rows if (method is None or r['method'] == method)
            and (r['noise'], r['eta'], r['fraction']) == condition]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--preset', choices=list(PRESETS),
                        help='a whole study by name (memorize: the memorisation regime of issue 22, every method and '
                             'condition); its values are defaults that the other options override')
    parser.add_argument('--dataset', default=None, choices=list(DATASETS), help='default: digits')
    parser.add_argument('--methods', nargs='+', default=None, choices=list(METHODS),
                        help=f"default: {' '.join(DEFAULT_METHODS)}")
    parser.add_argument('--etas', nargs='+', type=float, default=[0.0, 0.2, 0.4])
    parser.add_argument('--noise', default='sym', choices=('sym', 'asym'))
    parser.add_argument('--fractions', nargs='+', type=float, default=None,
                        help='shares of the training split (each condition: every eta at every fraction; default 1)')
    parser.add_argument('--conditions', nargs='+', default=None, metavar='COND',
                        help='the conditions instead of --etas x --noise: clean, symETA or asymETA, optionally '
                             '@FRACTION (else at each --fractions), e.g. clean sym0.4 asym0.4 clean@0.005')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--eval-split', default='validation', help="split scored (fashion-mnist: validation or test)")
    parser.add_argument('--model', default=None, help='default: resnet10t (digits), test_resnet (fashion-mnist)')
    parser.add_argument('--img-size', type=int, default=None, help="default: 16 (digits), the recipe's (fashion-mnist)")
    parser.add_argument('--epochs', type=int, default=None, help='default: 10 (digits), 3 (fashion-mnist)')
    parser.add_argument('--batch-size', type=int, default=64, help='batch of the replay methods (others: half)')
    parser.add_argument('--extra', default='', help='more train.py flags for every run, e.g. "--sdpgo-topk 3"')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    parser.add_argument('--runs-dir', default=None,
                        help='keep the train.py run folders here (default: a temporary folder, removed at the end)')
    parser.add_argument('--resume', action='store_true',
                        help='keep the runs already in --out-csv (written as each run ends) and run the rest')
    parser.add_argument('--jobs', type=int, default=1,
                        help='runs in parallel, one process each (e.g. --jobs 2 --threads 1 on 2 cores); '
                             'the results do not depend on it')
    for ext in ('md', 'csv', 'png'):
        parser.add_argument(f'--out-{ext}', help=f"default: benchmarks/results/<stem>.{ext}, stem label_noise "
                                                f"(digits) or fashion_mnist, with _quick after it for --quick")
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: one seed, eta 0 and 0.4, 1 epoch of timm test_resnet at 8 px')
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    for key in ('dataset', 'methods', 'fractions', 'conditions', 'model', 'epochs'):
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key))
    args.extra = ' '.join(e for e in (preset.get('extra', ''), args.extra) if e)  # the command line's last
    args.dataset = args.dataset or 'digits'
    args.methods = args.methods or DEFAULT_METHODS
    args.fractions = args.fractions or [1.0]
    defaults = DATASETS[args.dataset]
    args.model = args.model or defaults['model']
    args.epochs = args.epochs or defaults['epochs']
    args.img_size = args.img_size or defaults['img_size']
    if args.quick:
        args.seeds, args.etas, args.epochs, args.img_size, args.model = args.seeds[:1], [0.0, 0.4], 1, 8, 'test_resnet'
        args.conditions = args.conditions and args.conditions[:2]
    stem = preset.get('stem', defaults['stem']) + ('_quick' if args.quick else '')
    for ext in ('md', 'csv', 'png'):  # a smoke run never overwrites the full tables
        if getattr(args, f'out_{ext}') is None:
            setattr(args, f'out_{ext}', str(ROOT / 'benchmarks' / 'results' / f'{stem}.{ext}'))
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if any(not 0 < f <= 1 for f in args.fractions):
        parser.error(f"--fractions must lie in (0, 1], got {args.fractions}")
    _set_threads(args.threads)

    try:
        conditions = ([c for text in args.conditions for c in parse_condition(text, args.fractions)] if args.conditions
                      else [(args.noise, eta, fraction) for fraction in args.fractions for eta in args.etas])
    except ValueError as e:
        parser.error(str(e))
    results: Dict[str, Dict[Condition, List[float]]] = {m: {c: [] for c in conditions} for m in args.methods}
    rows = []
    start = time.time()
    runs = [(method, condition, seed) for seed in args.seeds for condition in conditions for method in args.methods]
    for path in (args.out_md, args.out_csv, args.out_png):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    done = read_results(args.out_csv) if args.resume else {}
    with ExitStack() as stack:
        out_dir = args.runs_dir or stack.enter_context(tempfile.TemporaryDirectory())
        pool = stack.enter_context(_executor(args))
        futures = run_all(runs, args, out_dir, pool, done)
        for method, (noise, eta, fraction), seed in runs:
            r = futures[(method, (noise, eta, fraction), seed)].result()
            results[method][(noise, eta, fraction)].append(r['top1'])
            rows.append(dict(method=method, noise=noise, eta=eta, fraction=fraction, seed=seed, **r))
            write_csv(args.out_csv, rows)  # after every run: a stopped study keeps what it finished (--resume)
            print(f"{method:6s} {condition_label((noise, eta, fraction))} seed={seed} top1={r['top1']:.2f} "
                  f"steps={r['steps']} train_loss={r['train_loss']:.4f} eval_loss={r['eval_loss']:.4f} "
                  f"(min {r['eval_loss_min']:.4f})", flush=True)

    table = write_tables(args, argv, conditions, results, rows, time.time() - start,
                         kept=sum(run in done for run in runs))
    Path(args.out_md).write_text(table)
    title = f"{args.dataset}, {args.model}, {args.epochs} epochs {args.extra}: last-epoch {args.eval_split} top-1"
    if not plot(results, conditions, args.out_png, title):
        print('matplotlib is not installed: no plot written (pip install -e ".[plot]")', file=sys.stderr)
    print(table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
