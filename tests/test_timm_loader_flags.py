"""timm's model, optimizer and loader flags of train.py: epoch length, scheduled resolutions and batch sizes, the
multi-epochs loader, layer decay scales, model dtype, TorchScript, saved input images, TTA, and their refusals."""
import copy
import math
import sys
from collections import Counter

import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import IterableDataset
from timm.data import resolve_data_config
from timm.data.loader import MultiEpochsDataLoader
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.task import ClassificationTask
from timm.utils import random_seed

from sdpgo_timm.data import DigitsDataset
from sdpgo_timm.protocol import as_batch
from sdpgo_timm.runner import setup
from sdpgo_timm.runner.args import parse_args
from sdpgo_timm.runner.batches import batch_loss_scale, policy_batch_size
from sdpgo_timm.runner.builders import create_train_loader
from sdpgo_timm.runner.engine import LoopOptions, train_one_epoch, validate
from sdpgo_timm.runner.errors import ConfigError
from sdpgo_timm.runner.recovery import inner_data_loader
from conftest import FAST, run_train, summary

CPU = torch.device('cpu')
VALIDATION = 359  # digits validation images: the small dataset the loader tests draw from
SKD = {None: [], 'views': ['--sdpgo'], 'indexed': ['--skd', 'pskd']}


def _args(argv):
    args, _ = parse_args(['digits', *FAST, *argv])
    args.world_size, args.rank, args.distributed = 1, 0, False
    return args


def _loader(argv, feed=None):
    """train.py's training loader (through create_train_loader) over the digits validation split."""
    args = _args([*argv, *SKD[feed]])
    data_config = resolve_data_config(vars(args), model=timm.create_model('test_resnet', num_classes=10))
    return args, create_train_loader(args, DigitsDataset('validation'), data_config, CPU, feed)


