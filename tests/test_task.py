"""SDPGOTask end to end on small inputs: architectures, replay, state, options."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from sdpgo_timm import DLB_PRESET, SDPGOTask, create_model_and_task, create_skd_task, half_batch_size
from sdpgo_timm.sil import per_sample_kl
from pwa_reference import PWAReference

ARCHS = [
    ('resnet50', {}, 32),
    ('deit_tiny_patch16_224', dict(img_size=32), 32),
    ('deit_small_patch16_224', dict(img_size=32), 32),
    ('swin_tiny_patch4_window7_224', dict(img_size=32, window_size=2), 32),
    ('swin_small_patch4_window7_224', dict(img_size=32, window_size=2), 32),
]


def _tiny(name='resnet18', num_classes=5, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=num_classes, **kwargs)


def _steps(task, batches, opt=None, **kwargs):
    outs = []
    for x, y in batches:
        out = task(x, y, **kwargs)
        out['loss'].backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        outs.append(out)
    return outs


def _batches(n=3, half=4, size=32, num_classes=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(half, 3, size, size, generator=g), torch.randint(0, num_classes, (half,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize('name,kwargs,size', ARCHS, ids=[a[0] for a in ARCHS])
def test_named_architectures_train(name, kwargs, size):
    model = _tiny(name, **kwargs)
    task = SDPGOTask(model, verbose=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    outs = _steps(task, _batches(3, half=2, size=size), opt)
    for out in outs:
        assert torch.isfinite(out['loss'])
    for out in outs[1:]:
        assert out['output'].shape == (4, 5)
    assert len(task.cache) == 2 and task.cache.teacher.shape == (2, 5) and task.cache.input.shape[0] == 2
    # PWA ranks the samples: their z-scores differ, so their alphas do (no gradient would give sigmoid(0) for all)
    assert task.cache.alpha.shape == (2,) and task.cache.alpha.std() > 0


def test_first_step_equals_plain_ce():
    model = _tiny()
    x, y = _batches(1)[0]
    out = SDPGOTask(model, verbose=False)(x, y)
    torch.testing.assert_close(out['loss'], F.cross_entropy(model(x), y))
    assert out['alpha'].item() == 0.0 and out['loss_sil'].item() == 0.0


@pytest.mark.parametrize('replay', ['tensors', 'views'])
def test_first_step_has_the_full_batch_shape_and_the_gradient_of_plain_ce(replay):
    """With no teacher yet, the fresh half runs twice (its copy as a teacherless replay half)."""
    model = _tiny()
    ref = copy.deepcopy(model)
    shapes = []
    model.register_forward_pre_hook(lambda module, args: shapes.append(len(args[0])))
    task = SDPGOTask(model, replay=replay, verbose=False)
    (x0, y0), (x1, y1) = _batches(2)
    index0, index1 = torch.arange(4), torch.arange(4, 8)
    out0 = task(x0, y0, index0) if replay == 'views' else task(x0, y0)
    out0['loss'].backward()
    F.cross_entropy(ref(x0), y0).backward()
    torch.testing.assert_close(out0['loss'], F.cross_entropy(ref(x0), y0))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert len(task.cache) == 4 and task.cache.alpha is not None
    if replay == 'views':
        assert torch.equal(task.cache.index, index0)
        task(torch.cat([x0, x1]), torch.cat([y0, y1]), torch.cat([index0, index1]))
    else:
        task(x1, y1)
    assert shapes == [8, 8]


def test_tensors_mode_replays_cached_fresh_half():
    model = _tiny()
    model.eval()  # no BN batch coupling: logits of the replayed inputs are reproducible
    task = SDPGOTask(model, verbose=False)
    (x0, y0), (x1, y1) = _batches(2)
    out0 = task(x0, y0)
    out0['loss'].backward()
    out1 = task(x1, y1)
    torch.testing.assert_close(out1['target'], torch.cat([y0, y1]))
    torch.testing.assert_close(out1['output'][:4], model(x0))
    # the replay half's teacher is last step's fresh prediction
    torch.testing.assert_close(task.cache.teacher, F.softmax(out1['output'][4:].detach() / 3.0, 1))


def test_views_mode_checks_the_replay_half():
    model = _tiny()
    task = SDPGOTask(model, replay='views', verbose=False)
    (x0, y0), (x1, y1) = _batches(2)
    task(x0, y0, index=torch.arange(4))['loss'].backward()
    both_x, both_y = torch.cat([x0, x1]), torch.cat([y0, y1])
    task(both_x, both_y, index=torch.arange(8))['loss'].backward()  # [0..3] replayed, [4..7] fresh
    with pytest.raises(RuntimeError, match='replay mismatch'):
        task(both_x, both_y, index=torch.tensor([0, 1, 2, 3, 8, 9, 10, 11]))


def test_views_mode_needs_indices():
    task = SDPGOTask(_tiny(), replay='views', verbose=False)
    with pytest.raises(ValueError, match='index'):
        task(*_batches(1)[0])


def test_state_round_trip_gives_same_next_step_loss():
    model = _tiny()
    task = SDPGOTask(model, verbose=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    batches = _batches(4)
    _steps(task, batches[:3], opt)
    state = copy.deepcopy(task.get_task_state())
    weights = copy.deepcopy(model.state_dict())

    model2 = _tiny()
    model2.load_state_dict(weights)
    task2 = SDPGOTask(model2, verbose=False)
    task2.load_task_state(state)
    a, b = task(*batches[3]), task2(*batches[3])
    torch.testing.assert_close(a['loss'], b['loss'], rtol=0, atol=0)
    a['loss'].backward()
    b['loss'].backward()
    torch.testing.assert_close(task.cache.alpha, task2.cache.alpha)


def test_state_of_other_replay_mode_is_rejected():
    task = SDPGOTask(_tiny(), verbose=False)
    _steps(task, _batches(1))
    with pytest.raises(ValueError, match='sdpgo-replay'):
        SDPGOTask(_tiny(), replay='views', verbose=False).load_task_state(task.get_task_state())


@pytest.mark.parametrize('scale', [1024.0, 0.5], ids=['amp', 'grad_accumulation'])
def test_loss_scale_is_undone_for_pwa(scale):
    """AMP loss scaling (1024) and gradient accumulation (0.5: the loss divided by the steps) must not change α:
    the same steps with a backward of scale·loss give every step the α of the unscaled loss."""
    alphas = []
    for loss_scale in (1.0, scale):
        task = SDPGOTask(_tiny(), verbose=False)
        for x, y in _batches(4):
            out = task(x, y, loss_scale=loss_scale)
            (out['loss'] * loss_scale).backward()
            alphas.append(task.cache.alpha)
    torch.testing.assert_close(alphas[4:], alphas[:4], rtol=1e-4, atol=1e-5)


def test_bf16_autocast():
    """Under bfloat16 autocast PWA's α is the one its pure functions give for the bfloat16 features and gradients,
    and each replay half is weighed by the α its fresh half got one step earlier."""
    model = _tiny()
    task = SDPGOTask(model, verbose=False)
    reference = PWAReference(task, model)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs = [task(x, y) for x, y in _batches(1)]
    outs[0]['loss'].backward()
    alpha = reference.step()
    for x, y in _batches(2, seed=2):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = task(x, y)
        out['loss'].backward()
        assert torch.isfinite(out['loss'])
        torch.testing.assert_close(out['alpha'], alpha.mean(), rtol=1e-5, atol=0)
        alpha = reference.step()
        torch.testing.assert_close(task.cache.alpha, alpha, rtol=1e-5, atol=0)
    assert task.cache.teacher.dtype == torch.float32


def test_channels_last_matches_contiguous():
    results = []
    for channels_last in (False, True):
        model = _tiny()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        task = SDPGOTask(model, verbose=False)
        for x, y in _batches(3):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            task(x, y)['loss'].backward()
        results.append(task.cache.alpha)
    torch.testing.assert_close(results[0], results[1], rtol=1e-3, atol=1e-4)


def test_gradient_checkpointing_still_delivers_gradients():
    """The taps record the forward, not its recomputation in backward: every step's α is the one without
    checkpointing."""
    alphas = []
    for checkpointing in (False, True):
        model = _tiny('deit_tiny_patch16_224', img_size=32)
        model.set_grad_checkpointing(checkpointing)
        task = SDPGOTask(model, verbose=False)
        alphas.append([o['alpha'] for o in _steps(task, _batches(3, half=2))] + [task.cache.alpha])
    torch.testing.assert_close(alphas[1], alphas[0], rtol=1e-4, atol=1e-5)


def test_compiled_model_still_delivers_gradients():
    """Compiled between the taps, the model still gives PWA each tap's features and gradients: every step's α is
    the one PWA's pure functions give for them."""
    model = _tiny()
    task = SDPGOTask(model, verbose=False)
    reference = PWAReference(task, model)
    task.compile(backend='aot_eager')
    for x, y in _batches(3):
        task(x, y)['loss'].backward()
        torch.testing.assert_close(task.cache.alpha, reference.step(), rtol=1e-5, atol=0)


