"""train_one_epoch: the AMP loss scale reaches the SKD task as a device tensor, with no host sync."""
import copy

import pytest
import timm
import torch
from timm.utils import NativeScaler

from sdpgo_timm import SDPGOTask
from sdpgo_timm.compat import amp_loss_scale
from sdpgo_timm.runner.engine import LoopOptions, train_one_epoch


def _batches(n=4, size=6):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 3, 16, 16, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(n)]


def _run(model, loss_scaler):
    task = SDPGOTask(model, replay='tensors', verbose=False)
    optimizer = torch.optim.SGD(task.parameters(), lr=0.01)
    train_one_epoch(0, task, _batches(), optimizer,
                    LoopOptions(device=torch.device('cpu'), loss_scaler=loss_scaler, log_enabled=False))
    return task


def test_amp_loss_scale_is_the_scaler_tensor_after_its_first_step():
    assert amp_loss_scale(None) == 1.0
    scaler = NativeScaler(device='cpu')
    assert amp_loss_scale(scaler) == scaler._scaler.get_scale() == 65536.0  # before the first step: the init
    scaler._scaler.scale(torch.ones(()))
    scale = amp_loss_scale(scaler)
    assert isinstance(scale, torch.Tensor) and scale.item() == 65536.0


def test_pwa_sees_the_same_gradients_under_a_loss_scaler_without_reading_the_scale(monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=4)
    plain = _run(copy.deepcopy(model), None)

    reads = []
    real_get_scale = torch.amp.GradScaler.get_scale
    monkeypatch.setattr(torch.amp.GradScaler, 'get_scale',
                        lambda self: reads.append(self._scale is not None) or real_get_scale(self))
    scaled = _run(copy.deepcopy(model), NativeScaler(device='cpu'))
    assert not any(reads), 'the loop read the scale tensor on the host (a device sync per step)'
    assert scaled.pwa.steps == plain.pwa.steps > 0
    for a, b in zip(scaled.pwa.layers, plain.pwa.layers):
        for key in ('lam', 'mean', 'var'):
            torch.testing.assert_close(a.state_dict()[key], b.state_dict()[key], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(scaled.cache.alpha, plain.cache.alpha, rtol=1e-4, atol=1e-6)
