"""benchmarks/alpha_noise.py and benchmarks/confusion.py: what they read from run folders and what they report."""
import csv
import importlib.util

import pytest
import torch

from conftest import ROOT


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / 'benchmarks' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_summary(folder, rows):
    folder.mkdir(parents=True)
    with open(folder / 'summary.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['epoch', 'train_loss', *rows[0]])
        writer.writeheader()
        writer.writerows([dict(epoch=e, train_loss=1.0, **r) for e, r in enumerate(rows)])


def test_alpha_noise_groups_seeds_by_condition_and_averages_per_epoch(tmp_path):
    bench = _load('alpha_noise')
    for seed, auc in ((0, 0.8), (1, 0.6)):
        _write_summary(tmp_path / f'SDPGO-sym0.4-f0.02-s{seed}', [
            dict(train_alpha_flipped=0.7, train_alpha_clean=0.3, train_alpha_auc=auc),
            dict(train_alpha_flipped=0.5, train_alpha_clean=0.5, train_alpha_auc=0.5)])
    runs = [str(tmp_path / f'SDPGO-sym0.4-f0.02-s{s}') for s in (0, 1)]
    data = bench.read_runs(runs)
    assert list(data) == ['sym0.4-f0.02'] and sorted(data['sym0.4-f0.02']) == [0, 1]
    text = bench.table(data, runs)
    assert '## sym0.4-f0.02 (2 seeds)' in text
    assert '| 0 | 0.700 ± 0.000 | 0.300 ± 0.000 | 0.700 ± 0.141 |' in text  # mean and std of 0.8 and 0.6
    assert bench.plot(data, str(tmp_path / 'a.png')) and (tmp_path / 'a.png').stat().st_size > 0


def test_alpha_noise_refuses_a_run_without_alpha_columns(tmp_path):
    bench = _load('alpha_noise')
    _write_summary(tmp_path / 'CE-sym0.4-f0.02-s0', [dict(eval_top1=50.0)])
    with pytest.raises(SystemExit, match='not an SDPGO run with --label-noise'):
        bench.read_runs([str(tmp_path / 'CE-sym0.4-f0.02-s0')])


def test_confusion_report_reads_recall_and_flip_partner_share():
    bench = _load('confusion')
    n = len(bench.CLASSES)
    perfect = torch.eye(n, dtype=torch.long) * 10
    swapped = perfect.clone()
    swapped[0, 0], swapped[0, 6] = 6, 4  # 4 of 10 T-shirts predicted as Shirt, T-shirt's flip partner
    text = bench.report({'CE': [perfect], 'SDPGO': [swapped]}, 'validation', [])
    assert '| T-shirt/top (↔ Shirt) | 100.0 | 60.0 |' in text
    assert '| T-shirt/top → Shirt | 0.0 | 40.0 |' in text
    assert '| **all** | 100.0 | 96.0 |' in text
    assert '| Trouser | 100.0 | 100.0 |' in text
