""" Long runs that survive: atomic writes, --resume auto, mid-epoch recovery, preemption, data-only loading, bad input.

Exactness is checked against the session's uninterrupted SDPGO run (`sdpgo_run`): a recovery
run, a run killed with SIGKILL or stopped with SIGTERM and then resumed must end with the same
weights, bit for bit (one CPU thread, `--workers 0`).
"""
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

import numpy as np
import pytest
import torch

from sdpgo_timm import hub
from sdpgo_timm.runner.checkpoint import find_resume_checkpoint, load_checkpoint_file, resume_position
from sdpgo_timm.runner.errors import WriteError
from sdpgo_timm.runner.rundir import atomic_save
from sdpgo_timm.runner.summary import append_summary
from sdpgo_timm.runner.preemption import PreemptionSignal
from sdpgo_timm.data.replay import ReplayBatchSampler
from fakehub import fake_hub  # noqa: F401 (fixture)
from conftest import FAST, TrainProcess, assert_same_weights, run_train, run_validate, signal_at_step, summary

SDPGO = ['digits', '--sdpgo', '--epochs', '2', *FAST]  # the command line of the session's sdpgo_run
STEPS = 44  # optimizer steps per epoch of that run
DIGITS_TRAIN = 1438


def temporaries(root: Path) -> List[Path]:
    return [p for p in root.rglob('*') if '.tmp-' in p.name or p.name in ('tmp.pth.tar', 'recovery_tmp.pth.tar')]


def hashes(root: Path) -> Dict[str, str]:
    """sha256 of every file under `root` but temporaries and run-folder locks (held only while a run runs)."""
    skip = set(temporaries(root)) | set(root.rglob('.lock'))
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file() and p not in skip}


def recovery_files(run: Path) -> List[Path]:
    return sorted(run.glob('recovery-*.pth.tar'))


@pytest.fixture(scope='session')
def recovery_run(tmp_path_factory) -> Path:
    """sdpgo_run's command line with a recovery checkpoint every 10 optimizer steps, stopped by SIGTERM after step
    36 of epoch 1 (update 80, a recovery step): the folder of a preempted run (a finished one keeps no recovery
    file). Tests copy what they change."""
    output = tmp_path_factory.mktemp('train')
    with pytest.MonkeyPatch.context() as monkeypatch:
        signal_at_step(monkeypatch, STEPS + 36, [signal.SIGTERM])
        assert run_train([*SDPGO, '--recovery-interval', '10', '--output', str(output), '--experiment', 'rec']) == 4
    return output / 'rec'


# ---------------------------------------------------------------------------------------------------------------------
# What is saved, and what a resume continues from


def test_recovery_checkpoints_hold_the_position_and_do_not_change_training(recovery_run, sdpgo_run, tmp_path):
    """Eight recovery checkpoints written, the run stopped, then resumed: the weights of the uninterrupted run."""
    shutil.copytree(recovery_run, tmp_path / 'rec')
    assert run_train([*SDPGO, '--recovery-interval', '10', '--output', str(tmp_path), '--experiment', 'rec',
                      '--resume', 'auto']) == 0
    assert_same_weights(tmp_path / 'rec' / 'last.pth.tar', sdpgo_run / 'last.pth.tar')
    assert not recovery_files(tmp_path / 'rec')  # finished: the epoch checkpoint superseded them
    assert [p.name for p in recovery_files(recovery_run)] == ['recovery-1-26.pth.tar', 'recovery-1-36.pth.tar']
    checkpoint = load_checkpoint_file(str(recovery_run / 'recovery-1-36.pth.tar'))
    assert checkpoint['position'] == {'epoch': 1, 'step': 36, 'num_updates': STEPS + 36}
    assert resume_position(checkpoint) == (1, 36) and checkpoint['epoch'] == 1
    rank, = checkpoint['recovery_ranks']
    assert rank['loader']['step'] == 36 and rank['meter']['batches'] == 36 and rank['meter']['steps'] == 36
    assert {'torch', 'numpy', 'python'} <= set(rank['loader']['rng'][-1])
    assert len(checkpoint['task_state']['cache']['index']) == 32  # the fresh half the next step replays
    assert resume_position(load_checkpoint_file(str(recovery_run / 'last.pth.tar'))) == (1, 0)
    assert resume_position(load_checkpoint_file(str(tmp_path / 'rec' / 'last.pth.tar'))) == (2, 0)


def test_an_epoch_checkpoint_removes_the_recovery_files_it_supersedes_and_a_stopped_run_keeps_its_newest(tmp_path):
    argv = [*SDPGO, '-b', '128', '--recovery-interval', '5', '--output', str(tmp_path), '--experiment', 'run']
    steps = DIGITS_TRAIN // 64  # SDPGO steps per epoch at -b 128 (64 fresh images a step, the last partial dropped)
    with pytest.MonkeyPatch.context() as monkeypatch:
        signal_at_step(monkeypatch, steps + 3, [signal.SIGTERM])  # epoch 0 wrote recovery files at updates 5 … 20
        assert run_train(argv) == 4
    assert [p.name for p in recovery_files(tmp_path / 'run')] == ['recovery-1-3.pth.tar']
    assert run_train([*argv, '--resume', 'auto']) == 0
    assert not recovery_files(tmp_path / 'run') and load_checkpoint_file(str(tmp_path / 'run' / 'last.pth.tar'))[
        'epoch'] == 1


def test_resume_auto_picks_the_newest_checkpoint_that_loads(recovery_run, sdpgo_run, tmp_path, caplog):
    """A run killed in epoch 1: the newest recovery file is truncated, so the one before it is taken."""
    caplog.set_level(logging.INFO)
    run = tmp_path / 'rec'
    run.mkdir()
    for name in ('args.yaml', 'checkpoint-0.pth.tar', 'recovery-1-26.pth.tar', 'recovery-1-36.pth.tar'):
        shutil.copy(recovery_run / name, run / name)
    for name in ('last.pth.tar', 'model_best.pth.tar'):  # as they were after epoch 0
        shutil.copy(recovery_run / 'checkpoint-0.pth.tar', run / name)
    (run / 'summary.csv').write_text(''.join((recovery_run / 'summary.csv').read_text().splitlines(True)[:2]))
    truncated = run / 'recovery-1-36.pth.tar'
    truncated.write_bytes(truncated.read_bytes()[:5000])
    assert find_resume_checkpoint(str(run)) == str(run / 'recovery-1-26.pth.tar')
    assert find_resume_checkpoint(str(tmp_path / 'empty')) is None
    assert any(f"skipping a checkpoint that does not load: '{truncated}' is not a timm training checkpoint"
               in r.getMessage() for r in caplog.records)

    assert run_train([*SDPGO, '--output', str(tmp_path), '--experiment', 'rec', '--resume', 'auto']) == 0
    assert any("recovery-1-26.pth.tar' at epoch 1, after step 26" in r.getMessage() for r in caplog.records)
    assert_same_weights(run / 'last.pth.tar', sdpgo_run / 'last.pth.tar')
    assert [r['epoch'] for r in summary(run)] == ['0', '1']
    assert summary(run)[1]['train_loss'] == summary(sdpgo_run)[1]['train_loss']  # the epoch's sums were saved too


def test_sigkill_after_a_recovery_checkpoint_then_resume_is_exact(sdpgo_run, tmp_path):
    run = tmp_path / 'killed'
    process = TrainProcess([*SDPGO, '--recovery-interval', '5', '--output', str(tmp_path), '--experiment', 'killed'])
    process.wait_for(lambda: any(run.glob('recovery-0-10.pth.tar')))
    process.process.kill()
    assert process.finish() == -signal.SIGKILL
    assert run_train([*SDPGO, '--recovery-interval', '5', '--output', str(tmp_path), '--experiment', 'killed',
                      '--resume', 'auto']) == 0
    assert_same_weights(run / 'last.pth.tar', sdpgo_run / 'last.pth.tar')
    assert not temporaries(run)
    assert not recovery_files(run)  # the resumed run took over the old recovery files and cleaned them up


