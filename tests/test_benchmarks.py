"""Smoke runs of the benchmark scripts (their results are not asserted, their bookkeeping is)."""
import csv
import importlib.util
import math
import os

import torch

from conftest import ROOT

def test_step_cost_quick_reports_every_method_against_ce(tmp_path):
    # the script runs in this process (one torch import saved); its memory runs are fresh processes anyway
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks', 'step_cost.py')
    spec = importlib.util.spec_from_file_location('step_cost', script)
    step_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_cost)
    out_md, out_csv = tmp_path / 'step_cost.md', tmp_path / 'step_cost.csv'
    threads = torch.get_num_threads()
    try:
        step_cost.main(['--quick', '--out-md', str(out_md), '--out-csv', str(out_csv)])
    finally:
        torch.set_num_threads(threads)  # --quick times on one thread
    with open(out_csv) as f:
        rows = {row['method']: row for row in csv.DictReader(f)}
    assert set(rows) == {'ce', 'ce_ls', 'dlb', 'dlb2', 'pskd', 'sdpgo', 'kd'}
    ce = rows['ce']
    for method, row in rows.items():
        step, peak = float(row['step_ms']), float(row['peak_mib'])
        assert math.isfinite(step) and step > 0 and math.isfinite(peak) and peak > 0, method
        assert int(row['timings']) == 3
        assert math.isclose(float(row['step_ratio']), step / float(ce['step_ms']), rel_tol=1e-9)
        assert math.isclose(float(row['memory_ratio']), peak / float(ce['peak_mib']), rel_tol=1e-9)
        steps_per_ce_step = int(row['batch_size']) / int(row['fresh_per_step'])
        assert steps_per_ce_step == (2 if method in ('dlb', 'dlb2', 'sdpgo') else 1)
        assert math.isclose(float(row['epoch_ratio']), float(row['step_ratio']) * steps_per_ce_step, rel_tol=1e-9)
    assert float(ce['step_ratio']) == 1.0 and float(ce['memory_ratio']) == 1.0
    table = out_md.read_text()
    assert table.count('| resnet18 |') == 7 and 'epoch ratio = 2 x step ratio' in table
    # KD's teacher (a random-init resnet18, 45 MB of weights) adds to the memory (its time is left to the table:
    # three timings on a shared machine)
    assert float(rows['kd']['memory_ratio']) > 1
    assert "KD: timm's LogitDistillationTask" in table and 'of the same architecture as each student' in table


def test_gpu_check_dry_run_runs_its_steps_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py --dry-run: the prepared GPU script's steps, wired and passing on the CPU."""
    import subprocess
    import sys
    steps = ['env', 'cuda_tests', 'train_bf16_compiled', 'validate', 'step_cost_compiled']
    done = subprocess.run([sys.executable, 'benchmarks/gpu_check.py', str(tmp_path), '--dry-run', '--steps', *steps],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / 'summary.md').read_text()
    assert all(f'| {step} | ok |' in summary for step in steps), summary
    table = (tmp_path / 'step_cost_compiled.md').read_text()
    assert 'torch.compile (aot_eager)' in table and '| SDPGO |' in table and 'img/s' in table
    assert 'top1' in (tmp_path / 'validate.log').read_text()


def test_finetune_quick_pushes_pretrains_fine_tunes_offline_and_scores_the_chosen_runs_once(tmp_path):
    """benchmarks/finetune.py --quick end to end: export, CE pretraining, push to the fake Hub, every method
    fine-tuned from `hf-hub:` out of the cache with the Hub offline, scratch runs, test scores of the chosen lr."""
    import yaml
    spec = importlib.util.spec_from_file_location('finetune', ROOT / 'benchmarks' / 'finetune.py')
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)
    work, stem = tmp_path / 'work', tmp_path / 'ft'
    threads = torch.get_num_threads()
    try:
        assert finetune.main(['--quick', '--work', str(work), '--out-stem', str(stem), '--threads', '1',
                              '--lrs', '0.01', '0.003']) == 0
    finally:
        torch.set_num_threads(threads)
    with open(f'{stem}.csv') as f:
        rows = list(csv.DictReader(f))
    cells = {(r['method'], r['start']) for r in rows}
    assert cells == {(m, 'fine-tuned') for m in ('CE', 'CE+LS', 'DLB', 'PS-KD', 'SDPGO')} | {
        ('CE', 'scratch'), ('SDPGO', 'scratch')}
    assert len({r['steps'] for r in rows}) == 1  # equal optimizer steps for every method
    for method, start in cells:  # the lr of the best validation top-1 is the one scored on the test split
        runs = [r for r in rows if (r['method'], r['start']) == (method, start)]
        best = max(runs, key=lambda r: (float(r['val_top1']), -float(r['lr'])))
        assert [r['lr'] for r in runs if r['test_top1']] == [best['lr']]
    fine_tuned = yaml.safe_load(open(work / 'runs' / 'CE-fine-tuned-lr0.01-s0' / 'args.yaml'))
    assert fine_tuned['model'] == 'hf-hub:sdpgo-study/fmnist-source' and fine_tuned['pretrained']
    assert fine_tuned['num_classes'] == 5
    cached = list((work / 'hf_home' / 'hub' / 'models--sdpgo-study--fmnist-source').rglob('model.safetensors'))
    assert cached  # the weights came through the Hub's cache
    report = open(f'{stem}.md').read()
    assert 'Smoke run (--quick)' in report and report.count('| fine-tuned |') == 5 + 10  # table + validation grid
