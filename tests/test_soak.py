""" Soak: digits SDPGO training killed with SIGKILL at random (seeded) times and resumed with --resume auto, again and
again; every resume continues from the last saved step and the run ends with the uninterrupted run's weights.

Short by default (two kills, for CI). For people: `SDPGO_SOAK_LONG=1 python -m pytest tests/test_soak.py`
kills a 5-epoch run 20 times (about 5 minutes on 2 cores); `SDPGO_SOAK_SEED=N` draws other kill times.
"""
import os
import random
import re
import signal
import time
from pathlib import Path
from typing import Optional, Set, Tuple

from sdpgo_timm.runner.checkpoint import find_resume_checkpoint, load_checkpoint_file, resume_position
from conftest import FAST, TrainProcess, assert_same_weights, run_train, summary

LONG = os.environ.get('SDPGO_SOAK_LONG') == '1'
EPOCHS, KILLS = (5, 20) if LONG else (2, 2)
SEED = int(os.environ.get('SDPGO_SOAK_SEED', '0'))


def _saved_position(run: Path) -> Optional[Tuple[int, int]]:
    """(epoch, step) that --resume auto continues from; None before the first checkpoint."""
    path = find_resume_checkpoint(str(run)) if run.is_dir() else None
    return resume_position(load_checkpoint_file(path)) if path else None


def _files(run: Path) -> Set[Tuple[str, int]]:
    """Checkpoint files and their modification times: a change means a save completed (saves are renames)."""
    files = set()
    for path in run.glob('*.pth.tar') if run.is_dir() else []:
        try:
            if not path.name.endswith('tmp.pth.tar'):
                files.add((path.name, path.stat().st_mtime_ns))
        except FileNotFoundError:  # a recovery file removed by the run meanwhile
            pass
    return files


def test_kill_and_resume_cycles_end_as_the_uninterrupted_run(sdpgo_run, tmp_path):
    argv = ['digits', '--sdpgo', '--epochs', str(EPOCHS), *FAST, '--recovery-interval', '3', '--output', str(tmp_path)]
    if LONG:
        assert run_train([*argv, '--experiment', 'straight']) == 0
        straight = tmp_path / 'straight'
    else:
        straight = sdpgo_run  # the same command line, without recovery checkpoints
    run = tmp_path / 'soak'
    argv += ['--experiment', 'soak', '--resume', 'auto']
    rng = random.Random(SEED)
    saved = None
    for cycle in range(KILLS):
        before = _files(run)
        process = TrainProcess(argv)
        if saved is not None:  # it continues from the last saved step
            process.wait_for(lambda: 'Resumed' in process.output)
            resumed = re.search(r"Resumed '.+' at epoch (\d+)(?:, after step (\d+))?", process.output)
            assert (int(resumed.group(1)), int(resumed.group(2) or 0)) == saved, process.output[-2000:]
        process.wait_for(lambda: _files(run) - before, timeout=300)  # a new checkpoint
        time.sleep(rng.uniform(0.0, 1.0))  # then at a random moment, maybe in the middle of a save
        assert process.process.poll() is None, f'cycle {cycle}: the run ended before its kill'
        process.process.send_signal(signal.SIGKILL)
        assert process.finish() == -signal.SIGKILL
        position = _saved_position(run)
        assert saved is None or position > saved
        saved = position

    last = TrainProcess(argv)
    assert last.finish(timeout=600) == 0, last.output[-3000:]
    assert f"after step {saved[1]}" in last.output or saved[1] == 0
    assert_same_weights(run / 'last.pth.tar', straight / 'last.pth.tar')
    assert [r['epoch'] for r in summary(run)] == [str(e) for e in range(EPOCHS)]
    assert [r['train_loss'] for r in summary(run)] == [r['train_loss'] for r in summary(straight)]
    assert not [p.name for p in run.iterdir() if '.tmp-' in p.name or p.name.endswith('tmp.pth.tar')]
    assert not list(run.glob('recovery-*.pth.tar'))  # a finished run's epoch checkpoints superseded them