@pytest.mark.parametrize('feed, fresh', [(None, 32), ('indexed', 32), ('views', 16)])
def test_epoch_repeats_and_batches_per_epoch_set_the_steps_per_epoch(feed, fresh):
    """--epoch-repeats 2: two passes a train epoch, the second in a new order; --train-batches-per-epoch N: N
    batches; plain, PS-KD's indexed and SDPGO's views loaders alike."""
    assert len(_loader(['-b', '32'], feed)[1]) == VALIDATION // fresh
    _, loader = _loader(['-b', '32', '--epoch-repeats', '2'], feed)
    batches = [as_batch(b) for b in loader]
    assert len(loader) == len(batches) == 2 * (VALIDATION // fresh)
    assert all(len(b.input) == 32 for b in batches[1:]) and len(batches[0].input) == fresh
    if feed is not None:
        drawn = torch.cat([b.index[b.fresh_start or 0:] for b in batches]).tolist()
        assert set(drawn) == set(range(VALIDATION)) and max(Counter(drawn).values()) == 2
        assert drawn[VALIDATION:2 * VALIDATION - fresh] != drawn[:VALIDATION - fresh]  # each pass is shuffled anew
    _, loader = _loader(['-b', '32', '--train-steps-per-epoch', '5'], feed)
    assert len(loader) == len(list(loader)) == 5


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(DigitsDataset('validation'))


@pytest.mark.parametrize('flag', [['--train-batches-per-epoch', '5'], ['--train-img-sizes', '16']])
def test_fixed_or_scheduled_batches_need_an_indexable_dataset(flag):
    args = _args(flag)
    data_config = resolve_data_config(vars(args), model=timm.create_model('test_resnet', num_classes=10))
    with pytest.raises(ValueError, match=f'{flag[0]} draws batches from an indexable dataset, but this one streams'):
        create_train_loader(args, _Stream(), data_config, CPU, None)


def test_epoch_repeats_and_batches_per_epoch_set_train_py_steps(tmp_path):
    assert run_train(['digits', '--epochs', '1', *FAST, '--epoch-repeats', '0.5', '--output', str(tmp_path),
                      '--experiment', 'half']) == 0
    assert int(summary(tmp_path / 'half')[0]['train_steps']) == int(1438 * 0.5 / 64)
    assert run_train(['digits', '--sdpgo', '--epochs', '1', *FAST, '--train-batches-per-epoch', '4',
                      '--output', str(tmp_path), '--experiment', 'sdpgo']) == 0
    row, = summary(tmp_path / 'sdpgo')
    assert int(row['train_steps']) == 4 and int(row['train_samples']) == 4 * 32


@pytest.mark.parametrize('feed', [None, 'indexed'])
def test_train_img_sizes_give_batches_of_those_sizes(feed):
    """Scheduled resolutions with their own batch sizes (plain and PS-KD); the learning rate scales with the
    policy-average batch, as timm's does."""
    args, loader = _loader(['--train-img-sizes', '16', '24', '--train-batch-sizes', '8', '4'], feed)
    shapes = Counter(tuple(as_batch(b).input.shape) for b in loader)
    assert set(shapes) == {(8, 3, 16, 16), (4, 3, 24, 24)}
    assert sum(n * shape[0] for shape, n in shapes.items()) > VALIDATION - 8  # one pass over the data
    assert policy_batch_size(args) == 6
    args.lr = None
    setup.resolve_lr(args)
    assert args.lr == pytest.approx(args.lr_base * 6 / args.lr_base_size)


def test_progressive_size_schedule_moves_to_the_last_size_by_the_last_epoch():
    _, loader = _loader(['--train-img-sizes', '16', '24', '--train-size-schedule', 'progressive', '--epochs', '3',
                         '--train-size-schedule-spread', '0', '--train-size-random-mix', '0', '-b', '32'])
    sizes = []
    for epoch in (0, 2):
        loader.set_epoch(epoch)
        sizes.append({as_batch(b).input.shape[-1] for b in loader})
    assert sizes == [{16}, {24}]


def test_scheduled_loader_resumes_mid_epoch_after_a_repeated_pass():
    """A scheduled epoch of two passes stopped in its second pass continues with the same batches (workers 0:
    augmentations included): the second pass's order does not depend on when it was drawn."""
    argv = ['-b', '32', '--train-img-sizes', '16', '24', '--epoch-repeats', '2']

    def epoch(loader, state=None, stop=-1):
        random_seed(43, 0)  # some RNG state as the epoch begins (a resumed loader restores the stopped one's)
        loader.set_epoch(1)
        if state is not None:
            loader.load_state_dict(state)
        batches, saved = [], None
        for input, target in loader:
            batches.append((input, target))
            if loader.consumed == stop:
                saved = loader.state_dict()
        return batches, saved

    straight, state = epoch(_loader(argv)[1], stop=15)
    resumed, _ = epoch(_loader(argv)[1], state=state)
    assert len(straight) == 22 and len(resumed) == 22 - 15
    for (a, ta), (b, tb) in zip(straight[15:], resumed):
        assert torch.equal(a, b) and torch.equal(ta, tb)


def test_multi_epochs_loader_runs_on_across_epochs_without_mid_epoch_resume():
    _, loader = _loader(['-b', '32', '--use-multi-epochs-loader'])
    assert isinstance(inner_data_loader(loader.loader), MultiEpochsDataLoader)
    assert not loader.resumable and '--use-multi-epochs-loader' in loader.not_resumable
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        assert len(list(loader)) == len(loader) == VALIDATION // 32


def test_variable_batch_loss_scale_weighs_each_batch_gradient():
    args = _args(['--train-img-sizes', '16', '24', '--train-batch-sizes', '8', '4'])
    assert batch_loss_scale(args) is None  # 'none'
    args.variable_batch_loss_scale = 'linear'
    assert batch_loss_scale(args)(torch.zeros(8, 3, 16, 16)) == pytest.approx(8 / 6)
    args.variable_batch_loss_scale = 'sqrt'
    assert batch_loss_scale(args)(torch.zeros(4, 3, 24, 24)) == pytest.approx(math.sqrt(4 / 6))

    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=4)
    batches = [(torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,)))]

    def update(scale):
        trained = copy.deepcopy(model)
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
        train_one_epoch(0, ClassificationTask(trained, nn.CrossEntropyLoss(), verbose=False), batches, optimizer,
                        LoopOptions(device=CPU, batch_loss_scale=scale, log_enabled=False))
        return torch.cat([(a - b).flatten() for a, b in zip(trained.parameters(), model.parameters())])

    torch.testing.assert_close(update(lambda input: len(input) / 3), 2 * update(None))