def test_sigterm_saves_a_recovery_checkpoint_and_exits_4(sdpgo_run, tmp_path):
    run = tmp_path / 'stopped'
    process = TrainProcess([*SDPGO, '--output', str(tmp_path), '--experiment', 'stopped', '--log-interval', '1'])
    process.wait_for(lambda: f'Train: 0 [   3/{STEPS} ' in process.output)  # timm's line of the 4th update
    process.process.send_signal(signal.SIGTERM)
    assert process.finish() == 4, process.output[-3000:]
    message = process.output.strip().splitlines()[-1]
    assert re.search(r'preempted by SIGTERM after step \d+ of epoch 0', message) and '--resume auto' in message
    saved, = recovery_files(run)
    assert saved.name in message
    step = load_checkpoint_file(str(saved))['position']['step']
    # no progress line of an update after the saved one (timm's lines count updates from 0)
    assert f'after step {step} of epoch 0' in message and f'Train: 0 [{step:>4d}/{STEPS} ' not in process.output

    assert run_train([*SDPGO, '--output', str(tmp_path), '--experiment', 'stopped', '--resume', 'auto']) == 0
    assert_same_weights(run / 'last.pth.tar', sdpgo_run / 'last.pth.tar')


def test_preemption_signal_is_recorded_while_active_and_handlers_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionSignal() as preemption:
        assert not preemption.stopping()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.stopping() and preemption.name == 'SIGUSR1'
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_signal_during_validation_stops_after_the_epoch_checkpoint(tmp_path, monkeypatch, error_lines):
    from sdpgo_timm.runner import session
    real_validate = session.validate

    def validate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_validate(*args, **kwargs)
    monkeypatch.setattr(session, 'validate', validate)
    assert run_train(['digits', *FAST, '-b', '128', '--epochs', '2', '--output', str(tmp_path),
                      '--experiment', 'run']) == 4
    assert 'preempted by SIGTERM at the end of epoch 0; its checkpoint is saved' in error_lines()[-1]
    assert load_checkpoint_file(str(tmp_path / 'run' / 'last.pth.tar'))['epoch'] == 0
    assert [r['epoch'] for r in summary(tmp_path / 'run')] == ['0'] and not recovery_files(tmp_path / 'run')


def _rank_pid(launcher: int, rank: int) -> int:
    """Process id of a torchrun worker (Linux: the launcher's children, found by their RANK)."""
    for child in Path(f'/proc/{launcher}/task/{launcher}/children').read_text().split():
        if f'RANK={rank}'.encode() in Path(f'/proc/{child}/environ').read_bytes().split(b'\0'):
            return int(child)
    raise AssertionError(f'no rank {rank} under {launcher}')


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='finds torchrun workers in /proc')
def test_torchrun_preemption_of_one_rank_stops_all_and_each_gets_its_cache_back(tmp_path):
    """SIGTERM to rank 1 only: both ranks stop after the same step and rank 0 writes every rank's state. Resumed,
    each rank must continue with its own replay cache: another rank's would fail the task's replay check."""
    run = tmp_path / 'ddp'
    ddp = ['digits', '--sdpgo', '--epochs', '1', '--device', 'cpu', *FAST, '-b', '128', '--output', str(tmp_path),
           '--experiment', 'ddp']
    process = TrainProcess([*ddp, '--recovery-interval', '2'], torchrun=2)
    process.wait_for(lambda: any(run.glob('recovery-*')))
    os.kill(_rank_pid(process.process.pid, 1), signal.SIGTERM)
    assert process.finish() != 0  # each rank exits 4; torchrun reports them as failed
    stops = re.findall(r'preempted by (SIGTERM|a signal to another rank) after step (\d+) of epoch 0', process.output)
    assert sorted(s for s, _ in stops) == ['SIGTERM', 'a signal to another rank'] and len({n for _, n in stops}) == 1
    step = int(stops[0][1])
    checkpoint = load_checkpoint_file(str(run / f'recovery-0-{step}.pth.tar'))
    assert checkpoint['position']['step'] == step and len(checkpoint['recovery_ranks']) == 2
    shards = [ReplayBatchSampler(DIGITS_TRAIN, 128, num_replicas=2, rank=r, seed=42).fresh_chunks(0) for r in (0, 1)]
    for state, shard in zip(checkpoint['task_state_ranks'], shards):
        assert torch.equal(state['cache']['index'], shard[step - 1])  # each rank's last fresh chunk

    resumed = TrainProcess([*ddp, '--resume', 'auto'], torchrun=2)
    assert resumed.finish() == 0, resumed.output[-3000:]
    assert resumed.output.count(f'at epoch 0, after step {step}') == 2  # both ranks
    for state, shard in zip(load_checkpoint_file(str(run / 'last.pth.tar'))['task_state_ranks'], shards):
        assert torch.equal(state['cache']['index'], shard[-1])


# ---------------------------------------------------------------------------------------------------------------------
# Writes that fail


def _full_disk_save(fail_on_call: int, on_fail: Callable[[], None] = lambda: None, zip_writer: bool = False):
    """A torch.save that writes half a file and then fails with ENOSPC on its `fail_on_call`-th call; with
    `zip_writer`, torch's own zip writer fails on a full device (/dev/full), raising its RuntimeError."""
    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) != fail_on_call:
            return real_save(obj, f, *args, **kwargs)
        on_fail()
        f.write(b'\0' * 1000)
        if zip_writer:  # buffered, as a file torch.save is given: its failed flushes reach torch's writer
            full = open('/dev/full', 'wb')
            try:
                real_save(obj, full, *args, **kwargs)
            finally:
                try:
                    full.close()
                except OSError:
                    pass
        raise OSError(errno.ENOSPC, 'No space left on device')
    return save


