""" A run of the previous release resumes under today's train.py: its epoch checkpoint, its mid-epoch recovery
checkpoints and its summary.csv.

`tests/data/release_d8315f6/` holds what the release at commit d8315f6 (before the restructure into a method
registry, a session in phases and one checkpoint module) wrote for a 1-epoch SDPGO run of 8 optimizer steps on a
tenth of digits, with a 3,750-parameter test_resnet at 8x8 (so that the files stay small); `last.pth.tar` is its
epoch checkpoint, `recovery-0-4.pth.tar` the recovery checkpoint after step 4 and `recovery-0-8.pth.tar` the one
after the epoch's last step. They were written, in a checkout of that commit, by

    python train.py digits --sdpgo --model test_resnet --model-kwargs 'channels=(4,4,4,8)' stem_width=4 \\
        --input-size 3 8 8 --workers 0 --warmup-epochs 0 --log-interval 1000 -b 32 --epochs 1 \\
        --train-fraction 0.1 --recovery-interval 4 --seed 0 --output runs --experiment old

Today's train.py resumes them with the same command and `--epochs 2`. The references are computed in the same
test run or are machine-independent (integers, RNG streams), never float numbers of the machine that wrote the
files: two resumes of the same old state must train on to the same weights, and a mid-epoch resume must draw the
same random numbers and samples as the old run drew for the rest of its epoch.
"""
import csv
import logging
import shutil
from pathlib import Path
from typing import Any, List

import pytest
import torch

from sdpgo_timm.runner.checkpoint import load_checkpoint_file
from sdpgo_timm.runner.summary import summary_epochs
from conftest import assert_same_weights, run_train, summary

OLD = Path(__file__).parent / 'data' / 'release_d8315f6'
# the old run's command line (its args.yaml), trained on for one more epoch
COMMAND = ['digits', '--sdpgo', '--model', 'test_resnet', '--model-kwargs', 'channels=(4,4,4,8)', 'stem_width=4',
           '--input-size', '3', '8', '8', '--workers', '0', '--warmup-epochs', '0', '--log-interval', '1000',
           '-b', '32', '--epochs', '2', '--train-fraction', '0.1', '--recovery-interval', '4', '--seed', '0']
STEPS = 8  # optimizer steps per epoch


def train_on(output: Path, experiment: str, resume: str) -> Path:
    """Today's train.py resumed from `resume` into `output/experiment`; the run folder."""
    assert run_train([*COMMAND, '--output', str(output), '--experiment', experiment, '--resume', resume]) == 0
    return output / experiment


def old_file(name: str, folder: Path) -> str:
    """A copy of one of the old files in `folder` (a run never touches the committed ones)."""
    shutil.copy(OLD / name, folder / name)
    return str(folder / name)


def same(a: Any, b: Any) -> bool:
    """Nested RNG states (dicts, lists, tuples, tensors, numbers) equal to the last bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def csv_rows(path: Path) -> List[List[str]]:
    with open(path, newline='') as f:
        return list(csv.reader(f))


@pytest.fixture(scope='module')
def old_last() -> dict:
    return load_checkpoint_file(str(OLD / 'last.pth.tar'))


def test_the_old_files_are_what_the_release_wrote(old_last):
    """What the tests below rest on: the old files are an SDPGO run's epoch and recovery checkpoints."""
    assert old_last['epoch'] == 0 and 'position' not in old_last and len(old_last['rng_ranks']) == 1
    assert {'pwa', 'cache', 'replay', 'teacher_steps'} <= set(old_last['task_state'])
    assert old_last['task_state']['replay'] == 'views' and len(old_last['task_state']['cache']['index']) == 16
    assert old_last['task_state']['teacher_steps'] == STEPS - 1  # the first step has no teacher
    for step in (4, 8):
        recovery = load_checkpoint_file(str(OLD / f'recovery-0-{step}.pth.tar'))
        assert recovery['position'] == {'epoch': 0, 'step': step, 'num_updates': step}
    assert [row[0] for row in csv_rows(OLD / 'summary.csv')] == ['epoch', '0']


def test_old_epoch_checkpoint_and_end_of_epoch_recovery_train_on_alike(tmp_path, old_last, caplog):
    """The epoch checkpoint resumed in place (`--resume auto`, with the old summary.csv) and the recovery
    checkpoint after the epoch's last step hold one state: both train epoch 1 to the same weights, bit for bit.
    The task state was read (its cached teacher serves epoch 1's first step) and the old summary rows stay."""
    caplog.set_level(logging.INFO)
    run = tmp_path / 'runs' / 'old'
    run.mkdir(parents=True)
    for name in ('args.yaml', 'summary.csv', 'last.pth.tar'):
        old_file(name, run)
    assert train_on(tmp_path / 'runs', 'old', 'auto') == run
    assert any(f"Resumed {str(run / 'last.pth.tar')!r} at epoch 1" in r.getMessage() for r in caplog.records)
    from_recovery = train_on(tmp_path / 'runs', 'recovery', old_file('recovery-0-8.pth.tar', tmp_path))
    assert any("recovery-0-8.pth.tar' at epoch 0, after step 8" in r.getMessage() for r in caplog.records)

    assert_same_weights(run / 'last.pth.tar', from_recovery / 'last.pth.tar')
    for folder in (run, from_recovery):
        state = load_checkpoint_file(str(folder / 'last.pth.tar'))['task_state']
        # without the old task state epoch 1 would begin teacherless (STEPS - 1 steps, counted from 0)
        assert state['teacher_steps'] == old_last['task_state']['teacher_steps'] + STEPS

    old_rows, rows = csv_rows(OLD / 'summary.csv'), csv_rows(run / 'summary.csv')
    assert rows[:2] == old_rows  # the old header and row, as the release wrote them
    assert len(rows) == 3 and all(rows[2]) and len(rows[2]) == len(old_rows[0])
    assert summary_epochs(str(run / 'summary.csv')) == [0, 1]
    assert summary(run)[1]['train_steps'] == str(STEPS)


def test_old_mid_epoch_recovery_checkpoint_continues_where_it_stopped(tmp_path, old_last, caplog):
    """Resumed after step 4 of 8, today's train.py trains the epoch's other 4 steps on the samples and random
    numbers the old run had for them: its epoch checkpoint ends with the old one's RNG states (every draw of the
    augmentations, the loader order and the evaluation) and caches the old one's last fresh half (its dataset
    indices); the epoch's sums carry over (8 steps in its summary row), and it trains on through epoch 1."""
    caplog.set_level(logging.INFO)
    run = train_on(tmp_path, 'mid', old_file('recovery-0-4.pth.tar', tmp_path))
    assert any("recovery-0-4.pth.tar' at epoch 0, after step 4" in r.getMessage() for r in caplog.records)
    epoch0 = load_checkpoint_file(str(run / 'checkpoint-0.pth.tar'))
    assert same(epoch0['rng_ranks'], old_last['rng_ranks'])
    assert torch.equal(epoch0['task_state']['cache']['index'], old_last['task_state']['cache']['index'])
    assert epoch0['task_state']['teacher_steps'] == old_last['task_state']['teacher_steps']
    assert [row['epoch'] for row in summary(run)] == ['0', '1']
    assert summary(run)[0]['train_steps'] == str(STEPS)
