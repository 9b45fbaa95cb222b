"""The CUDA path: mixed precision, channels_last, torch.compile, no host sync per step, exact GPU resume.

Run with `pytest -m cuda` on a machine with a GPU (benchmarks/gpu_check.py does); without CUDA these
tests are skipped. Their CPU counterparts live in test_task.py, test_engine.py and test_robustness.py.
"""
import copy
import signal
import warnings

import pytest
import timm
import torch
from timm.utils import NativeScaler

from sdpgo_timm import SDPGOTask
from sdpgo_timm.runner.checkpoint import load_checkpoint_file
from sdpgo_timm.runner.engine import LoopOptions, train_one_epoch
from conftest import FAST, assert_same_weights, run_train, signal_at_step
from pwa_reference import PWAReference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]
DEVICE = torch.device('cuda')


def _model(name='resnet18', **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kwargs).to(DEVICE)


def _batches(n=4, half=8, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(half, 3, size, size, generator=g).to(DEVICE),
             torch.randint(0, 10, (half,), generator=g).to(DEVICE)) for _ in range(n)]


def _alphas(task, batches, autocast_dtype=None, scaler=None):
    """The α PWA computed for each step's fresh half, stepping an SGD optimizer (lr 0: the weights stay)."""
    optimizer = torch.optim.SGD(task.parameters(), lr=0.0)
    alphas = []
    for x, y in batches:
        with torch.autocast('cuda', dtype=autocast_dtype, enabled=autocast_dtype is not None):
            scale = scaler._scaler.get_scale() if scaler is not None else 1.0
            out = task(x, y, loss_scale=scale)
        if scaler is not None:
            scaler(out['loss'], optimizer)
        else:
            out['loss'].backward()
            optimizer.step()
        optimizer.zero_grad()
        alphas.append(task.cache.alpha.float().clone())
    return torch.stack(alphas)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_mixed_precision_alpha_is_finite_and_close_to_fp32(dtype):
    model = _model()
    batches = _batches()
    reference = _alphas(SDPGOTask(copy.deepcopy(model), replay='tensors', verbose=False), batches)
    scaler = NativeScaler(device='cuda') if dtype == torch.float16 else None
    mixed = _alphas(SDPGOTask(copy.deepcopy(model), replay='tensors', verbose=False), batches, dtype, scaler)
    assert torch.isfinite(mixed).all()
    # the first step's α may fall back to 0.5 when fp16 overflows in the scaler's first step (METHOD.md 5)
    torch.testing.assert_close(mixed[1:], reference[1:], atol=0.05, rtol=0)


@pytest.mark.parametrize('variant', ['channels_last', 'compile'])
def test_channels_last_and_compile_deliver_gradients_at_every_tap(variant):
    model = _model()
    if variant == 'channels_last':
        model.to(memory_format=torch.channels_last)
    task = SDPGOTask(model, replay='tensors', verbose=False)
    reference = PWAReference(task, model)  # hooked before compiling: the tapped modules stay eager
    if variant == 'compile':
        task.compile(backend='inductor')
    for x, y in _batches(3):
        if variant == 'channels_last':
            x = x.contiguous(memory_format=torch.channels_last)
        task(x, y)['loss'].backward()
        # every step's α is the one PWA's pure functions give for the features and gradients the taps saw
        torch.testing.assert_close(task.cache.alpha, reference.step(), rtol=1e-4, atol=0)
    assert len(task.tap_layers) == 2


def test_a_steady_state_step_makes_no_host_sync():
    """After warm-up, train_one_epoch's SDPGO steps (bf16, GradScaler-free) never wait on the device."""
    model = _model()
    task = SDPGOTask(model, replay='tensors', verbose=False)
    optimizer = torch.optim.SGD(task.parameters(), lr=0.01, momentum=0.9)
    autocast = lambda: torch.autocast('cuda', dtype=torch.bfloat16)  # noqa: E731
    options = LoopOptions(device=DEVICE, amp_autocast=autocast, log_enabled=False)
    train_one_epoch(0, task, _batches(3), optimizer, options)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            # log_interval past the epoch: the only device reads are the end-of-epoch means
            for x, y in _batches(4, seed=1):
                with autocast():
                    out = task(x, y)
                out['loss'].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode('default')
    syncs = [str(w.message) for w in caught if 'synchroniz' in str(w.message).lower()]
    assert not syncs, syncs[:3]


def test_a_recovery_checkpoint_written_on_the_gpu_resumes_bit_exact(tmp_path, monkeypatch):
    monkeypatch.setenv('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        argv = ['digits', '--sdpgo', '--epochs', '2', *FAST, '--device', 'cuda']
        assert run_train([*argv, '--output', str(tmp_path), '--experiment', 'whole']) == 0
        # stopped in epoch 1, as a preempted job (a finished run keeps no recovery file): 44 SDPGO steps an epoch,
        # SIGTERM in step 36 of epoch 1 (update 80, a recovery step)
        with pytest.MonkeyPatch.context() as stop:
            signal_at_step(stop, 44 + 36, [signal.SIGTERM])
            assert run_train([*argv, '--recovery-interval', '10', '--output', str(tmp_path),
                              '--experiment', 'cut']) == 4
        # continue from the last recovery checkpoint of epoch 1 in a fresh folder, as a restarted job would
        recovery = tmp_path / 'cut' / 'recovery-1-36.pth.tar'
        assert load_checkpoint_file(str(recovery))['position']['epoch'] == 1
        assert run_train([*argv, '--resume', str(recovery), '--output', str(tmp_path), '--experiment', 'resumed']) == 0
    finally:
        torch.use_deterministic_algorithms(False)
    assert_same_weights(tmp_path / 'whole' / 'last.pth.tar', tmp_path / 'resumed' / 'last.pth.tar')