def test_failed_write_keeps_the_previous_file_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / 'last.pth.tar'
    atomic_save({'state_dict': {'w': torch.ones(3)}}, str(path))
    before = hashes(tmp_path)
    monkeypatch.setattr(torch, 'save', _full_disk_save(1))
    with pytest.raises(WriteError, match=r"could not write '.*last\.pth\.tar': No space left on device \(ENOSPC\); "
                                         r"the previous file is unchanged"):
        atomic_save({'state_dict': {'w': torch.zeros(3)}}, str(path))
    assert hashes(tmp_path) == before

    csv_path = tmp_path / 'summary.csv'
    append_summary(0, {'loss': 1.0}, {'top1': 50.0}, str(csv_path), lr=0.1)
    before = hashes(tmp_path)

    def half_copy(source, target):  # the disk fills up while the rows are copied
        target.write(b'1,0.5')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr('sdpgo_timm.runner.summary.shutil.copyfileobj', half_copy)
    with pytest.raises(WriteError, match='summary.csv'):
        append_summary(1, {'loss': 0.5}, {'top1': 60.0}, str(csv_path), lr=0.1)
    assert hashes(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------------
# Files are loaded as data only


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.mark.parametrize('entry', ['train --resume', 'train --initial-checkpoint', 'validate --checkpoint',
                                   'hub push'])
def test_a_checkpoint_that_would_run_code_is_refused(entry, tmp_path, fake_hub, error_lines, capsys):  # noqa: F811
    marker = tmp_path / 'marker'
    evil = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': {}, 'arch': 'test_resnet', 'args': _Payload(marker)}, evil)
    if entry == 'hub push':
        assert hub.main(['push', str(evil), 'sdpgo/evil']) == 2
        errors = capsys.readouterr().err.strip().splitlines()
        assert fake_hub.requests == []
    elif entry == 'validate --checkpoint':
        assert run_validate(['digits', '--checkpoint', str(evil), '--workers', '0']) == 2
        errors = error_lines()
    else:
        flag = entry.split()[1]
        assert run_train(['digits', *FAST, flag, str(evil), '--output', str(tmp_path / 'out')]) == 2
        errors = error_lines()
    assert not marker.exists()
    assert len(errors) == 1 and 'needs arbitrary code to load (posix.system): refused' in errors[0]
    assert 'weights_only=True' in errors[0]


def test_a_config_that_would_run_code_is_refused(tmp_path, error_lines):
    marker = tmp_path / 'marker'
    config = tmp_path / 'evil.yaml'
    config.write_text(f'epochs: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert run_train(['digits', *FAST, '-c', str(config), '--output', str(tmp_path / 'out')]) == 2
    assert not marker.exists() and 'is not valid YAML' in error_lines()[-1]


# ---------------------------------------------------------------------------------------------------------------------
# Unreadable images


def _image_folder_with_corrupt(source: Path, target: Path, corrupt: List[str]) -> Path:
    shutil.copytree(source, target)
    for name in corrupt:
        (target / name).write_bytes(b'not a png')
    return target


@pytest.mark.parametrize('workers', [0, 2])
def test_unreadable_images_are_named_and_counted(image_folder, tmp_path, workers, caplog):
    caplog.set_level(logging.INFO)
    bad = ['train/cat/cat_3.png', 'train/fox/fox_5.png']
    data = _image_folder_with_corrupt(image_folder, tmp_path / 'data', bad)
    assert run_train([str(data), *FAST, '-b', '8', '--epochs', '1', '--workers', str(workers), '--output',
                      str(tmp_path), '--experiment', 'run']) == 0
    row, = summary(tmp_path / 'run')
    assert int(row['train_skipped']) == 2
    if workers == 0:  # worker processes log to their own stderr
        warnings = [r.getMessage() for r in caplog.records if 'Skipped unreadable image' in r.getMessage()]
        assert {re.search(r"'(.+?)'", w).group(1) for w in warnings} == {str(data / b) for b in bad}
        assert any('2 unreadable skipped' in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one documented message, the documented exit status, nothing partly written, earlier runs unharmed


class Case(NamedTuple):
    tool: str  # train, validate, hub
    argv: Callable[['Inputs'], List[str]]
    message: str
    status: int = 2
    fault: Optional[str] = None  # 'full disk' / 'nan loss' / 'out of memory': a failure injected during training


class Inputs(NamedTuple):
    root: Path
    previous: Path  # an earlier run's folder (train writes beside it, under root/'runs')
    data: Path  # an image folder
    empty: Path
    corrupt_class: Path
    truncated: Path
    not_a_file: Path
    other_val: Path  # an image folder whose validation split has other classes than its train split
    one_class: Path  # an image folder with a single class
    link_loop: Path  # an image folder with a link back to a folder above it
    flat: Path  # class sub-folders without train/ and validation/ split folders
    bad_val: Path  # an image folder whose validation split holds an unreadable image
    grey: Path  # torchvision's Fashion-MNIST files (1-channel images) for --dataset torch/fashion_mnist


def train_argv(inputs: Inputs, *argv: str, experiment: str = 'previous') -> List[str]:
    """`argv` after FAST settings that write beside the earlier run (into it by default): `argv` wins."""
    return [*FAST, '--output', str(inputs.root / 'runs'), *(['--experiment', experiment] if experiment else []), *argv]


def config_case(config: str, error: str, experiment: str = 'new') -> Case:
    """train.py on digits with `-c` one of the YAML files `inputs` writes, failing with `error`."""
    return Case('train', lambda i: train_argv(i, 'digits', '-c', str(i.root / config), experiment=experiment), error)


CASES = {
    # train.py
    'train: empty data folder': Case('train', lambda i: train_argv(i, str(i.empty)), 'is empty'),
    'train: a file as the data folder': Case('train', lambda i: train_argv(i, str(i.not_a_file)),
                                             'is a file, not a folder'),
    'train: a folder as --resume': Case('train', lambda i: train_argv(i, 'digits', '--resume', str(i.previous)),
                                        'is a folder, not a file'),
    'train: class with only corrupt images': Case(
        'train', lambda i: train_argv(i, str(i.corrupt_class)),
        "class 'fox' has no readable image: all 8 of its files fail to load"),
    'train: truncated --resume': Case(
        'train', lambda i: train_argv(i, 'digits', '--sdpgo', '--resume', str(i.truncated)),
        'the file is truncated or corrupt'),
    'train: truncated --initial-checkpoint': Case(
        'train', lambda i: train_argv(i, 'digits', '--initial-checkpoint', str(i.truncated)),
        'is not a timm training checkpoint'),
    'train: checkpoint of another architecture': Case(
        'train', lambda i: train_argv(i, 'digits', '--sdpgo', '--model', 'resnet10t', '--resume',
                                      str(i.previous / 'last.pth.tar')),
        "holds a 'test_resnet' model, not --model 'resnet10t'"),
    'train: num_classes mismatch': Case(
        'train', lambda i: train_argv(i, 'digits', '--sdpgo', '--num-classes', '12', '--resume',
                                      str(i.previous / 'last.pth.tar')), 'does not fit --model'),
    'train: unknown option in YAML': config_case('unknown.yaml', "unknown key(s) ['epoch']", experiment='previous'),
    'train: non-numeric option': Case(
        'train', lambda i: train_argv(i, 'digits', '--epochs', 'ten'), "argument --epochs: invalid int value: 'ten'"),
    'train: non-numeric YAML value': config_case('words.yaml', "lr: 'fast' in config file", experiment='previous'),
    'train: negative epochs': Case('train', lambda i: train_argv(i, 'digits', '--epochs', '-1'),
                                   '--epochs must be >= 1, got -1'),
    'train: zero batch size': Case('train', lambda i: train_argv(i, 'digits', '-b', '0'),
                                   '--batch-size must be >= 1, got 0'),
    'train: negative lr': Case('train', lambda i: train_argv(i, 'digits', '--lr', '-0.1'), '--lr must be >= 0'),
    'train: negative workers': Case('train', lambda i: train_argv(i, 'digits', '--workers', '-1'),
                                    '--workers must be >= 0'),
    'train: negative recovery interval': Case(
        'train', lambda i: train_argv(i, 'digits', '--recovery-interval', '-5'), '--recovery-interval must be >= 0'),
    'train: --resume auto without --experiment': Case(
        'train', lambda i: train_argv(i, 'digits', '--resume', 'auto', experiment=''),
        '--resume auto needs --experiment'),
    'train: an eval metric evaluation does not report': Case(
        'train', lambda i: train_argv(i, 'digits', '--eval-metric', 'top10'),
        "--eval-metric 'top10' is not one evaluation reports; use one of top1, top5, loss"),
    'train: unknown option': Case('train', lambda i: train_argv(i, 'digits', '--bogus'),
                                  'unrecognized arguments: --bogus'),
    # data-transform options timm asserts on, raises a KeyError for, or takes silently (issue 18: beyond its list)
    'train: --mean of 2 values for 3 channels': Case(
        'train', lambda i: train_argv(i, 'digits', '--mean', '0.5', '0.5'),
        "--mean takes one value per input channel (3, --input-size's first value) or one for all, got 2"),
    'train: --std 0': Case('train', lambda i: train_argv(i, 'digits', '--std', '0.5', '0', '0.5'),
                           '--std must be > 0 (the input is divided by it)'),
    'train: --scale of one value': Case('train', lambda i: train_argv(i, 'digits', '--scale', '0.5'),
                                        '--scale takes two values, MIN <= MAX, got [0.5]'),
    'train: --ratio MIN > MAX': Case('train', lambda i: train_argv(i, 'digits', '--ratio', '1.33', '0.75'),
                                     '--ratio takes two values, MIN <= MAX (both > 0), got [1.33, 0.75]'),
    'train: --crop-pct 0 (timm ignores it)': Case(
        'train', lambda i: train_argv(i, 'digits', '--crop-pct', '0'), '--crop-pct is the share of the resized image'),
    'train: unknown --train-interpolation': Case(
        'train', lambda i: train_argv(i, 'digits', '--train-interpolation', 'cubic'),
        "--train-interpolation 'cubic' is not an interpolation timm knows: one of nearest, bilinear, bicubic"),
    'train: unknown --remode': Case('train', lambda i: train_argv(i, 'digits', '--reprob', '0.5', '--remode', 'px'),
                                    "--remode 'px' is not one of const, rand, pixel"),
    'train: unknown --mixup-mode (timm mixes per batch)': Case(
        'train', lambda i: train_argv(i, 'digits', '--mixup', '0.2', '--mixup-mode', 'pairs'),
        "--mixup-mode 'pairs' is not one of batch, pair, elem"),
    'train: unknown --clip-mode': Case(
        'train', lambda i: train_argv(i, 'digits', '--clip-grad', '1', '--clip-mode', 'l2'),
        "--clip-mode 'l2' is not one of norm, value, agc"),
    'train: unknown --aa policy': Case('train', lambda i: train_argv(i, 'digits', '--aa', 'randaugment'),
                                       "--aa 'randaugment' is not a policy timm knows"),
    'train: negative --start-epoch': Case('train', lambda i: train_argv(i, 'digits', '--start-epoch', '-1'),
                                          '--start-epoch must be >= 0, got -1'),
    'train: a sliced split of an in-memory benchmark (timm reads it whole)': Case(
        'train', lambda i: train_argv(i, 'digits', '--train-split', 'train[:50%]'),
        "split 'train[:50%]': a slice applies to --dataset hfds/, tfds/ and wds/ data sets only"),
    'train: SDPGO with CutMix and odd halves': Case(
        'train', lambda i: train_argv(i, 'digits', '--sdpgo', '--cutmix', '1', '-b', '6'),
        'Mixup/CutMix of a replay half and a fresh half needs even halves: --batch-size 6 must be a multiple of 4 '
        '(use 8)'),
    'train: --val-split the training split': Case(
        'train', lambda i: train_argv(i, 'digits', '--val-split', 'train'),
        "--val-split 'train' is the training split 'train': its scores would be training scores"),
    'train: fashion-mnist trainval evaluated on its validation images': Case(
        'train', lambda i: train_argv(i, 'fashion-mnist', '--train-split', 'trainval', '--data-dir', str(i.empty)),
        "--val-split 'validation' lies within the training split 'trainval'"),
    'train: --model-ema-decay 1 (the EMA never moves)': Case(
        'train', lambda i: train_argv(i, 'digits', '--model-ema', '--model-ema-decay', '1'),
        '--model-ema-decay must be in [0, 1), got 1.0'),
    'train: --bce-target-thresh 2 (every target 0)': Case(
        'train', lambda i: train_argv(i, 'digits', '--bce-loss', '--smoothing', '0.1', '--bce-target-thresh', '2'),
        '--bce-target-thresh must be in [0, 1), got 2.0'),
    'train: unknown --dist-bn': Case('train', lambda i: train_argv(i, 'digits', '--dist-bn', 'mean'),
                                     "--dist-bn 'mean' is not one of broadcast, reduce"),
    'train: --model-kwargs item without =': Case(
        'train', lambda i: train_argv(i, 'digits', '--model-kwargs', 'stem_width'),
        "argument --model-kwargs: expected KEY=VALUE items, got 'stem_width'"),
    'train: --model-kwargs the model does not take': Case(
        'train', lambda i: train_argv(i, 'digits', '--model-kwargs', 'width=2'),
        "--model-kwargs {{'width': 2}}: 'test_resnet' does not take it (ResNet.__init__() got an unexpected keyword"),
    'train: --opt-kwargs the optimizer does not take': Case(
        'train', lambda i: train_argv(i, 'digits', '--opt-kwargs', 'nesterow=True'),
        "--opt-kwargs {{'nesterow': True}}: SGD.__init__() got an unexpected keyword argument 'nesterow'"),
    'train: --opt-kwargs of an option': Case(
        'train', lambda i: train_argv(i, 'digits', '--opt-kwargs', 'momentum=0.5'),
        "--opt-kwargs {{'momentum': 0.5}}: "),
    'train: unwritable output folder': Case(
        'train', lambda i: train_argv(i, 'digits', '--output', str(i.not_a_file / 'runs')),
        'cannot write to the output folder'),
    'train: disk full while saving': Case(
        'train', lambda i: train_argv(i, 'digits', '-b', '128', '--epochs', '2', experiment='full'),
        'No space left on device (ENOSPC); the previous file is unchanged', status=5, fault='full disk'),
    'train: NaN loss': Case(
        'train', lambda i: train_argv(i, 'digits', '--sdpgo', '-b', '128', '--epochs', '2', '--recovery-interval',
                                      '2', experiment='nan'),
        'non-finite loss in epoch 1 (by step 3)', status=3, fault='nan loss'),
    'train: disk full in torch\'s zip writer (a RuntimeError)': Case(
        'train', lambda i: train_argv(i, 'digits', '-b', '128', '--epochs', '2', experiment='zipfull'),
        "torch.save failed ([enforce fail at inline_container.cc", status=5, fault='zip writer full disk'),
    # the run folder policy: a folder holding a run is written only by a resume of it
    'train: rerun into a finished run without --resume': Case(
        'train', lambda i: train_argv(i, 'digits', '--sdpgo'), "holds another run (checkpoint-0.pth.tar, "),
    'train: --resume of another run into a finished run': Case(
        'train', lambda i: train_argv(i, 'digits', '--sdpgo', '--resume', str(i.root / 'elsewhere.pth.tar')),
        "holds another run"),
    # silently wrong results
    'train: --num-classes 0': Case(
        'train', lambda i: train_argv(i, 'digits', '--num-classes', '0', experiment='new'),
        '--num-classes must be >= 1, got 0'),
    'train: --num-classes below the data\'s': Case(
        'train', lambda i: train_argv(i, 'digits', '--num-classes', '5', experiment='new'),
        '--num-classes 5 is fewer than the 10 classes of the training data'),
    'train: validation classes differ from training\'s': Case(
        'train', lambda i: train_argv(i, str(i.other_val), experiment='new'),
        "the validation split has other classes than the model was trained on (lacks ['fox'], adds ['wolf'])"),
    'train: one class': Case(
        'train', lambda i: train_argv(i, str(i.one_class), experiment='new'),
        "the training data has 1 class ('cat'); classification needs at least 2"),
    'train: a link back into the data folder': Case(
        'train', lambda i: train_argv(i, str(i.link_loop), experiment='new'), 'is a link back to a folder above it'),
    'train: --initial-checkpoint of another class count': Case(
        'train', lambda i: train_argv(i, 'digits', '--num-classes', '12', '--initial-checkpoint',
                                      str(i.previous / 'last.pth.tar'), experiment='new'),
        "has a 10-class head (fc) and the model 12 classes: --initial-checkpoint loads every weight as it is; to "
        "start from its backbone with a new head pass --pretrained --pretrained-path"),
    'train: non-finite option': Case('train', lambda i: train_argv(i, 'digits', '--lr', 'nan', experiment='new'),
                                     '--lr must be a finite number, got nan'),
    'train: a list for a one-value option in YAML': config_case('lr_list.yaml', "lr: [0.1, 0.2] in config file"),
    'train: a word for a switch in YAML': config_case('amp_word.yaml', "amp: 'sure' in config file"),
    'train: two values for a three-value option in YAML': config_case('size_two.yaml',
                                                                      "input_size: [32, 32] in config file"),
    # silently wrong results, third round: a batch that never fills, negative rates, splits that are not there
    'train: a batch larger than the training set': Case(
        'train', lambda i: train_argv(i, 'digits', '-b', '2000', experiment='new'),
        '--batch-size 2000 is larger than the 1438 training images: an epoch would have no full batch'),
    **{f'train: negative {flag}': Case('train', lambda i, flag=flag: train_argv(i, 'digits', flag, '-0.1',
                                                                                 experiment='new'),
                                       f'{flag} must be >= 0, got -0.1 (rates, decays and momenta are never negative)')
       for flag in ('--warmup-lr', '--weight-decay', '--momentum', '--min-lr', '--lr-base', '--decay-rate',
                    '--layer-decay', '--clip-grad')},
    'train: torch/image_folder without split folders': Case(
        'train', lambda i: train_argv(i, str(i.flat), '--dataset', 'torch/image_folder', experiment='new'),
        "split 'train' not found in"),
    # raw tracebacks that are one line now
    'train: --smoothing 1.0': Case('train', lambda i: train_argv(i, 'digits', '--smoothing', '1.0', experiment='new'),
                                   '--smoothing must be in [0, 1), got 1.0'),
    'train: --drop-path 1': Case('train', lambda i: train_argv(i, 'digits', '--drop-path', '1', experiment='new'),
                                 '--drop-path must be in [0, 1), got 1.0'),
    'train: --reprob above 1': Case('train', lambda i: train_argv(i, 'digits', '--reprob', '1.5', experiment='new'),
                                    '--reprob must be in [0, 1], got 1.5'),
    'train: Mixup with an odd batch': Case(
        'train', lambda i: train_argv(i, 'digits', '--mixup', '0.2', '-b', '33', experiment='new'),
        'Mixup/CutMix mixes each image with another of its batch, so batches must be even: --batch-size 33'),
    'train: --cutmix-minmax with one value': Case(
        'train', lambda i: train_argv(i, 'digits', '--cutmix-minmax', '0.3', experiment='new'),
        '--cutmix-minmax takes two shares of the image side, MIN < MAX in [0, 1], got [0.3]'),
    'train: --cutmix-minmax with min > max': Case(
        'train', lambda i: train_argv(i, 'digits', '--cutmix-minmax', '0.8', '0.2', experiment='new'),
        '--cutmix-minmax takes two shares of the image side, MIN < MAX in [0, 1], got [0.8, 0.2]'),
    'train: a numeric key in YAML': config_case('number_key.yaml', "key 1 in config file"),
    'train: a YAML value outside the choices': config_case('choice.yaml', "sdpgo_weighting: 'sum' in config file"),
    'train: words for a list of numbers in YAML': config_case('model_list.yaml', "opt_betas: ['a', 'b'] in config file"),
    'train: a number for model_kwargs in YAML': config_case(
        'kwargs_number.yaml', "model_kwargs: 5 in config file '{root}/kwargs_number.yaml' is not a mapping"),
    'train: a mapping for a one-value option in YAML': config_case(
        'lr_mapping.yaml', "lr: {{'base': 0.1}} in config file '{root}/lr_mapping.yaml' is a mapping"),
    'train: --decay-epochs 0 with the step schedule': Case(
        'train', lambda i: train_argv(i, 'digits', '--sched', 'step', '--decay-epochs', '0'),
        '--decay-epochs must be > 0 with --sched step'),
    'train: unknown torchvision data set': Case(
        'train', lambda i: train_argv(i, str(i.data), '--dataset', 'torch/cifar11', experiment='new'),
        "--dataset 'torch/cifar11': timm knows no torchvision data set 'cifar11'; use one of torch/cifar10"),
    'train: a torchvision data set that is not there (offline)': Case(
        'train', lambda i: train_argv(i, str(i.empty), '--dataset', 'torch/cifar10', experiment='new'),
        "--dataset 'torch/cifar10' split 'train' cannot be loaded from"),
    'train: a 1-channel torchvision set on a 3-channel model': Case(
        'train', lambda i: train_argv(i, str(i.grey), '--dataset', 'torch/fashion_mnist', experiment='new'),
        "--dataset 'torch/fashion_mnist' has 1-channel images, the model takes 3: pass --in-chans 1"),
    'train: --class-map that does not exist': Case(
        'train', lambda i: train_argv(i, str(i.data), '--class-map', 'nothere.txt', experiment='new'),
        "--class-map 'nothere.txt' is not a file"),
    'train: out of memory': Case(
        'train', lambda i: train_argv(i, 'digits', '--sdpgo', '-b', '128', '--epochs', '2', experiment='oom'),
        'out of memory at --batch-size 128 (an allocation of 2.00 GiB failed): lower --batch-size', status=6,
        fault='out of memory'),
    # validate.py
    'validate: an unreadable validation image': Case(
        'validate', lambda i: [str(i.bad_val), '--model', 'test_resnet', '--num-classes', '3'],
        "evaluation image '{bad_val}/validation/dog/dog_2.png' cannot be read"),
    'validate: --results-file into a missing folder': Case(
        'validate', lambda i: ['digits', '--model', 'test_resnet', '--results-file', str(i.root / 'no' / 'r.csv')],
        "--results-file '{root}/no/r.csv': its folder '{root}/no' does not exist"),
    'validate: non-finite option': Case('validate', lambda i: ['digits', '--model', 'test_resnet', '--crop-pct', 'inf'],
                                        '--crop-pct must be a finite number, got inf'),
    'validate: classes differ from the checkpoint\'s': Case(
        'validate', lambda i: [str(i.data), '--checkpoint', str(i.previous / 'last.pth.tar')],
        "the 'validation' split has other classes than the model was trained on (lacks ['0', "),
    'validate: a sliced split of an image folder (timm reads it whole)': Case(
        'validate', lambda i: [str(i.data), '--model', 'test_resnet', '--split', 'validation[:4]'],
        "split 'validation[:4]': a slice applies to --dataset hfds/, tfds/ and wds/ data sets only; this one would "
        "read the whole split. Name the split alone"),
    'validate: unknown --interpolation': Case(
        'validate', lambda i: ['digits', '--model', 'test_resnet', '--interpolation', 'cubic'],
        "--interpolation 'cubic' is not an interpolation timm knows"),
    'validate: --crop-pct above 1 (a zero-padded crop)': Case(
        'validate', lambda i: ['digits', '--model', 'test_resnet', '--crop-pct', '2'],
        '--crop-pct is the share of the resized image the evaluation crop keeps, in (0, 1], got 2.0'),
    'validate: unknown --crop-mode': Case(
        'validate', lambda i: ['digits', '--model', 'test_resnet', '--crop-mode', 'x'],
        "--crop-mode 'x' is not one of center, squash, border"),
    'validate: truncated checkpoint': Case('validate', lambda i: ['digits', '--checkpoint', str(i.truncated)],
                                           'is not a timm training checkpoint'),
    'validate: empty data folder': Case('validate', lambda i: [str(i.empty), '--model', 'test_resnet'], 'is empty'),
    'validate: class with only corrupt images': Case(
        'validate', lambda i: [str(i.corrupt_class), '--model', 'test_resnet', '--split', 'train'],
        "class 'fox' has no readable image"),
    'validate: zero batch size': Case('validate', lambda i: ['digits', '--model', 'test_resnet', '-b', '0'],
                                      '--batch-size must be >= 1'),
    'validate: non-numeric option': Case('validate', lambda i: ['digits', '--model', 'test_resnet', '--workers', 'x'],
                                         "argument -j/--workers: invalid int value: 'x'"),
    # python -m sdpgo_timm.hub push
    'hub: truncated checkpoint': Case('hub', lambda i: ['push', str(i.truncated), 'sdpgo/x'],
                                      'is not a timm training checkpoint'),
    'hub: empty file': Case('hub', lambda i: ['push', str(i.root / 'empty.pth.tar'), 'sdpgo/x'],
                            'is not a timm training checkpoint'),
    'hub: args.yaml that is not a mapping': Case(
        'hub', lambda i: ['push', str(i.previous / 'last.pth.tar'), 'sdpgo/x', '--args-yaml',
                          str(i.root / 'list.yaml')],
        'is not an args.yaml written by training'),
    'hub: a damaged summary.csv': Case(
        'hub', lambda i: ['push', str(i.previous / 'last.pth.tar'), 'sdpgo/x', '--summary-csv',
                          str(i.root / 'damaged.csv')],
        "summary file '{root}/damaged.csv' is damaged (ValueError: could not convert string to float"),
}


@pytest.fixture
def inputs(tmp_path, image_folder, sdpgo_run) -> Inputs:
    previous = tmp_path / 'runs' / 'previous'
    shutil.copytree(sdpgo_run, previous)
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes((sdpgo_run / 'last.pth.tar').read_bytes()[:20000])
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty.pth.tar').write_bytes(b'')
    (tmp_path / 'unknown.yaml').write_text('epoch: 3\n')
    (tmp_path / 'words.yaml').write_text('lr: fast\n')
    (tmp_path / 'list.yaml').write_text('- model\n')
    (tmp_path / 'lr_list.yaml').write_text('lr: [0.1, 0.2]\n')
    (tmp_path / 'amp_word.yaml').write_text("amp: 'sure'\n")
    (tmp_path / 'size_two.yaml').write_text('input_size: [32, 32]\n')
    (tmp_path / 'number_key.yaml').write_text('1: 2\n')
    (tmp_path / 'choice.yaml').write_text('sdpgo_weighting: sum\n')
    (tmp_path / 'model_list.yaml').write_text('opt_betas: [a, b]\n')
    (tmp_path / 'kwargs_number.yaml').write_text('model_kwargs: 5\n')
    (tmp_path / 'lr_mapping.yaml').write_text('lr: {base: 0.1}\n')
    (tmp_path / 'damaged.csv').write_bytes(b'epoch,eval_top1\n0,98\x00\x00\n')
    (tmp_path / 'a_file').write_text('')
    shutil.copy(sdpgo_run / 'checkpoint-0.pth.tar', tmp_path / 'elsewhere.pth.tar')
    corrupt = [f'train/fox/fox_{i}.png' for i in range(8)]
    other_val = _image_folder_with_corrupt(image_folder, tmp_path / 'other_val', [])
    (other_val / 'validation' / 'fox').rename(other_val / 'validation' / 'wolf')
    one_class = _image_folder_with_corrupt(image_folder, tmp_path / 'one_class', [])
    for split in ('train', 'validation'):
        for name in ('dog', 'fox'):
            shutil.rmtree(one_class / split / name)
    link_loop = _image_folder_with_corrupt(image_folder, tmp_path / 'link_loop', [])
    (link_loop / 'train' / 'fox' / 'more').symlink_to(link_loop / 'train')
    flat = _image_folder_with_corrupt(image_folder / 'train', tmp_path / 'flat', [])
    bad_val = _image_folder_with_corrupt(image_folder, tmp_path / 'bad_val', ['validation/dog/dog_2.png'])
    return Inputs(tmp_path, previous, image_folder, tmp_path / 'empty',
                  _image_folder_with_corrupt(image_folder, tmp_path / 'corrupt', corrupt), truncated,
                  tmp_path / 'a_file', other_val, one_class, link_loop, flat, bad_val, _torchvision_grey(tmp_path))


def _torchvision_grey(root: Path) -> Path:
    """torchvision's raw Fashion-MNIST files (uncompressed IDX, 20 images each), as its FashionMNIST reads them."""
    raw = root / 'grey' / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True)
    for part in ('train', 't10k'):
        for kind, array in (('images-idx3', np.zeros((20, 28, 28), np.uint8)), ('labels-idx1', np.arange(20) % 10)):
            header = b'\x00\x00\x08' + bytes([array.ndim]) + b''.join(d.to_bytes(4, 'big') for d in array.shape)
            (raw / f'{part}-{kind}-ubyte').write_bytes(header + array.astype(np.uint8).tobytes())
    return root / 'grey'


def _inject(fault: str, root: Path, monkeypatch) -> Dict[str, Dict[str, str]]:
    """Make the run fail in epoch 1 as `fault` says; the returned dict gets the files' hashes at that moment."""
    at_failure: Dict[str, Dict[str, str]] = {}
    snapshot = lambda: at_failure.setdefault('hashes', hashes(root))  # noqa: E731
    if fault in ('full disk', 'zip writer full disk'):  # epoch 0's checkpoint, then epoch 1's
        monkeypatch.setattr(torch, 'save', _full_disk_save(2, snapshot, zip_writer=fault.startswith('zip')))
    elif fault == 'out of memory':  # the CPU allocator's error, in the third step of epoch 1
        from sdpgo_timm.task import SDPGOTask
        real_forward = SDPGOTask.forward
        steps = []

        @functools.wraps(real_forward)
        def forward(self, *args, **kwargs):
            steps.append(1)
            if len(steps) == 22 + 3:
                snapshot()
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: "
                                   "you tried to allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)")
            return real_forward(self, *args, **kwargs)
        monkeypatch.setattr(SDPGOTask, 'forward', forward)
    else:
        from sdpgo_timm.task import SDPGOTask
        real_forward = SDPGOTask.forward
        steps = []

        @functools.wraps(real_forward)  # the same signature: the loop passes sample indices to SKD tasks
        def forward(self, *args, **kwargs):
            out = real_forward(self, *args, **kwargs)
            steps.append(1)
            if len(steps) == 22 + 3:  # 22 steps an epoch: the third step of epoch 1, between recovery checkpoints
                snapshot()
                out['loss'] = out['loss'] * float('nan')
            return out
        monkeypatch.setattr(SDPGOTask, 'forward', forward)
    return at_failure


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input(case, inputs, error_lines, capsys, monkeypatch, fake_hub):  # noqa: F811
    tool, argv, message, status, fault = CASES[case]
    message = message.format(root=inputs.root, bad_val=inputs.bad_val)
    before = hashes(inputs.root)
    at_failure = _inject(fault, inputs.root / 'runs', monkeypatch) if fault else {}
    if tool == 'hub':
        assert hub.main(argv(inputs)) == status
        errors = capsys.readouterr().err.strip().splitlines()
        assert fake_hub.requests == []
    else:
        run = run_train if tool == 'train' else run_validate
        assert run([*argv(inputs), '--workers', '0'] if tool == 'validate' else argv(inputs)) == status
        errors = error_lines()
    assert len(errors) == 1 and message in errors[0], errors
    assert not temporaries(inputs.root) and not list(inputs.root.rglob('.lock'))
    if fault:
        assert hashes(inputs.root / 'runs') == at_failure['hashes']  # nothing written after the failure
    else:
        assert hashes(inputs.root) == before  # nothing written at all


# ---------------------------------------------------------------------------------------------------------------------
# Run folders, summary rows, EMA on resume, signals at any time


def test_a_folder_in_use_is_refused_and_a_finished_run_removes_its_lock(tmp_path, error_lines):
    from sdpgo_timm.runner.rundir import LOCK_FILE, RunFolderLock
    busy = tmp_path / 'busy'
    busy.mkdir()
    with RunFolderLock(str(busy)):  # another run writing there (flock conflicts across open files, even in-process)
        assert run_train(['digits', *FAST, '--epochs', '1', '--output', str(tmp_path), '--experiment', 'busy']) == 2
        assert f"output folder '{busy}' is in use by a running train.py (pid {os.getpid()})" in error_lines()[-1]
        assert sorted(p.name for p in busy.iterdir()) == [LOCK_FILE]
    assert not (busy / LOCK_FILE).exists()
    assert run_train(['digits', *FAST, '--epochs', '1', '--output', str(tmp_path), '--experiment', 'busy']) == 0
    assert not (busy / LOCK_FILE).exists() and [r['epoch'] for r in summary(busy)] == ['0']


def test_a_folder_with_only_args_yaml_is_reused(tmp_path):
    """A start that failed before its first checkpoint left only args.yaml: nothing to lose, the rerun proceeds."""
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'args.yaml').write_text('model: resnet50\n')
    assert run_train(['digits', *FAST, '--epochs', '1', '--output', str(tmp_path), '--experiment', 'run']) == 0
    assert 'test_resnet' in (tmp_path / 'run' / 'args.yaml').read_text()