def test_layer_decay_min_scale_and_no_opt_scale_reach_the_param_groups():
    """timm's optimizer_kwargs(cfg=args) passes both on: scales are clamped at the minimum, and parameters whose
    scale is below --layer-decay-no-opt-scale are frozen and left out of the optimizer."""
    model = timm.create_model('test_resnet', num_classes=10)

    def groups(*argv):
        return create_optimizer_v2(model, **optimizer_kwargs(cfg=_args(['--layer-decay', '0.5', *argv]))).param_groups

    assert min(g['lr_scale'] for g in groups()) == 0.5 ** 5
    assert min(g['lr_scale'] for g in groups('--layer-decay-min-scale', '0.2')) == 0.2
    kept = groups('--layer-decay-no-opt-scale', '0.2')
    assert min(g['lr_scale'] for g in kept) == 0.25
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and sum(len(g['params']) for g in kept) == len(list(model.parameters())) - len(frozen)


@pytest.mark.parametrize('prefetcher', [True, False])
def test_model_dtype_bfloat16_trains_a_bfloat16_model(tmp_path, prefetcher):
    """Weights and inputs in bfloat16 (the inputs cast by timm's prefetcher, or by the loop without it). At 32 px:
    at 16, test_resnet's layer4 has a stride-2 convolution over a 1-pixel input, which is refused (see REFUSED)."""
    extra = [] if prefetcher else ['--no-prefetcher']
    assert run_train(['digits', '--epochs', '1', *FAST, '--input-size', '3', '32', '32', '--model-dtype', 'bfloat16',
                      '--train-batches-per-epoch', '3', *extra, '--output', str(tmp_path), '--experiment', 'bf16']) == 0
    row, = summary(tmp_path / 'bf16')
    assert math.isfinite(float(row['train_loss'])) and float(row['eval_top1']) >= 0
    from sdpgo_timm.runner.checkpoint import load_checkpoint_file
    weights = load_checkpoint_file(str(tmp_path / 'bf16' / 'last.pth.tar'))['state_dict']
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.bfloat16}


def test_torchscript_trains_a_scripted_model(tmp_path, monkeypatch):
    from sdpgo_timm.runner import session
    models = []
    real = session.create_train_task
    monkeypatch.setattr(session, 'create_train_task', lambda args, model, *a, **kw: models.append(model) or real(
        args, model, *a, **kw))
    assert run_train(['digits', '--epochs', '1', *FAST, '--torchscript', '--train-batches-per-epoch', '2',
                      '--output', str(tmp_path), '--experiment', 'ts']) == 0
    assert isinstance(models[0], torch.jit.ScriptModule)
    timm.create_model('test_resnet', num_classes=10, checkpoint_path=str(tmp_path / 'ts' / 'last.pth.tar'))


def test_save_images_writes_the_input_batch_of_each_logged_step(tmp_path):
    assert run_train(['digits', '--epochs', '1', *FAST, '-b', '16', '--save-images', '--log-interval', '2',
                      '--train-batches-per-epoch', '4', '--output', str(tmp_path), '--experiment', 'img']) == 0
    saved = sorted(p.name for p in (tmp_path / 'img').glob('train-batch-*.jpg'))
    assert saved == ['train-batch-0.jpg', 'train-batch-2.jpg', 'train-batch-3.jpg']  # every 2nd step and the last
    with Image.open(tmp_path / 'img' / 'train-batch-0.jpg') as image:
        assert image.size == (8 * 16, 2 * 16)  # 16 inputs of 16 px, 8 a row


def test_tta_averages_the_outputs_of_each_group_of_views():
    logits = torch.tensor([[4., 0.], [0., 2.], [0., 3.], [1., 0.], [5., 0.]])
    target = torch.tensor([0, 0, 1, 1, 0])
    metrics = validate(nn.Identity(), [(logits, target)], device=CPU, tta=2)
    averaged = torch.tensor([[2., 1.], [.5, 1.5]])  # the fifth row, a group short of 2 views, is dropped
    assert metrics['loss'] == pytest.approx(nn.functional.cross_entropy(averaged, torch.tensor([0, 1])).item())
    assert metrics['top1'] == 100.0
    assert validate(nn.Identity(), [(logits, target)], device=CPU)['top1'] == 60.0


