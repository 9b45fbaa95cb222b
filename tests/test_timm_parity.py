"""Plain runs (no --sdpgo) of our train.py reproduce timm's own train.py: same command line, same seed.

tests/data/timm_parity.json holds what timm's train.py (the commit is named in the file) reported for each
case of benchmarks/timm_parity.py: the summary.csv rows (epoch, train_loss, eval_loss, eval_top1, eval_top5,
lr) and the numbers of every `Train:` progress line. It was recorded on the CPU with one thread and
`--workers 0` by `python benchmarks/timm_parity.py --timm-scripts <checkout> --write tests/data/timm_parity.json`;
the same script without --write runs both scripts side by side. Here our train.py runs each case in this
process on one thread, and must give the same numbers.
"""
import importlib.util
import json
import logging
from pathlib import Path

import pytest

from conftest import ROOT, run_train

_spec = importlib.util.spec_from_file_location('timm_parity', ROOT / 'benchmarks' / 'timm_parity.py')
timm_parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timm_parity)
REFERENCE = json.loads((Path(__file__).parent / 'data' / 'timm_parity.json').read_text())


@pytest.fixture(scope='module')
def parity_folder(tmp_path_factory) -> Path:
    return timm_parity.write_image_folder(tmp_path_factory.mktemp('parity'))


@pytest.mark.parametrize('case', list(REFERENCE['cases']))
def test_plain_run_gives_timms_losses_accuracy_and_progress_lines(case, parity_folder, tmp_path, caplog):
    reference = REFERENCE['cases'][case]
    assert REFERENCE['common'] == timm_parity.COMMON and reference['argv'] == timm_parity.CASES[case]
    caplog.set_level(logging.INFO)
    assert run_train([str(parity_folder), *REFERENCE['common'], *reference['argv'], '--output', str(tmp_path),
                      '--experiment', 'ours']) == 0

    summary = timm_parity.read_summary(tmp_path / 'ours' / 'summary.csv')
    assert len(summary) == len(reference['summary'])
    for ours, theirs in zip(summary, reference['summary']):
        # equal to the last digit on the machine that recorded them; the margin is for another CPU's kernels (a
        # change in what is drawn or computed moves the losses by 1e-3 and more)
        assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-9), f"epoch {theirs['epoch']}"

    progress = timm_parity.parse_progress([r.getMessage() for r in caplog.records])
    assert [line[:2] for line in progress] == [line[:2] for line in reference['progress']]  # epoch, update index
    # the losses and lr as the lines print them (3 significant digits): equal but for a last-digit rounding
    assert [v for line in progress for v in line[2:]] == pytest.approx(
        [v for line in reference['progress'] for v in line[2:]], rel=1e-2)