def test_a_missing_summary_row_comes_back_from_its_checkpoint(sdpgo_run, tmp_path, caplog):
    """Stopped between epoch 1's checkpoint and its summary row; the resume finds nothing left to train."""
    caplog.set_level(logging.INFO)
    run = tmp_path / 'sdpgo'
    shutil.copytree(sdpgo_run, run)
    rows = (run / 'summary.csv').read_text().splitlines(True)
    (run / 'summary.csv').write_text(''.join(rows[:-1]))
    assert run_train([*SDPGO, '--output', str(tmp_path), '--experiment', 'sdpgo', '--resume', 'auto']) == 0
    assert (run / 'summary.csv').read_text() == (sdpgo_run / 'summary.csv').read_text()
    messages = [r.getMessage() for r in caplog.records]
    assert 'Nothing left to train: resumed at epoch 2 of 2; raise --epochs to train on' in messages
    best = max(float(r['eval_top1']) for r in summary(sdpgo_run))
    assert any(m.startswith(f'*** Best metric: {best}') for m in messages)


def test_resume_with_ema_from_a_checkpoint_without_ema_starts_the_ema_at_the_resumed_weights(
        sdpgo_run, tmp_path, caplog, monkeypatch):
    """timm builds its EMA after the resume; ours exists before it and must not keep the random initialisation.
    With its update switched off the EMA never moves (--model-ema-decay 1 is refused), so it must still be epoch
    0's weights at the end."""
    from timm.utils import ModelEmaV3
    monkeypatch.setattr(ModelEmaV3, 'update', lambda self, model, step=None: None)
    assert 'state_dict_ema' not in load_checkpoint_file(str(sdpgo_run / 'checkpoint-0.pth.tar'))
    assert run_train([*SDPGO, '--model-ema', '--resume',
                      str(sdpgo_run / 'checkpoint-0.pth.tar'), '--output', str(tmp_path), '--experiment', 'ema']) == 0
    assert any('has no EMA weights: --model-ema starts from the resumed model' in r.getMessage()
               for r in caplog.records)
    ema = load_checkpoint_file(str(tmp_path / 'ema' / 'last.pth.tar'))['state_dict_ema']
    resumed = load_checkpoint_file(str(sdpgo_run / 'checkpoint-0.pth.tar'))['state_dict']
    last = load_checkpoint_file(str(tmp_path / 'ema' / 'last.pth.tar'))['state_dict']
    weights = [k for k in resumed if k.endswith(('.weight', '.bias'))]  # parameters: the EMA copies buffers
    assert weights and all(torch.equal(ema[k], resumed[k]) for k in weights)
    assert not all(torch.equal(last[k], resumed[k]) for k in weights)  # while the model trained on


