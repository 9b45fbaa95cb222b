"""Shared fixtures of the end-to-end tests of train.py and validate.py.

Training runs are small (digits at 16x16 with timm's `test_resnet`, 1-2 epochs) and run
in-process with one intra-op thread: on a few shared CPU cores, oversubscribed OpenMP threads
make such small models many times slower. Runs that several tests read are session fixtures;
tests must not write into their folders.
"""
import csv
import functools
import logging
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train.py and validate.py are scripts beside the package

# fast settings for digits runs: 16x16 inputs, no loader processes, no warmup, quiet progress
FAST = ['--model', 'test_resnet', '--input-size', '3', '16', '16', '--workers', '0', '--warmup-epochs', '0',
        '--log-interval', '1000']
FOLDER_CLASSES = ('cat', 'dog', 'fox')
FOLDER_IMAGES = 8  # per class and split


@contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_train(argv: List[str]) -> int:
    """train.py's exit status for a command line, run in this process."""
    import train
    with one_thread():
        return train.main(argv)


def run_validate(argv: List[str]) -> int:
    """validate.py's exit status for a command line, run in this process."""
    import validate
    with one_thread():
        return validate.main(argv)


class TrainProcess:
    """train.py in a subprocess (under torchrun with `torchrun` processes), one OpenMP thread as in-process runs
    (the same weights bit for bit); its output, stdout and stderr, is collected line by line as it comes."""

    def __init__(self, argv: List[str], torchrun: int = 0):
        launcher = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}'] if torchrun else []
        self.process = subprocess.Popen(
            [sys.executable, *launcher, 'train.py', *argv], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: List[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return ''.join(self.lines)

    def wait_for(self, condition: Callable[[], bool], timeout: float = 120) -> None:
        """Poll until `condition()`; fail if the process ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f'ended ({self.process.returncode}) first:\n{self.output[-3000:]}'
            assert time.monotonic() < deadline, f'timed out:\n{self.output[-3000:]}'
            time.sleep(0.02)

    def finish(self, timeout: float = 300) -> int:
        """Wait for the process to end; its exit status (negative: the signal that killed it)."""
        status = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return status


def signal_at_step(monkeypatch, step: int, signals: List[int]) -> None:
    """Send `signals` to this process from inside the task's forward of training step `step` (counted from 1 over
    the whole run; SDPGO tasks)."""
    from sdpgo_timm.task import SDPGOTask
    real_forward = SDPGOTask.forward
    steps = []

    @functools.wraps(real_forward)
    def forward(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == step:
            for signum in signals:
                os.kill(os.getpid(), signum)
        return real_forward(self, *args, **kwargs)
    monkeypatch.setattr(SDPGOTask, 'forward', forward)


def summary(run: Path) -> List[Dict[str, str]]:
    with open(run / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def assert_same_weights(a: Path, b: Path) -> None:
    from sdpgo_timm.runner.checkpoint import load_checkpoint_file
    sa, sb = load_checkpoint_file(str(a))['state_dict'], load_checkpoint_file(str(b))['state_dict']
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:3]}'


@pytest.fixture
def error_lines(caplog) -> Callable[[], List[str]]:
    """The error messages logged so far (each must be a single line)."""
    return lambda: [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _write_split(root: Path, split: str, seed: int) -> None:
    """FOLDER_IMAGES 32x32 PNGs per class: a class-coloured square on noise, so classes are learnable."""
    rng = np.random.RandomState(seed)
    for c, name in enumerate(FOLDER_CLASSES):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(FOLDER_IMAGES):
            img = rng.randint(0, 64, size=(32, 32, 3), dtype=np.uint8)
            y, x = rng.randint(0, 16, size=2)
            img[y:y + 16, x:x + 16, c] = 255
            Image.fromarray(img).save(folder / f'{name}_{i}.png')


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory) -> Path:
    """An ImageFolder dataset: train/ and validation/, each with FOLDER_IMAGES PNGs of 3 classes."""
    root = tmp_path_factory.mktemp('imagenet')
    _write_split(root, 'train', seed=0)
    _write_split(root, 'validation', seed=1)
    return root


@pytest.fixture(scope='session')
def sdpgo_run(tmp_path_factory) -> Path:
    """Output folder of a 2-epoch SDPGO digits run (views replay)."""
    output = tmp_path_factory.mktemp('train')
    assert run_train(['digits', '--sdpgo', '--epochs', '2', *FAST, '--output', str(output),
                      '--experiment', 'sdpgo']) == 0
    return output / 'sdpgo'


@pytest.fixture(scope='session')
def ce_ema_run(tmp_path_factory) -> Path:
    """Output folder of a 1-epoch cross-entropy digits run with --model-ema."""
    output = tmp_path_factory.mktemp('train')
    assert run_train(['digits', '--epochs', '1', '--model-ema', '--model-ema-decay', '0.9', *FAST,
                      '--output', str(output), '--experiment', 'ce']) == 0
    return output / 'ce'
