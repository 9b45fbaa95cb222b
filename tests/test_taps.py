"""Feature taps: layouts, layer resolution, and gradients read during the normal backward."""
import gc
import weakref

import pytest
import timm
import torch

from sdpgo_timm import SDPGOTask
from sdpgo_timm import task as task_module
from sdpgo_timm.sil import per_sample_cross_entropy
from sdpgo_timm.taps import default_tap_layers, resolve_tap_layers, to_bsc


def test_to_bsc_nchw():
    x = torch.arange(2 * 3 * 2 * 2.).view(2, 3, 2, 2)
    out = to_bsc(x, 3)
    assert out.shape == (2, 4, 3)
    assert torch.equal(out[1, 2], x[1, :, 1, 0])


def test_to_bsc_nhwc():
    x = torch.arange(2 * 2 * 2 * 3.).view(2, 2, 2, 3)
    out = to_bsc(x, 3, nhwc=True)
    assert out.shape == (2, 4, 3)
    assert torch.equal(out[1, 3], x[1, 1, 1])


def test_to_bsc_nlc_drops_prefix_tokens():
    x = torch.arange(2 * 5 * 3.).view(2, 5, 3)
    out = to_bsc(x, 3, num_prefix_tokens=2)
    assert torch.equal(out, x[:, 2:])


def test_to_bsc_channels_last_tensor_is_read_as_nchw():
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(to_bsc(x.to(memory_format=torch.channels_last), 4), to_bsc(x, 4))


@pytest.mark.parametrize('name,kwargs,expected', [
    ('resnet18', {}, ['layer3', 'layer4']),
    ('swin_tiny_patch4_window7_224', dict(img_size=32, window_size=2), ['layers.2', 'layers.3']),
    ('deit_tiny_patch16_224', dict(img_size=32), ['blocks.9', 'blocks.10']),
    ('vit_tiny_patch16_224', dict(img_size=32, global_pool='avg'), ['blocks.10', 'blocks.11']),
])
def test_default_taps(name, kwargs, expected):
    assert default_tap_layers(timm.create_model(name, num_classes=3, **kwargs)) == expected


def test_unknown_layer_lists_valid_names():
    model = timm.create_model('resnet18', num_classes=3)
    with pytest.raises(ValueError, match=r"unknown layer 'layer9'.*layer4"):
        resolve_tap_layers(model, ['layer9'])


def _captured_vs_autograd(model, size, batch=4):
    """Run two SDPGO steps; return (hook gradients, autograd.grad of fresh-half CE) of step 2."""
    torch.manual_seed(0)
    task = SDPGOTask(model, verbose=False)
    x0, y0 = torch.randn(batch, 3, size, size), torch.randint(0, 5, (batch,))
    task(x0, y0)['loss'].backward()

    features, captured = [], []
    real_attach, real_scores = task_module.attach_grad_hooks, task.pwa.layer_scores
    task_module.attach_grad_hooks = lambda feats, cb: (features.extend(feats), real_attach(feats, cb))
    task.pwa.layer_scores = lambda i, f, g: (captured.append((i, g.clone())), real_scores(i, f, g))[1]
    try:
        x1, y1 = torch.randn(batch, 3, size, size), torch.randint(0, 5, (batch,))
        out = task(x1, y1)
        r = batch
        ce_fresh = per_sample_cross_entropy(out['output'][r:], y1).sum()
        reference = torch.autograd.grad(ce_fresh, features, retain_graph=True)
        out['loss'].backward()
    finally:
        task_module.attach_grad_hooks = real_attach
    hooks = dict(captured)
    chans = task._tap_channels
    return [(hooks[i], to_bsc(reference[i][r:], chans[i], task._num_prefix_tokens, task._nhwc))
            for i in range(len(features))]


@pytest.mark.parametrize('name,kwargs,size', [
    ('deit_tiny_patch16_224', dict(img_size=32, patch_size=8), 32),
    ('swin_tiny_patch4_window7_224', dict(img_size=32, window_size=2), 32),
])
def test_hook_gradient_equals_autograd_of_fresh_ce(name, kwargs, size):
    model = timm.create_model(name, num_classes=5, **kwargs)
    pairs = _captured_vs_autograd(model, size)
    assert len(pairs) == 2
    for hooked, reference in pairs:
        assert reference.abs().sum() > 0
        torch.testing.assert_close(hooked, reference, rtol=1e-4, atol=1e-6)


def test_step_leaves_no_tapped_feature_alive():
    """The gradient hook must not keep its feature (and the graph behind it) alive after backward."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=5)
    task = SDPGOTask(model, verbose=False)
    refs = []
    model.layer4.register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    for _ in range(2):
        task(x, y)['loss'].backward()
    gc.collect()
    assert task.cache.alpha is not None and [r() is None for r in refs] == [True, True]


@pytest.mark.parametrize('interrupt', [KeyboardInterrupt, RuntimeError('CUDA error')], ids=['Ctrl-C', 'error'])
def test_an_interrupt_inside_a_tapped_forward_is_raised_as_it_is(interrupt):
    """A second Ctrl-C (or any error) in the middle of the forward: the taps that did not run are not the error."""
    from sdpgo_timm.taps import TappedModel
    model = timm.create_model('test_resnet', num_classes=4)
    tapped = TappedModel(model, default_tap_layers(model))

    def stop(module, args):
        raise interrupt
    handle = model.layer1.register_forward_pre_hook(stop)  # before the tapped layers run
    with pytest.raises(interrupt if isinstance(interrupt, type) else type(interrupt)):
        tapped(torch.randn(2, 3, 16, 16))
    handle.remove()
    logits, features = tapped(torch.randn(2, 3, 16, 16))  # taps still work afterwards
    assert logits.shape == (2, 4) and len(features) == 2