def test_ctrl_c_saves_a_recovery_checkpoint_like_sigterm_and_a_second_one_stops_at_once(
        sdpgo_run, tmp_path, monkeypatch, error_lines):
    handler = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs as a background job, else Python's
    signal_at_step(monkeypatch, 3, [signal.SIGINT])
    assert run_train([*SDPGO, '--output', str(tmp_path), '--experiment', 'int']) == 4
    assert re.search(r'preempted by SIGINT after step 3 of epoch 0', error_lines()[-1])
    saved, = recovery_files(tmp_path / 'int')
    assert run_train([*SDPGO, '--output', str(tmp_path), '--experiment', 'int', '--resume', 'auto']) == 0
    assert_same_weights(tmp_path / 'int' / 'last.pth.tar', sdpgo_run / 'last.pth.tar')

    signal_at_step(monkeypatch, 3, [signal.SIGINT, signal.SIGINT])
    assert run_train([*SDPGO, '--output', str(tmp_path), '--experiment', 'int2']) == 130
    assert error_lines()[-1].startswith('error: interrupted twice (Ctrl-C): stopped at once')
    assert not recovery_files(tmp_path / 'int2') and not temporaries(tmp_path)
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored


def test_sigterm_during_start_up_exits_4_with_one_line(tmp_path, monkeypatch, error_lines):
    from sdpgo_timm.runner import session
    real_create = session.create_train_loader

    def create(*args, **kwargs):  # the signal arrives while the loaders are being built
        os.kill(os.getpid(), signal.SIGTERM)
        return real_create(*args, **kwargs)
    monkeypatch.setattr(session, 'create_train_loader', create)
    assert run_train([*SDPGO, '--output', str(tmp_path), '--experiment', 'early']) == 4
    assert error_lines()[-1].startswith('preempted by SIGTERM during start-up, before the first step: nothing to save')
    assert not list((tmp_path / 'early').glob('*.pth.tar'))


