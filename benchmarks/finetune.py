#!/usr/bin/env python3
"""Fine-tuning from the Hub: CE, label smoothing, DLB, PS-KD and SDPGO on a small target task, and from scratch.

The transfer task is Fashion-MNIST split by classes (`python -m sdpgo_timm.data export`): the source task is
five classes (`--source-classes`, all their training images), the target task the other five
(`--target-classes`, `--train-per-class` images a class, and all their validation and test images), each an
ImageFolder, the way users hold their data. The study, end to end and offline:

1. pretrain `--model` on the source task with plain CE (train.py, `--pretrain-epochs`);
2. push its last checkpoint with `python -m sdpgo_timm.hub push` to a local fake Hub (tests/fakehub.py, so this
   script needs the test extra), download it once into a private Hugging Face cache, then go offline
   (HF_HUB_OFFLINE=1): every fine-tuning run loads the weights from the cache;
3. fine-tune from `hf-hub:<repo> --pretrained --num-classes 5` (a new head) with each method, at each `--lrs`,
   for each seed; and train from scratch at each `--scratch-lrs` (`--scratch-methods`), same epochs;
4. choose each method's lr (and start) by its mean last-epoch top-1 on the target's validation split (carved
   from Fashion-MNIST's training file), then score the chosen runs' last checkpoints once on the test split
   with validate.py; validate.py's validation top-1 of the same checkpoint is checked against train.py's.

Equal budget, as in benchmarks/label_noise.py: every method trains the same epochs and optimizer steps on the
same fresh samples per step (replay methods at `--batch-size`, half replayed; the others at half of it).
Every run is a real `train.py` / `validate.py` run (in-process), so the numbers come from the product.

    python benchmarks/finetune.py --jobs 2 --threads 1       # the study (docs/RESULTS.md, "Fine-tuning")
    python benchmarks/finetune.py --quick                    # smoke run: test_resnet, 1 epoch, tiny share
"""
import argparse
import csv
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'tests'), str(ROOT / 'benchmarks')]
import train  # noqa: E402  (the product's own entry points)
import validate  # noqa: E402
from label_noise import COLORS, METHODS, _executor, mean_std, plot, write_csv  # noqa: E402
from sdpgo_timm.data.benchmarks import HPARAMS_DIR  # noqa: E402
from sdpgo_timm.data.export import export_image_folder  # noqa: E402

# Fashion-MNIST at its own size, read from the exported PNGs (hparams/fashion-mnist/transfer.yaml: grey images
# given to the model as RGB, the default recipe's normalisation and SGD + cosine, flip-only augmentation)
TRANSFER = HPARAMS_DIR / 'fashion-mnist' / 'transfer.yaml'
TRAIN_RECIPE = ['-c', str(TRANSFER), '--log-interval', '100000', '--checkpoint-hist', '1']


def eval_flags(config: Path) -> List[str]:
    """validate.py's flags for the evaluation half of a train.py config file (validate.py reads none)."""
    values = yaml.safe_load(config.read_text())
    flags: List[str] = []
    for key in ('input_size', 'mean', 'std', 'interpolation', 'crop_pct', 'workers'):
        value = values[key]
        flags += ['--' + key.replace('_', '-'), *map(str, value if isinstance(value, list) else [value])]
    return flags


EVAL_RECIPE = eval_flags(TRANSFER)
REPO = 'sdpgo-study/fmnist-source'
STARTS = ('fine-tuned', 'scratch')
Run = Tuple[str, str, float, int]  # (method, start, lr, seed)
# label_noise.py's methods that are one train.py run each (not KD: its teacher's run comes first); CE×2 is CE for
# twice the epochs, the replay methods' compute
SINGLE_RUN_METHODS = [m for m, spec in METHODS.items() if not spec.get('teacher')]
VARIANT_COLORS = ('#ff7f0e', '#8c564b', '#e377c2', '#bcbd22')  # none of label_noise's COLORS