def test_fixed_alpha_mode_needs_no_taps():
    task = SDPGOTask(_tiny(), alpha_mode='fixed', alpha=0.3, verbose=False)
    outs = _steps(task, _batches(2))
    assert task.tap_layers == [] and outs[1]['alpha'].item() == pytest.approx(0.3)


def test_alpha_warmup_ramps_the_replay_alpha_and_survives_a_resume():
    task = SDPGOTask(_tiny(), alpha_mode='fixed', alpha=0.6, alpha_warmup=4, verbose=False)
    outs = _steps(task, _batches(6))
    # step 0 has no teacher; steps 1..5 have one, their alpha scaled by 1/4, 2/4, 3/4, 1, 1
    assert [round(o['alpha'].item(), 4) for o in outs] == [0.0, 0.15, 0.3, 0.45, 0.6, 0.6]
    again = SDPGOTask(_tiny(), alpha_mode='fixed', alpha=0.6, alpha_warmup=4, verbose=False)
    _steps(again, _batches(2))
    state = again.get_task_state()
    resumed = SDPGOTask(_tiny(), alpha_mode='fixed', alpha=0.6, alpha_warmup=4, verbose=False)
    resumed.load_task_state(state)
    assert [round(o['alpha'].item(), 4) for o in _steps(resumed, _batches(2, seed=3))] == [0.3, 0.45]