def test_error_lines_print_once_as_error_colon():
    from sdpgo_timm.runner.setup import _ScriptFormatter
    fmt = _ScriptFormatter()
    record = lambda level, msg: logging.LogRecord('train', level, __file__, 1, msg, None, None)  # noqa: E731
    assert fmt.format(record(logging.ERROR, 'error: bad')) == 'error: bad'
    assert fmt.format(record(logging.WARNING, 'careful')) == 'WARNING: careful'
    assert fmt.format(record(logging.INFO, 'epoch 0')) == 'epoch 0'


def test_a_recovery_checkpoint_needs_the_same_batch_and_an_epoch_checkpoint_drops_what_does_not_fit(
        recovery_run, sdpgo_run, tmp_path, caplog, error_lines):
    assert run_train([*SDPGO, '-b', '32', '--resume', str(recovery_run / 'recovery-1-26.pth.tar'), '--output',
                      str(tmp_path), '--experiment', 'b32']) == 2
    assert 'is a recovery checkpoint of a run with --batch-size 64 (now 32)' in error_lines()[-1]
    for changed, expected in ((['-b', '32'], '--batch-size 64 (now 32)'),
                              (['--skd', 'pskd'], 'another method (sdpgo, now pskd)')):
        argv = [a for a in SDPGO if a != '--sdpgo'] if '--skd' in changed else SDPGO
        assert run_train([*argv, *changed, '--resume', str(sdpgo_run / 'checkpoint-0.pth.tar'), '--output',
                          str(tmp_path), '--experiment', changed[-1]]) == 0
        assert any(f'was trained with {expected}: its self-distillation state' in r.getMessage()
                   for r in caplog.records)
        assert [r['epoch'] for r in summary(tmp_path / changed[-1])] == ['1']


