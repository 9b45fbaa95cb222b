#!/usr/bin/env python3
"""Per-class confusion of trained Fashion-MNIST runs: where class-flip noise costs accuracy, method by method.

Reads run folders of train.py (their `args.yaml` and `last.pth.tar`, e.g. those a `label_noise.py --runs-dir DIR`
study keeps), scores each last-epoch model on a clean split (`--split validation` by default: the analysis must
not pick settings on the test split) and writes, per method (over its seeds; run folders named as label_noise.py
names them): each class's recall, and for the classes that class-flip noise pairs (FLIP_MAP) the share of the
class's images predicted as its partner. A loss confined to the flipped pairs shows as lower recall there and a
partner share that grows by what the recall loses.

    python benchmarks/confusion.py /tmp/runs/CE-asym0.4-* /tmp/runs/SDPGO-asym0.4-* --out-md confusion.md
"""
import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import timm
import torch
import yaml
from timm.data import create_transform, resolve_data_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))
from label_noise import mean_std, run_name_parts  # noqa: E402
from sdpgo_timm.data.fashion_mnist import CLASSES, FLIP_MAP, FashionMNISTDataset  # noqa: E402


@torch.no_grad()
def confusion(run: str, split: str) -> torch.Tensor:
    """The (true class, predicted class) counts of a run's last-epoch model on a clean Fashion-MNIST split."""
    with open(os.path.join(run, 'args.yaml')) as f:
        args = yaml.safe_load(f)
    model = timm.create_model(args['model'], num_classes=len(CLASSES),
                              checkpoint_path=os.path.join(run, 'last.pth.tar')).eval()
    # the evaluation transform train.py used (timm's, from the run's data config)
    dataset = FashionMNISTDataset(split, transform=create_transform(**resolve_data_config(args, model=model)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=500)
    counts = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
    for input, target in loader:
        predicted = model(input).argmax(1)
        counts += torch.bincount(target * len(CLASSES) + predicted, minlength=len(CLASSES) ** 2).view_as(counts)
    return counts


def report(matrices: Dict[str, List[torch.Tensor]], split: str, argv: List[str]) -> str:
    """Markdown: recall per class and method, and the partner share of the flipped classes (mean ± std over seeds)."""
    methods = list(matrices)
    lines = [f"# Per-class recall (%) on the clean {split} split, last epoch", '',
             f"`{' '.join(['python', 'benchmarks/confusion.py', *argv])}`", '',
             '| class | ' + ' | '.join(methods) + ' |', '|---|' + '---:|' * len(methods)]
    recall = {m: [100 * c.diag() / c.sum(1) for c in ms] for m, ms in matrices.items()}
    for k, name in enumerate(CLASSES):
        flipped = f" (↔ {CLASSES[FLIP_MAP[k]]})" if FLIP_MAP[k] != k else ''
        cells = [mean_std([r[k].item() for r in recall[m]], 1) for m in methods]
        lines.append(f"| {name}{flipped} | " + ' | '.join(cells) + ' |')
    lines.append('| **all** | ' + ' | '.join(
        mean_std([100 * c.diag().sum().item() / c.sum().item() for c in matrices[m]], 1) for m in methods) + ' |')
    lines += ['', "Share (%) of each flipped class's images predicted as its partner:", '',
              '| class → partner | ' + ' | '.join(methods) + ' |', '|---|' + '---:|' * len(methods)]
    for k, name in enumerate(CLASSES):
        if FLIP_MAP[k] != k:
            lines.append(f"| {name} → {CLASSES[FLIP_MAP[k]]} | " + ' | '.join(
                mean_std([100 * c[k, FLIP_MAP[k]].item() / c[k].sum().item() for c in matrices[m]], 1) for m in methods)
                + ' |')
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('runs', nargs='+',
                        help="train.py run folders, named as label_noise.py names them (METHOD-CONDITION-sSEED)")
    parser.add_argument('--split', default='validation', choices=('validation', 'test'))
    parser.add_argument('--out-md', default=None, help='write the report here too')
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    matrices: Dict[str, List[torch.Tensor]] = defaultdict(list)
    for run in args.runs:
        matrices[run_name_parts(os.path.basename(os.path.normpath(run)))[0]].append(confusion(run, args.split))
    text = report(matrices, args.split, argv)
    if args.out_md:
        Path(args.out_md).write_text(text)
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
