"""DLBTwoForwardTask: DLB's loss over two forwards per step, the replay check, the registry."""
import pytest
import timm
import torch
import torch.nn.functional as F

from sdpgo_timm.skd import DLB_PRESET, create_skd_task
from sdpgo_timm.skd.dlb import DLBTwoForwardTask
from sdpgo_timm.sil import per_sample_kl


def _tiny():
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=5)
    return model.eval()  # no BatchNorm batch coupling: a row's logits do not depend on its batch


def _half(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g)


def _record_forwards(model):
    """(batch size, first input value) of every forward of `model`."""
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append((len(args[0]), args[0][0, 0, 0, 0].item())))
    return calls


def test_loss_is_fresh_ce_plus_replay_ce_and_kd_over_two_forwards():
    model = _tiny()
    calls = _record_forwards(model)
    task = DLBTwoForwardTask(model, verbose=False)
    (x0, y0), (x0_view, _), (x1, y1) = _half(0), _half(1), _half(2)
    out0 = task(x0, y0, index=torch.arange(4))
    out0['loss'].backward()
    assert calls == [(4, x0[0, 0, 0, 0].item())]  # first step: the fresh half alone
    torch.testing.assert_close(out0['loss'], F.cross_entropy(model(x0), y0))
    teacher = F.softmax(model(x0) / 3.0, dim=1)
    del calls[:]

    # step 1: a new view of samples 0..3 is replayed, samples 4..7 are fresh
    out1 = task(torch.cat([x0_view, x1]), torch.cat([y0, y1]), index=torch.arange(8))
    # two forwards of one half each, not one of the whole batch: the fresh half, then the replay half
    assert calls == [(4, x1[0, 0, 0, 0].item()), (4, x0_view[0, 0, 0, 0].item())]
    replay_logits = model(x0_view)
    expected = F.cross_entropy(model(x1), y1) + (
        F.cross_entropy(replay_logits, y0, reduction='none') + 9.0 * per_sample_kl(teacher, replay_logits, 3.0)).mean()
    torch.testing.assert_close(out1['loss'], expected)
    torch.testing.assert_close(out1['output'], torch.cat([replay_logits, model(x1)]))
    assert out1['alpha'].item() == 1.0
    torch.testing.assert_close(task.cache.teacher, F.softmax(model(x1) / 3.0, dim=1))
    assert task.cache.index.tolist() == [4, 5, 6, 7]


def test_replay_mismatch_raises():
    task = DLBTwoForwardTask(_tiny(), verbose=False)
    (x0, y0), (x1, y1) = _half(0), _half(1)
    task(x0, y0, index=torch.arange(4))['loss'].backward()
    with pytest.raises(RuntimeError, match='replay mismatch'):
        task(torch.cat([x0, x1]), torch.cat([y0, y1]), index=torch.tensor([0, 1, 2, 9, 4, 5, 6, 7]))
    with pytest.raises(ValueError, match='index'):
        task(x1, y1)


def test_registry_applies_dlb_values_over_options():
    task = create_skd_task(_tiny(), 'dlb2', topk=2, alpha_mode='pwa', replay='tensors', verbose=False)
    assert isinstance(task, DLBTwoForwardTask) and task.replay == 'views'
    assert (task.temperature, task.topk, task.alpha_mode, task.fixed_alpha, task.weighting) == tuple(
        DLB_PRESET[k] for k in ('temperature', 'topk', 'alpha_mode', 'alpha', 'weighting'))
    assert task.tap_layers == []


def test_the_dlb_preset_logs_itself_as_dlb(caplog):
    import logging
    caplog.set_level(logging.INFO)
    create_skd_task(timm.create_model('test_resnet', num_classes=4), 'dlb')
    create_skd_task(timm.create_model('test_resnet', num_classes=4), 'sdpgo')
    assert [r.getMessage().split(':')[0] for r in caplog.records] == ['dlb (a preset of SDPGOTask)', 'SDPGOTask']