def test_bce_loss_without_soft_targets_warns_that_it_trains_with_cross_entropy(tmp_path, caplog):
    assert run_train(['digits', *FAST, '-b', '128', '--epochs', '1', '--bce-loss', '--output', str(tmp_path),
                      '--experiment', 'bce']) == 0
    assert any(r.getMessage().startswith('--bce-loss is used only with Mixup/CutMix or --smoothing')
               for r in caplog.records if r.levelno == logging.WARNING)


def test_img_size_on_the_command_line_beats_the_recipes_input_size():
    from sdpgo_timm.runner.args import parse_args
    args, text = parse_args(['fashion-mnist', '--img-size', '32'])
    assert args.input_size == [3, 32, 32] and 'input_size:\n- 3\n- 32\n- 32' in text
    explicit, _ = parse_args(['fashion-mnist', '--input-size', '3', '20', '20', '--img-size', '32'])
    assert explicit.input_size == [3, 20, 20]


def test_weights_files_timm_reads_work_for_initial_checkpoint_and_validate(sdpgo_run, tmp_path, capsys):
    """.safetensors, a bare state dict and a {'model': ...} file, as timm's load_checkpoint takes them."""
    from safetensors.torch import save_file
    weights = load_checkpoint_file(str(sdpgo_run / 'last.pth.tar'))['state_dict']
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / 'w.safetensors'))
    torch.save(weights, tmp_path / 'bare.pth')
    torch.save({'model': weights}, tmp_path / 'model.pth')
    expected = float(summary(sdpgo_run)[-1]['eval_top1'])
    for name in ('w.safetensors', 'bare.pth', 'model.pth'):
        capsys.readouterr()
        assert run_validate(['digits', '--model', 'test_resnet', '--checkpoint', str(tmp_path / name),
                             '--input-size', '3', '16', '16', '--workers', '0']) == 0
        result, = json.loads(capsys.readouterr().out.split('--result\n')[-1])
        assert result['top1'] == pytest.approx(expected, abs=1e-4), name
    # the one epoch is a warm-up from rate 0 (--lr 0 would mean "from --lr-base", as in timm)
    assert run_train(['digits', *FAST, '--epochs', '1', '--warmup-epochs', '1', '--warmup-lr', '0', '--initial-checkpoint',
                      str(tmp_path / 'w.safetensors'), '--output', str(tmp_path), '--experiment', 'init']) == 0
    trained = load_checkpoint_file(str(tmp_path / 'init' / 'last.pth.tar'))['state_dict']
    assert all(torch.equal(trained[k], weights[k]) for k in weights if k.endswith('.weight'))  # lr 0: as loaded


# ---------------------------------------------------------------------------------------------------------------------
# Folders that hold more than their classes' images: each class keeps its own images, nothing becomes a class


def _hidden_ipynb(root: Path) -> None:  # Jupyter's copies inside a class folder
    (root / 'train' / 'cat' / '.ipynb_checkpoints').mkdir()
    shutil.copy(root / 'train' / 'dog' / 'dog_0.png', root / 'train' / 'cat' / '.ipynb_checkpoints' / 'dog_0.png')


def _hidden_macosx(root: Path) -> None:  # a zip made on macOS: __MACOSX/<class>/._<image>, AppleDouble files
    (root / 'train' / '__MACOSX' / 'dog').mkdir(parents=True)
    shutil.copy(root / 'train' / 'cat' / 'cat_0.png', root / 'train' / '__MACOSX' / 'dog' / '._dog_0.png')


def _hidden_file(root: Path) -> None:  # an AppleDouble file beside the images of a class
    shutil.copy(root / 'train' / 'dog' / 'dog_0.png', root / 'train' / 'fox' / '._fox_0.png')