def method_specs(variants: Sequence[str]) -> Dict[str, Dict]:
    """The methods a study may run: SINGLE_RUN_METHODS and each `NAME=METHOD:FLAGS` variant (METHOD plus FLAGS)."""
    specs = {m: METHODS[m] for m in SINGLE_RUN_METHODS}
    for text in variants:
        name, _, rest = text.partition('=')
        base, _, flags = rest.partition(':')
        if not name or name in specs or base not in SINGLE_RUN_METHODS:
            raise ValueError(f"--variant {text!r}: expected NEW_NAME=METHOD:FLAGS with METHOD one of "
                             f"{' '.join(SINGLE_RUN_METHODS)}")
        specs[name] = dict(METHODS[base], flags=[*METHODS[base]['flags'], *shlex.split(flags)])
        COLORS.setdefault(name, VARIANT_COLORS[(len(specs) - len(SINGLE_RUN_METHODS) - 1) % len(VARIANT_COLORS)])
    return specs


def run_name(run: Run) -> str:
    method, start, lr, seed = run
    return f"{method}-{start}-lr{lr:g}-s{seed}".replace('+', 'p').replace('×', 'x')


def export_tasks(args: argparse.Namespace, data: Path) -> Tuple[Path, Path]:
    """The source and target ImageFolders under `data` (exported unless an earlier invocation did)."""
    source, target = data / 'source', data / 'target'
    if not (source / 'export.json').exists():
        export_image_folder('fashion-mnist', str(source), args.source_classes, ['train', 'validation'],
                            args.source_per_class)
    if not (target / 'export.json').exists():
        export_image_folder('fashion-mnist', str(target), args.target_classes, ['train', 'validation', 'test'],
                            args.train_per_class)
    return source, target


def last_epoch(summary: Path) -> int:
    """The last epoch a run's summary.csv has a row of (-1: none yet)."""
    rows = list(csv.DictReader(open(summary))) if summary.exists() else []
    return int(rows[-1]['epoch']) if rows else -1


def pretrain(args: argparse.Namespace, source: Path, runs: Path) -> Path:
    """The source task's CE run (kept from an earlier invocation when it finished); its last checkpoint."""
    folder = runs / 'pretrain'
    if last_epoch(folder / 'summary.csv') != args.pretrain_epochs - 1:
        argv = [str(source), '--model', args.model, *TRAIN_RECIPE, '--epochs', str(args.pretrain_epochs),
                '--batch-size', '128', '--lr', '0.05', '--warmup-lr', '0.005', '--seed', '0', '--smoothing', '0',
                '--output', str(runs), '--experiment', 'pretrain']
        if train.main(argv) != 0:
            raise RuntimeError(f"pretraining failed: train.py {shlex.join(argv)}")
    return folder / 'last.pth.tar'


def publish(checkpoint: Path, hf_home: Path, monkeypatch) -> str:
    """Push `checkpoint` to a fake Hub on 127.0.0.1 with the project's push command, download it into the cache
    under `hf_home` the way train.py --pretrained does, then stop the Hub and go offline; the model name."""
    import timm
    from fakehub import FAKE_TOKEN, FakeHub, set_offline, use_hub
    from sdpgo_timm.hub.push import main as push_main

    with FakeHub() as hub:
        use_hub(monkeypatch, hub.url, hf_home, FAKE_TOKEN)
        if push_main(['push', str(checkpoint), REPO]) != 0:
            raise RuntimeError(f"python -m sdpgo_timm.hub push {checkpoint} {REPO} failed")
        timm.create_model(f'hf-hub:{REPO}', pretrained=True)  # fills the cache
    set_offline(monkeypatch)
    return f'hf-hub:{REPO}'


