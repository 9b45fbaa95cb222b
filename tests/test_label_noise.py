"""Smoke test of benchmarks/label_noise.py --quick: real train.py runs, table, CSV and plot."""
import csv
import importlib.util
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location('label_noise', ROOT / 'benchmarks' / 'label_noise.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules['label_noise'] = module  # --jobs workers find run_one by its module's name
    spec.loader.exec_module(module)
    return module


def test_label_noise_quick_writes_table_csv_and_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench = _load_benchmark()
    out = {k: str(tmp_path / f'ln.{k}') for k in ('md', 'csv', 'png')}
    status = bench.main(['--quick', '--methods', 'CE', 'SDPGO', '--threads', '1',
                         '--out-md', out['md'], '--out-csv', out['csv'], '--out-png', out['png']])
    assert status == 0
    rows = list(csv.DictReader(open(out['csv'])))
    assert {(r['method'], float(r['eta'])) for r in rows} == {('CE', 0.0), ('CE', 0.4), ('SDPGO', 0.0), ('SDPGO', 0.4)}
    for r in rows:
        assert 0.0 <= float(r['top1']) <= 100.0
    # equal budget: every method ran the same number of optimizer steps
    assert len({r['steps'] for r in rows}) == 1
    table = Path(out['md']).read_text()
    assert '| CE |' in table and '| SDPGO |' in table and 'η = 0.4' in table
    assert bench.SMOKE_NOTE in table  # a smoke table says its numbers mean nothing
    assert Image.open(out['png']).size == (800, 480)


def test_parallel_jobs_give_the_serial_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench = _load_benchmark()
    monkeypatch.setattr(bench, 'ROOT', tmp_path)  # where the default output files go
    results = tmp_path / 'benchmarks' / 'results'
    tops = {}
    for jobs in (1, 2):
        assert bench.main(['--quick', '--methods', 'CE', 'SDPGO', '--threads', '1', '--jobs', str(jobs)]) == 0
        # a --quick run writes its own files, never the full tables
        assert sorted(p.name for p in results.iterdir()) == [
            'label_noise_quick.csv', 'label_noise_quick.md', 'label_noise_quick.png']
        rows = csv.DictReader(open(results / 'label_noise_quick.csv'))
        tops[jobs] = [(r['method'], r['seed'], r['top1'], r['steps']) for r in rows]
    assert len(tops[1]) == 4 and tops[2] == tops[1]


def test_fashion_mnist_fractions_and_equal_compute_row(tmp_path, monkeypatch):
    """--dataset fashion-mnist on generated IDX files: a data-fraction condition, CE×2 trains twice the epochs
    (twice CE's steps, as many images forwarded as a replay method), per-seed numbers in the table."""
    from test_fashion_mnist import _write_fake
    _write_fake(tmp_path)
    monkeypatch.setenv('FASHION_MNIST_DIR', str(tmp_path))
    bench = _load_benchmark()
    out = {k: str(tmp_path / f'fm.{k}') for k in ('md', 'csv', 'png')}
    assert bench.main(['--quick', '--dataset', 'fashion-mnist', '--methods', 'CE', 'CE×2', 'SDPGO', '--etas', '0',
                       '--fractions', '0.01', '--threads', '1', '--out-md', out['md'], '--out-csv', out['csv'],
                       '--out-png', out['png']]) == 0
    rows = {r['method']: r for r in csv.DictReader(open(out['csv'])) if float(r['eta']) == 0}
    assert set(rows) == {'CE', 'CE×2', 'SDPGO'} and {r['fraction'] for r in rows.values()} == {'0.01'}
    assert int(rows['CE×2']['steps']) == 2 * int(rows['CE']['steps']) == 2 * int(rows['SDPGO']['steps'])
    table = Path(out['md']).read_text()
    assert '1% data, clean' in table and 'Per seed' in table and 'CE×2: 2' in table
    assert Image.open(out['png']).size == (800, 480)


def test_kd_row_distils_from_the_ce_run_of_its_condition(tmp_path, monkeypatch):
    """--methods CE KD: KD's teacher is the CE run of the same condition and seed (the same top-1), its student
    trains CE's steps, and the table says what the row is."""
    monkeypatch.chdir(tmp_path)
    bench = _load_benchmark()
    out = {k: str(tmp_path / f'kd.{k}') for k in ('md', 'csv', 'png')}
    trained = []
    train = bench._train
    monkeypatch.setattr(bench, '_train', lambda *a: trained.append(a[5]) or train(*a))
    assert bench.main(['--quick', '--methods', 'KD', 'CE', '--threads', '1',
                       '--out-md', out['md'], '--out-csv', out['csv'], '--out-png', out['png']]) == 0
    rows = {(r['method'], float(r['eta'])): r for r in csv.DictReader(open(out['csv']))}
    assert len(rows) == 4  # --quick: eta 0 and 0.4
    assert len(trained) == 4 and not any(name.endswith('-for-kd') for name in trained)  # no second CE run
    for eta in (0.0, 0.4):
        ce, kd = rows['CE', eta], rows['KD', eta]
        assert kd['teacher_top1'] == ce['top1'] and ce['teacher_top1'] == ''
        assert kd['steps'] == ce['steps'] and 0.0 <= float(kd['top1']) <= 100.0
    table = Path(out['md']).read_text()
    assert '| KD |' in table and "KD: timm's logit distillation" in table
    assert f"The teachers' own top-1: {float(rows['CE', 0.0]['top1']):.2f} (clean)" in table


def test_kd_without_ce_in_the_study_trains_its_own_teacher_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench = _load_benchmark()
    trained = []
    train = bench._train
    monkeypatch.setattr(bench, '_train', lambda *a: trained.append(a[5]) or train(*a))
    out = {k: str(tmp_path / f'kd.{k}') for k in ('md', 'csv', 'png')}
    assert bench.main(['--quick', '--methods', 'KD', '--threads', '1',
                       '--out-md', out['md'], '--out-csv', out['csv'], '--out-png', out['png']]) == 0
    assert trained == ['CE-sym0.0-f1.0-s0-for-kd', 'KD-sym0.0-f1.0-s0', 'CE-sym0.4-f1.0-s0-for-kd', 'KD-sym0.4-f1.0-s0']
    assert all(0.0 <= float(row['teacher_top1']) <= 100.0 for row in csv.DictReader(open(out['csv'])))


def test_conditions_preset_and_resume_keep_finished_runs(tmp_path, monkeypatch):
    """--conditions names noise kind, rate and share per condition; the CSV is written as each run ends, and
    --resume runs only what it lacks, giving the same table."""
    monkeypatch.chdir(tmp_path)
    bench = _load_benchmark()
    assert bench.parse_condition('asym0.4', [0.5]) == [('asym', 0.4, 0.5)]
    assert bench.parse_condition('clean@0.25', [0.5, 1.0]) == [('sym', 0.0, 0.25)]
    with pytest.raises(ValueError, match='sym0.4'):
        bench.parse_condition('noisy0.4', [1.0])
    out = {k: str(tmp_path / f'c.{k}') for k in ('md', 'csv', 'png')}
    argv = ['--quick', '--methods', 'CE', 'SDPGO', '--conditions', 'clean', 'asym0.4', '--threads', '1',
            '--out-md', out['md'], '--out-csv', out['csv'], '--out-png', out['png']]
    assert bench.main(argv) == 0
    rows = list(csv.DictReader(open(out['csv'])))
    assert {(r['method'], r['noise'], float(r['eta'])) for r in rows} == {
        ('CE', 'sym', 0.0), ('SDPGO', 'sym', 0.0), ('CE', 'asym', 0.4), ('SDPGO', 'asym', 0.4)}
    sdpgo_noisy = next(r for r in rows if r['method'] == 'SDPGO' and r['noise'] == 'asym')
    assert 0.0 <= float(sdpgo_noisy['alpha_auc']) <= 1.0  # PWA's α scored against the flipped labels
    table = Path(out['md']).read_text()
    assert 'asym η = 0.4' in table and "PWA's α" in table and 'AUC' in table
    with open(out['csv'], 'w', newline='') as f:  # a study stopped after its first three runs
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:3])
    trained = []
    train = bench._train
    monkeypatch.setattr(bench, '_train', lambda *a: trained.append(a[5]) or train(*a))
    assert bench.main([*argv, '--resume']) == 0
    assert trained == [bench.experiment_name(rows[3]['method'], ('asym', 0.4, 1.0), 0)]
    resumed = list(csv.DictReader(open(out['csv'])))
    assert [r['top1'] for r in resumed[:3]] == [r['top1'] for r in rows[:3]] and len(resumed) == 4
    assert 'for the 1 runs this invocation made (3 kept from --out-csv by --resume)' in Path(out['md']).read_text()