def test_dlb_preset_is_ce_plus_full_kl():
    model = _tiny()
    model.eval()
    task = create_skd_task(model, 'dlb', verbose=False)
    (x0, y0), (x1, y1) = _batches(2)
    task(x0, y0)['loss'].backward()
    teacher = task.cache.teacher
    out = task(x1, y1)
    logits = out['output']
    ce = F.cross_entropy(logits, torch.cat([y0, y1]), reduction='none')
    kl = per_sample_kl(teacher, logits[:4], 3.0)
    torch.testing.assert_close(out['loss'], torch.cat([ce[:4] + 9.0 * kl, ce[4:]]).mean())
    assert DLB_PRESET['topk'] == -1 and out['alpha'].item() == 1.0


def test_create_model_returns_model_and_task():
    model, task = create_model_and_task('resnet18', num_classes=4, sdpgo_topk=1, sdpgo_temperature=2.0)
    assert isinstance(task, SDPGOTask) and task.topk == 1 and task.temperature == 2.0
    assert task.get_eval_model() is model
    plain_model, plain_task = create_model_and_task('resnet18', num_classes=4, sdpgo=False)
    assert type(plain_task).__name__ == 'ClassificationTask'
    _, dlb = create_model_and_task('resnet18', num_classes=4, skd='dlb')
    assert dlb.weighting == 'additive' and dlb.alpha_mode == 'fixed'


def test_checkpoint_state_is_the_plain_timm_model():
    model = _tiny()
    task = SDPGOTask(model, verbose=False)
    _steps(task, _batches(1))
    state = task.get_checkpoint_state()
    assert set(state['state_dict']) == set(model.state_dict())
    assert 'pwa' in state['task_state'] and state['task_state']['cache'] is not None


@pytest.mark.parametrize('kwargs,match', [
    (dict(temperature=0), 'temperature'),
    (dict(beta=1.0), 'beta'),
    (dict(topk=5), 'topk'),
    (dict(layers=['nope']), "unknown layer 'nope'"),
    (dict(alpha_mode='magic'), "alpha_mode must be one of \\('pwa', 'fixed'\\)"),
    (dict(weighting='mul'), 'weighting must be one of'),
    (dict(replay='disk'), 'replay must be one of'),
    (dict(alpha_min=0.6, alpha_max=0.4), 'alpha_min'),
    (dict(alpha_warmup=-1), 'alpha_warmup must be >= 0'),
])
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SDPGOTask(_tiny(), verbose=False, **kwargs)


@pytest.mark.parametrize('bad', [0, 1, 7])
def test_batch_size_must_halve(bad):
    with pytest.raises(ValueError, match='--batch-size must be even'):
        half_batch_size(bad)
    assert half_batch_size(8) == 4