def fine_tune(run: Run, args: argparse.Namespace, target: Path, runs: Path, model: str) -> Dict:
    """One train.py run on the target task; its last-epoch validation top-1, losses and steps. `--resume auto`: a run
    an earlier invocation finished is kept as it is, one it left unfinished goes on where it stopped."""
    method, start, lr, seed = run
    spec = args.specs[method]
    epochs = args.epochs * spec['epochs']
    batch = args.batch_size if spec['replay'] else args.batch_size // 2
    weights = ['--model', model, '--pretrained'] if start == 'fine-tuned' else ['--model', args.model]
    argv = [str(target), *weights, '--num-classes', str(len(args.target_classes)), *TRAIN_RECIPE,
            '--epochs', str(epochs), '--batch-size', str(batch), '--lr', str(lr), '--warmup-lr', str(lr / 10),
            '--seed', str(seed), '--val-split', 'validation', '--val-interval', str(args.val_interval),
            '--output', str(runs), '--experiment', run_name(run), '--resume', 'auto', *spec['flags']]
    summary = runs / run_name(run) / 'summary.csv'
    kept = last_epoch(summary) == epochs - 1  # finished by an earlier invocation
    if train.main(argv) != 0:
        raise RuntimeError(f"train.py {shlex.join(argv)} failed")
    rows = list(csv.DictReader(open(summary)))
    return dict(kept=kept, val_top1=float(rows[-1]['eval_top1']), train_loss=float(rows[-1]['train_loss']),
                eval_loss=float(rows[-1]['eval_loss']), eval_loss_min=min(float(r['eval_loss']) for r in rows),
                steps=int(float(rows[-1]['train_steps'])) * epochs)


def score(checkpoint: Path, target: Path, split: str) -> float:
    """validate.py's top-1 of a run's checkpoint (its architecture and classes) on a split of the target task."""
    results = checkpoint.parent / f'{split}.json'
    argv = [str(target), '--split', split, '--checkpoint', str(checkpoint), *EVAL_RECIPE, '--batch-size', '256',
            '--results-file', str(results)]
    if validate.main(argv) != 0:
        raise RuntimeError(f"validate.py {shlex.join(argv)} failed")
    return float(json.loads(results.read_text())[0]['top1'])


def choose(rows: List[Dict], method: str, start: str) -> float:
    """The lr of `method` from `start` with the best mean validation top-1 over seeds (ties: the smaller lr)."""
    by_lr: Dict[float, List[float]] = {}
    for r in rows:
        if (r['method'], r['start']) == (method, start):
            by_lr.setdefault(r['lr'], []).append(r['val_top1'])
    return max(sorted(by_lr), key=lambda lr: statistics.mean(by_lr[lr]))