def test_drop_connect_is_deprecated_and_ignored_as_in_timm(caplog):
    def rates(*argv):
        model = setup.create_timm_model(_args(list(argv)))
        return [m.drop_prob for name, m in model.named_modules() if name.endswith('drop_path')]

    assert rates('--drop-connect', '0.2') == rates()  # timm's train.py passes it on no more
    assert '--drop-connect 0.2 is deprecated and ignored' in caplog.text
    assert max(rates('--drop-connect', '0.2', '--drop-path', '0.1')) == pytest.approx(0.1)


def test_fuser_and_device_modules_are_set_up_before_the_model_and_device(tmp_path, monkeypatch):
    fusers = []
    monkeypatch.setattr(setup, 'set_jit_fuser', fusers.append)
    setup.create_timm_model(_args(['--fuser', 'te']))
    assert fusers == ['te']

    (tmp_path / 'my_backend.py').write_text('REGISTERED = True\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, 'my_backend', raising=False)
    setup.init_device(_args(['--device-modules', 'my_backend', '--device', 'cpu']))
    assert sys.modules['my_backend'].REGISTERED
    with pytest.raises(ConfigError, match='--device-modules no_such_backend: cannot import it'):
        setup.init_device(_args(['--device-modules', 'no_such_backend', '--device', 'cpu']))


REFUSED = {
    'sizes with sdpgo': (['--sdpgo', '--train-img-sizes', '16', '24'], '--train-img-sizes does not combine with --sdpgo'),
    'sizes with dlb tensors': (['--skd', 'dlb', '--sdpgo-replay', 'tensors', '--train-img-sizes', '16'],
                               '--train-img-sizes does not combine with --skd dlb'),
    'multi-epochs with views': (['--sdpgo', '--use-multi-epochs-loader'], 'does not combine with views replay'),
    'multi-epochs with recovery': (['--use-multi-epochs-loader', '--recovery-interval', '5'],
                                   'drop --recovery-interval or --use-multi-epochs-loader'),
    'multi-epochs with sizes': (['--use-multi-epochs-loader', '--train-img-sizes', '16'],
                                'MultiEpochsDataLoader is not supported with scheduled input sizes'),
    'batch sizes without sizes': (['--train-batch-sizes', '8'], 'add --train-img-sizes'),
    'batch sizes per size': (['--train-img-sizes', '16', '24', '--train-batch-sizes', '8'], 'give one per image size'),
    'torchscript with torchcompile': (['--torchscript', '--torchcompile'], 'pick one'),
    'torchscript with sync-bn': (['--torchscript', '--sync-bn'], 'does not combine with --sync-bn'),
    'torchscript with pwa': (['--torchscript', '--sdpgo'], 'add --sdpgo-alpha-mode fixed'),
    'model dtype with amp': (['--model-dtype', 'bfloat16', '--amp'], 'AMP needs float32 weights'),
    # 16 px: test_resnet's layer4.0.conv1 (3x3, stride 2, padding 1) sees a 1-pixel input, whose bfloat16 weight
    # gradient oneDNN gets wrong (tests/test_cpu_bfloat16.py)
    'bfloat16 weights, conv stride over its input': (['--model-dtype', 'bfloat16'], 'layer4.0.conv1 (stride 2, input 1 '
                                                                                     'wide) at input size 16'),
    'bfloat16 autocast, conv stride over its input': (['--amp', '--amp-dtype', 'bfloat16'], 'layer4.0.conv1 (stride 2'),
    'bfloat16 scheduled size, conv stride over its input': (
        ['--model-dtype', 'bfloat16', '--input-size', '3', '32', '32', '--train-img-sizes', '32', '16'],
        'at input size 16'),
    'missing device module': (['--device-modules', 'no_such_backend'], 'cannot import it'),
}


@pytest.mark.parametrize('case', list(REFUSED))
def test_conflicting_flags_stop_with_one_line(case, tmp_path, error_lines):
    argv, message = REFUSED[case]
    assert run_train(['digits', '--epochs', '1', *FAST, *argv, '--output', str(tmp_path / 'out')]) == 2
    errors = error_lines()
    assert len(errors) == 1 and '\n' not in errors[0] and message in errors[0], errors
    assert not (tmp_path / 'out').exists()
