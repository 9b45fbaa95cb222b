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
