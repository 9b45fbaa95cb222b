#!/usr/bin/env python3
"""PWA's α against the flipped labels, epoch by epoch: does the self-teacher get more trust where the label is wrong?

Reads the summary.csv of SDPGO runs trained with --label-noise (e.g. the run folders a `label_noise.py --runs-dir DIR`
study keeps), groups them by condition (the run folder's name less its method and seed), and writes per evaluated
epoch the mean α of flipped and of clean samples and the ROC AUC of α for picking out the flipped ones (mean ± std
over seeds), as a Markdown table and a plot with error bars (matplotlib, optional: `pip install -e ".[plot]"`).

    python benchmarks/alpha_noise.py /tmp/runs/SDPGO-sym0.4-* /tmp/runs/SDPGO-asym0.4-* --out-md a.md --out-png a.png
"""
import argparse
import csv
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from label_noise import mean_std, run_name_parts  # noqa: E402

COLUMNS = ('train_alpha_flipped', 'train_alpha_clean', 'train_alpha_auc')


def read_runs(runs: List[str]) -> Dict[str, Dict[int, List[Dict[str, float]]]]:
    """condition -> epoch -> one {column: value} per seed, from each run's summary.csv."""
    by_condition: Dict[str, Dict[int, List[Dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        _, condition, _ = run_name_parts(os.path.basename(os.path.normpath(run)))
        with open(os.path.join(run, 'summary.csv'), newline='') as f:
            rows = list(csv.DictReader(f))
        if not rows or COLUMNS[-1] not in rows[0]:
            raise SystemExit(f"error: {run}/summary.csv has no {COLUMNS[-1]} column: not an SDPGO run with "
                             "--label-noise")
        for row in rows:
            by_condition[condition][int(row['epoch'])].append({c: float(row[c]) for c in COLUMNS})
    return by_condition


def table(data: Dict[str, Dict[int, List[Dict[str, float]]]], argv: List[str]) -> str:
    lines = ["# PWA's α against the flipped labels, per evaluated epoch", '',
             f"`{' '.join(['python', 'benchmarks/alpha_noise.py', *argv])}`", '',
             'Mean α of the samples whose label was flipped / of the clean ones, and the ROC AUC of α for picking '
             'out the flipped ones (0.5: chance), mean ± std over seeds.', '']
    for condition, epochs in data.items():
        lines += [f"## {condition} ({len(next(iter(epochs.values())))} seeds)", '',
                  '| epoch | α flipped | α clean | AUC |', '|---:|---:|---:|---:|']
        for epoch, seeds in sorted(epochs.items()):
            cells = [mean_std([s[c] for s in seeds], digits=3) for c in COLUMNS]
            lines.append(f"| {epoch} | " + ' | '.join(cells) + ' |')
        lines.append('')
    return '\n'.join(lines)


def plot(data: Dict[str, Dict[int, List[Dict[str, float]]]], path: str) -> bool:
    """AUC per epoch (left) and α of flipped / clean samples (right), error bars of one std over seeds."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (auc_ax, alpha_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for condition, epochs in data.items():
        x = sorted(epochs)

        def series(column):
            values = [[s[column] for s in epochs[e]] for e in x]
            return ([statistics.mean(v) for v in values],
                    [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values])

        auc_ax.errorbar(x, *series('train_alpha_auc'), capsize=3, marker='o', label=condition)
        line = alpha_ax.errorbar(x, *series('train_alpha_flipped'), capsize=3, marker='o',
                                 label=f"{condition}: flipped")
        alpha_ax.errorbar(x, *series('train_alpha_clean'), capsize=3, marker='s', linestyle='--',
                          color=line[0].get_color(), label=f"{condition}: clean")
    auc_ax.axhline(0.5, color='grey', linewidth=0.8)
    auc_ax.set(xlabel='epoch', ylabel='ROC AUC of α for flipped labels', title='Does α pick out the flipped labels?')
    alpha_ax.set(xlabel='epoch', ylabel='mean α', title='α of flipped and clean samples')
    for ax in (auc_ax, alpha_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('runs', nargs='+', help='run folders of SDPGO with --label-noise (METHOD-CONDITION-sSEED)')
    parser.add_argument('--out-md', default=None)
    parser.add_argument('--out-png', default=None)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    data = read_runs(args.runs)
    text = table(data, argv)
    if args.out_md:
        Path(args.out_md).write_text(text)
    if args.out_png and not plot(data, args.out_png):
        print('matplotlib is not installed: no plot written (pip install -e ".[plot]")', file=sys.stderr)
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