def write_report(args: argparse.Namespace, argv: Sequence[str], rows: List[Dict], chosen: Dict[Tuple[str, str], float],
                 pretrain_top1: float, wall: float) -> str:
    """The Markdown report: the command, the setting, the test table of the chosen lrs, the validation grid."""
    cells = sorted(chosen)
    lines = [
        f"# Fine-tuning on Fashion-MNIST classes {' '.join(map(str, args.target_classes))} from a model pretrained on "
        f"classes {' '.join(map(str, args.source_classes))}: {args.eval_split} top-1 (%) at the last epoch", '',
        f"`{shlex.join(['python', 'benchmarks/finetune.py', *argv])}`", '',
        *(["**Smoke run (--quick): these numbers check that the study runs end to end; they say nothing about "
           "which method is better.**", ''] if args.quick else []),
        f"{args.model} at 28 px. Pretrained: plain CE, {args.pretrain_epochs} epochs on the source task "
        f"({'all' if args.source_per_class is None else args.source_per_class} training images a class; its "
        f"validation top-1 {pretrain_top1:.2f}), pushed to a local fake Hub and loaded offline from the Hugging Face "
        f"cache as `hf-hub:{REPO} --pretrained` with a new {len(args.target_classes)}-class head. Target: "
        f"{args.train_per_class} training images a class. {args.epochs} epochs (CE×2: twice as many, the replay "
        f"methods' compute), SGD + cosine, 1 warm-up epoch; replay methods at --batch-size {args.batch_size}, the "
        f"others at {args.batch_size // 2}, the same fresh samples per step (optimizer steps: "
        + ', '.join(f"{m} {next(r['steps'] for r in rows if r['method'] == m)}"
                    for m in dict.fromkeys(r['method'] for r in rows)) + "). "
        f"Seeds {args.seeds}; lr chosen per method and start on the validation split (grid: fine-tuned {args.lrs}, "
        f"scratch {args.scratch_lrs}); torch {torch.__version__}; {args.jobs} run(s) at a time, {args.threads} torch "
        f"thread(s) each; wall time {wall:.0f} s for the {sum(not r['kept'] for r in rows)} runs this invocation "
        f"trained ({sum(r['kept'] for r in rows)} kept from earlier invocations in --work)."
        + ''.join(f" Variant {v.replace('=', ' = ', 1).replace(':', ' with ', 1)}." for v in args.variant), '',
        '| method | start | lr | ' + ('test top-1 | ' if args.eval_split == 'test' else '') + 'validation top-1 |',
        '|---|---|---:|' + ('---:|' if args.eval_split == 'test' else '') + '---:|',
    ]
    for method, start in cells:
        lr = chosen[(method, start)]
        runs = [r for r in rows if (r['method'], r['start'], r['lr']) == (method, start, lr)]
        test = f"{mean_std([r['test_top1'] for r in runs])} | " if args.eval_split == 'test' else ''
        lines.append(f"| {method} | {start} | {lr:g} | {test}{mean_std([r['val_top1'] for r in runs])} |")
    lines += ['', 'Validation grid (mean ± std over seeds; training loss at the last epoch · validation loss at the '
              'end (its minimum)):', '',
              '| method | start | lr | validation top-1 | losses |', '|---|---|---:|---:|---:|']
    for method, start, lr in sorted({(r['method'], r['start'], r['lr']) for r in rows}):
        runs = [r for r in rows if (r['method'], r['start'], r['lr']) == (method, start, lr)]
        lines.append(f"| {method} | {start} | {lr:g} | {mean_std([r['val_top1'] for r in runs])} | "
                     f"{statistics.mean(r['train_loss'] for r in runs):.4f} · "
                     f"{statistics.mean(r['eval_loss'] for r in runs):.3f} "
                     f"({statistics.mean(r['eval_loss_min'] for r in runs):.3f}) |")
    return '\n'.join(lines) + '\n'


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='resnet18', help='timm model (default: resnet18)')
    parser.add_argument('--methods', nargs='+', default=['CE', 'CE+LS', 'DLB', 'PS-KD', 'SDPGO'],
                        help=f"fine-tuned: any of {' '.join(SINGLE_RUN_METHODS)} or a --variant")
    parser.add_argument('--scratch-methods', nargs='+', default=['CE', 'SDPGO'], help='trained from scratch')
    parser.add_argument('--variant', action='append', default=[], metavar='NAME=METHOD:FLAGS',
                        help="a method with more train.py flags, usable in --methods, e.g. "
                             "'SDPGO-topk-all=SDPGO:--sdpgo-topk -1'")
    parser.add_argument('--source-classes', type=int, nargs='+', default=[1, 3, 5, 7, 9])
    parser.add_argument('--target-classes', type=int, nargs='+', default=[0, 2, 4, 6, 8],
                        help='default: T-shirt/top, Pullover, Coat, Shirt, Bag (the four confusable tops)')
    parser.add_argument('--source-per-class', type=int, default=None, help='default: all')
    parser.add_argument('--train-per-class', type=int, default=100)
    parser.add_argument('--pretrain-epochs', type=int, default=5)
    parser.add_argument('--epochs', type=int, default=20, help='fine-tuning and scratch epochs')
    parser.add_argument('--val-interval', type=int, default=5)
    parser.add_argument('--lrs', type=float, nargs='+', default=None,
                        help='fine-tuning lr grid (default: 0.003 0.01 0.03; --quick: 0.01)')
    parser.add_argument('--scratch-lrs', type=float, nargs='+', default=None,
                        help='from-scratch lr grid (default: 0.01 0.03; --quick: 0.01)')
    parser.add_argument('--batch-size', type=int, default=64, help='batch of the replay methods (others: half)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--eval-split', default='test', choices=('validation', 'test'),
                        help='the split of the reported table (the lr is always chosen on validation)')
    parser.add_argument('--work', default=None,
                        help='exported data, run folders and the Hugging Face cache, kept so that a second invocation '
                             'reuses the data and the pretrained run (default: runs/finetune-study, '
                             'runs/finetune-quick for --quick)')
    parser.add_argument('--jobs', type=int, default=1, help='runs in parallel (e.g. --jobs 2 --threads 1 on 2 cores)')
    parser.add_argument('--threads', type=int, default=None, help='torch threads per run')
    parser.add_argument('--out-stem', default=None, help='default: benchmarks/results/finetune (_quick for --quick)')
    parser.add_argument('--quick', action='store_true', help='smoke run: test_resnet, 1 epoch, one seed, one lr')
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        args.specs = method_specs(args.variant)
    except ValueError as e:
        parser.error(str(e))
    unknown = [m for m in args.methods + args.scratch_methods if m not in args.specs]
    if unknown:
        parser.error(f"unknown method(s) {' '.join(unknown)}: use {' '.join(args.specs)} or define a --variant")
    if args.quick:
        args.model, args.pretrain_epochs, args.epochs, args.val_interval = 'test_resnet', 1, 1, 1
        args.source_per_class, args.train_per_class, args.seeds = 40, 20, args.seeds[:1]
        args.batch_size = 16
    args.lrs = args.lrs or ([0.01] if args.quick else [0.003, 0.01, 0.03])
    args.scratch_lrs = args.scratch_lrs or ([0.01] if args.quick else [0.01, 0.03])
    stem = args.out_stem or str(ROOT / 'benchmarks' / 'results' / ('finetune_quick' if args.quick else 'finetune'))
    work = Path(args.work or ('runs/finetune-quick' if args.quick else 'runs/finetune-study'))
    runs = work / 'runs'
    start_time = time.time()
    source, target = export_tasks(args, work / 'data')
    checkpoint = pretrain(args, source, runs)
    pretrain_top1 = float(list(csv.DictReader(open(checkpoint.parent / 'summary.csv')))[-1]['eval_top1'])
    import pytest  # the fake Hub's settings are set (and undone) the way its tests set them
    monkeypatch = pytest.MonkeyPatch()
    try:
        model = publish(checkpoint, work / 'hf_home', monkeypatch)
        # by seed first: should the study be stopped, every method has the same seeds done
        todo: List[Run] = [(m, 'fine-tuned', lr, s) for s in args.seeds for lr in args.lrs for m in args.methods]
        todo += [(m, 'scratch', lr, s) for s in args.seeds for lr in args.scratch_lrs for m in args.scratch_methods]
        with _executor(args) as pool:
            futures = {run: pool.submit(fine_tune, run, args, target, runs, model) for run in todo}
            rows = [dict(method=r[0], start=r[1], lr=r[2], seed=r[3], **f.result()) for r, f in futures.items()]
        chosen = {(r['method'], r['start']): choose(rows, r['method'], r['start']) for r in rows}
        for r in rows:
            if chosen[(r['method'], r['start'])] == r['lr']:
                last = runs / run_name((r['method'], r['start'], r['lr'], r['seed'])) / 'last.pth.tar'
                again = score(last, target, 'validation')
                if abs(again - r['val_top1']) > 0.01:
                    raise RuntimeError(f"{last}: validate.py gives validation top-1 {again}, train.py {r['val_top1']}")
                if args.eval_split == 'test':
                    r['test_top1'] = score(last, target, 'test')
    finally:
        monkeypatch.undo()
    write_csv(stem + '.csv', rows)
    report = write_report(args, argv, rows, chosen, pretrain_top1, time.time() - start_time)
    Path(stem + '.md').write_text(report)
    key = 'test_top1' if args.eval_split == 'test' else 'val_top1'
    results = {m: {s: [r[key] for r in rows if (r['method'], r['start'], r['lr']) == (m, s, chosen[(m, s)])]
                   for s in STARTS if (m, s) in chosen} for m in dict.fromkeys(r['method'] for r in rows)}
    plot(results, STARTS, stem + '.png', f"{args.model}, Fashion-MNIST classes {args.target_classes}, "
         f"{args.train_per_class} images a class: {args.eval_split} top-1, mean ± std over {len(args.seeds)} seeds",
         label=str)
    print(report)
    return 0


if __name__ == '__main__':
    sys.exit(main())