@pytest.mark.parametrize('dataset', ['', 'torch/image_folder'])
@pytest.mark.parametrize('hide', [_hidden_ipynb, _hidden_macosx, _hidden_file], ids=['ipynb', 'macosx', 'file'])
def test_hidden_folders_and_files_are_no_images_of_a_class(image_folder, tmp_path, dataset, hide, caplog):
    from sdpgo_timm.data.factory import create_split_dataset, dataset_classes, dataset_num_classes
    from sdpgo_timm.runner.args import parse_args
    data = _image_folder_with_corrupt(image_folder, tmp_path / 'data', [])
    hide(data)
    args, _ = parse_args([str(data), '--dataset', dataset])
    train = create_split_dataset(args, 'train', is_training=True)
    assert dataset_classes(train) == ['cat', 'dog', 'fox'] and dataset_num_classes(train) == 3  # not timm's 1000
    samples = train.reader.samples if hasattr(train, 'reader') else train.samples
    assert len(samples) == 24 and all(Path(path).parent.name == ('cat', 'dog', 'fox')[target]
                                      for path, target in samples)
    assert any('Left out 1 file(s) in hidden folders or with hidden names' in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------------------
# Images that cannot be read: training skips and counts them; evaluation refuses (a score must not count another)


def _bomb(path: Path, monkeypatch) -> None:
    """A 64x64 image where PIL's limit is 1500 pixels: twice over it, so PIL raises DecompressionBombError."""
    from PIL import Image
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1500)
    Image.new('RGB', (64, 64)).save(path)


def _corrupt(path: Path, monkeypatch) -> None:
    path.write_bytes(b'not a png')


def _truncated(path: Path, monkeypatch) -> None:  # the header reads, the pixels do not
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


@pytest.mark.parametrize('damage, before_training', [(_corrupt, True), (_bomb, True), (_truncated, False)],
                         ids=['corrupt', 'decompression bomb', 'truncated'])
def test_an_unreadable_image_is_skipped_in_training_and_refused_in_evaluation(
        image_folder, tmp_path, damage, before_training, caplog, error_lines):
    """Refused in evaluation before training when its header does not read; at the first evaluation when only its
    pixels do not (train.py reads the evaluation files' headers only, see README)."""
    caplog.set_level(logging.INFO)
    data = _image_folder_with_corrupt(image_folder, tmp_path / 'data', [])
    with pytest.MonkeyPatch.context() as monkeypatch:
        damage(data / 'train' / 'cat' / 'cat_3.png', monkeypatch)
        assert run_train([str(data), *FAST, '-b', '8', '--epochs', '1', '--output', str(tmp_path),
                          '--experiment', 'run']) == 0
        assert int(summary(tmp_path / 'run')[0]['train_skipped']) == 1
        damage(data / 'validation' / 'fox' / 'fox_1.png', monkeypatch)
        caplog.clear()
        assert run_train([str(data), *FAST, '-b', '8', '--epochs', '1', '--output', str(tmp_path),
                          '--experiment', 'val']) == 2
        assert error_lines()[-1].startswith(f"error: evaluation image '{data / 'validation' / 'fox' / 'fox_1.png'}' "
                                            "cannot be read")
        trained = any(r.getMessage().startswith('Train: 0 [') for r in caplog.records)
        assert trained is not before_training and (tmp_path / 'val').exists() is not before_training
        assert run_validate([str(data), '--checkpoint', str(tmp_path / 'run' / 'last.pth.tar'), '--workers', '2']) == 2
        assert error_lines()[-1].startswith(f"error: evaluation image '{data / 'validation' / 'fox' / 'fox_1.png'}' "
                                            "cannot be read") and '\n' not in error_lines()[-1]  # from a worker too


# ---------------------------------------------------------------------------------------------------------------------
# Signals: a closed terminal saves like SIGTERM; an upload stops at once; an interrupt is never replaced


@pytest.mark.parametrize('signum', [signal.SIGHUP, signal.SIGUSR1], ids=['SIGHUP', 'SIGUSR1'])
def test_a_closed_terminal_or_slurm_signal_saves_a_recovery_checkpoint(signum, tmp_path, monkeypatch, error_lines):
    signal_at_step(monkeypatch, 3, [signum])
    assert run_train([*SDPGO, '--output', str(tmp_path), '--experiment', 'hup']) == 4
    assert re.search(rf'preempted by {signal.Signals(signum).name} after step 3 of epoch 0', error_lines()[-1])
    saved, = recovery_files(tmp_path / 'hup')
    assert load_checkpoint_file(str(saved))['position']['step'] == 3


def test_sigterm_during_the_push_stops_it_at_once_and_keeps_the_run(tmp_path, monkeypatch, error_lines):
    import sdpgo_timm.hub
    import time
    pushed = []

    def push(*args, **kwargs):  # an upload that would take long: the signal must end it, not wait for it
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        pushed.append(1)
    monkeypatch.setattr(sdpgo_timm.hub, 'check_push_target', lambda repo_id: None)
    monkeypatch.setattr(sdpgo_timm.hub, 'push_checkpoint', push)
    started = time.monotonic()
    assert run_train(['digits', *FAST, '-b', '128', '--epochs', '1', '--output', str(tmp_path), '--experiment', 'p',
                      '--push-to-hub', 'sdpgo/x']) == 1
    assert time.monotonic() - started < 25 and not pushed
    assert error_lines()[-1].startswith('error: the push was interrupted by SIGTERM. The run itself is complete')
    assert 'python -m sdpgo_timm.hub push' in error_lines()[-1]
    assert (tmp_path / 'p' / 'model_best.pth.tar').is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_ctrl_c_during_a_hub_push_is_one_line(sdpgo_run, monkeypatch, capsys):
    from sdpgo_timm.hub import push as push_module

    def push(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(push_module, 'push_checkpoint', push)
    assert hub.main(['push', str(sdpgo_run / 'last.pth.tar'), 'sdpgo/x']) == 130
    error, = capsys.readouterr().err.strip().splitlines()
    assert error.startswith('error: interrupted (Ctrl-C) during the push')


def test_resuming_a_finished_run_says_nothing_is_left_and_trains_nothing(sdpgo_run, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO)
    shutil.copytree(sdpgo_run, tmp_path / 'sdpgo')
    before = hashes(tmp_path)
    assert run_train([*SDPGO, '--output', str(tmp_path), '--experiment', 'sdpgo', '--resume', 'auto']) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert 'Nothing left to train: resumed at epoch 2 of 2; raise --epochs to train on' in lines
    assert not any(line.startswith(('Training test_resnet', 'Scheduled epochs')) for line in lines)
    assert '--result' not in capsys.readouterr().out  # no empty list of evaluated epochs
    changed = {name for name in before if hashes(tmp_path)[name] != before[name]}
    assert changed == {'sdpgo/args.yaml'}  # the new command line (--resume auto); no checkpoint, no summary row


def test_a_finished_runs_leftover_recovery_files_go_when_it_is_resumed(sdpgo_run, recovery_run, tmp_path):
    """A run finished by an older version kept its recovery files: resumed in place, the epoch checkpoint it
    continues from supersedes them."""
    shutil.copytree(sdpgo_run, tmp_path / 'sdpgo')
    for name in ('recovery-1-26.pth.tar', 'recovery-1-36.pth.tar'):
        shutil.copy(recovery_run / name, tmp_path / 'sdpgo' / name)
    assert run_train([*SDPGO, '--output', str(tmp_path), '--experiment', 'sdpgo', '--resume', 'auto']) == 0
    assert not recovery_files(tmp_path / 'sdpgo') and (tmp_path / 'sdpgo' / 'last.pth.tar').is_file()


def test_an_hfds_data_set_that_cannot_load_offline_is_one_line(image_folder, tmp_path, monkeypatch, error_lines):
    """Without the `datasets` package (ImportError), or with it but offline and not cached: one line either way."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    assert run_train([str(image_folder), *FAST, '--dataset', 'hfds/sdpgo/none', '--output', str(tmp_path)]) == 2
    error, = error_lines()
    assert error.startswith("error: --dataset 'hfds/sdpgo/none' split 'train' cannot be loaded from") and \
        'it needs the `datasets` package' in error
