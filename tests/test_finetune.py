"""Fine-tuning with --sdpgo (and --skd dlb / pskd) as timm users run it: pretrained weights from the Hugging Face
cache offline, through `hf-hub:` (the fake Hub of tests/fakehub.py) or a --pretrained-path file, a new head for
the user's classes, timm's fine-tuning options, and the one-line refusals where a run cannot go on.

The runs train the 3-class image folder of conftest (24 images) from 10-class weights. Most take their one epoch
as timm's warm-up from rate 0 (`--warmup-epochs 1 --warmup-lr 0`), so that the saved weights are the loaded ones.
"""
import logging
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import safetensors.torch
import torch

import timm
from timm.optim import param_groups_layer_decay
from sdpgo_timm import hub
from sdpgo_timm.pretrained import register_pretrained
from sdpgo_timm.runner.checkpoint import load_checkpoint_file
from sdpgo_timm.taps import layers_without_gradient
from conftest import FAST, FOLDER_CLASSES, run_train, summary
from fakehub import fake_hub, set_offline, use_cache  # noqa: F401 (fixture)
from test_hub import save_checkpoint, timm_registry, trained_model  # noqa: F401 (autouse fixture: tags stay here)

REPO = 'sdpgo/test-resnet-pretrained'
HEAD = ('fc.weight', 'fc.bias')
LR_ZERO_EPOCH = ['--epochs', '1', '--warmup-epochs', '1', '--warmup-lr', '0']  # timm's warm-up: the epoch at rate 0
METHODS = {'sdpgo': ['--sdpgo'], 'dlb': ['--skd', 'dlb'], 'pskd': ['--skd', 'pskd']}


def train_folder(image_folder: Path, output: Path, *argv: str) -> int:
    """train.py's exit status on the image folder (batches of 8), writing `output/run`."""
    return run_train([str(image_folder), *FAST, '-b', '8', *argv, '--output', str(output), '--experiment', 'run'])


def saved_weights(output: Path, key: str = 'state_dict') -> Dict[str, torch.Tensor]:
    return load_checkpoint_file(str(output / 'run' / 'last.pth.tar'))[key]


def assert_backbone_equal(weights: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> None:
    """Every tensor but the classifier's is the reference's (BatchNorm's running statistics aside: they follow the
    data even at rate 0)."""
    names = [k for k in reference if k not in HEAD and 'running_' not in k and 'num_batches' not in k]
    different = [k for k in names if not torch.equal(weights[k], reference[k])]
    assert names and not different, different[:3]


@pytest.fixture
def info_lines(caplog) -> Callable[[], List[str]]:
    """The INFO messages logged so far."""
    caplog.set_level(logging.INFO)
    return lambda: [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]


@pytest.fixture
def pushed(fake_hub, tmp_path):  # noqa: F811
    """A 10-class test_resnet pushed to the fake Hub as REPO and loaded once (so it is in the local cache)."""
    model = trained_model(0)
    hub.push_checkpoint(model, REPO)
    timm.create_model(f'hf-hub:{REPO}', pretrained=True)
    return model


@pytest.mark.parametrize('method', METHODS)
def test_hub_weights_offline_train_with_a_new_head(method, pushed, fake_hub, image_folder, tmp_path, monkeypatch,
                                                   info_lines):  # noqa: F811
    """--model hf-hub:… --pretrained from the cache with HF_HUB_OFFLINE=1: no request; timm gives the 3 classes a new
    head (said in one line), which --head-init-scale / --head-init-bias set; the backbone is the pushed one."""
    set_offline(monkeypatch)
    seen = len(fake_hub.requests)
    assert train_folder(image_folder, tmp_path, '--model', f'hf-hub:{REPO}', '--pretrained', *METHODS[method],
                        *LR_ZERO_EPOCH, '--head-init-scale', '0', '--head-init-bias', '0.25') == 0
    assert len(fake_hub.requests) == seen and float(summary(tmp_path / 'run')[0]['lr']) == 0  # the warm-up epoch
    assert 'pretrained weights of 10 classes: new 3-class head (fc) initialised' in info_lines()
    weights = saved_weights(tmp_path)
    assert_backbone_equal(weights, pushed.state_dict())
    assert weights['fc.weight'].shape[0] == len(FOLDER_CLASSES) and not weights['fc.weight'].any()
    assert torch.equal(weights['fc.bias'], torch.full((len(FOLDER_CLASSES),), 0.25))


def test_registered_tag_offline_trains_from_the_cache(pushed, fake_hub, image_folder, tmp_path,
                                                     monkeypatch):  # noqa: F811
    """--model arch.tag --pretrained (a tag sdpgo_timm registered, its weights on the Hub and cached) offline."""
    register_pretrained('test_resnet', 'sdpgo_ft', hf_hub_id=REPO, num_classes=10)
    set_offline(monkeypatch)
    seen = len(fake_hub.requests)
    assert train_folder(image_folder, tmp_path, '--model', 'test_resnet.sdpgo_ft', '--pretrained', '--sdpgo',
                        *LR_ZERO_EPOCH) == 0
    assert len(fake_hub.requests) == seen
    assert_backbone_equal(saved_weights(tmp_path), pushed.state_dict())


@pytest.mark.parametrize('model,repo', [(f'hf-hub:{REPO}', REPO), ('test_resnet', 'timm/test_resnet.r160_in1k')])
def test_pretrained_not_cached_offline_is_one_line_naming_cache_and_fetch(
        model, repo, fake_hub, image_folder, tmp_path, monkeypatch, error_lines):  # noqa: F811
    """--pretrained of a Hub model or a timm tag whose files are not cached, offline: one line saying which
    repository is missing, the cache folder it would be in, and the command that fetches it; nothing sent."""
    cache = tmp_path / 'empty_cache'
    use_cache(monkeypatch, cache)
    set_offline(monkeypatch)
    assert train_folder(image_folder, tmp_path / 'out', '--model', model, '--pretrained', '--sdpgo') == 2
    error, = error_lines()
    assert '\n' not in error and f"'{repo}'" in error and 'HF_HUB_OFFLINE' in error
    assert str(cache / f"models--{repo.replace('/', '--')}") in error
    assert f"timm.create_model('{model}', pretrained=True)" in error
    assert fake_hub.requests == [] and not (tmp_path / 'out').exists()


def _weights_files(tmp_path: Path) -> Dict[str, Path]:
    """The same 10-class weights as a .safetensors file and as a train.py checkpoint."""
    checkpoint, model = save_checkpoint(tmp_path / 'pretrain')
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / 'weights.safetensors'))
    return {'safetensors': tmp_path / 'weights.safetensors', 'checkpoint': checkpoint}


@pytest.mark.parametrize('kind', ['safetensors', 'checkpoint'])
def test_pretrained_path_loads_the_file_with_a_new_head(kind, image_folder, tmp_path, monkeypatch, info_lines):
    """--pretrained --pretrained-path FILE: the file's backbone and a new head, as timm's train.py (offline: the
    file is all it reads)."""
    set_offline(monkeypatch)
    path = _weights_files(tmp_path)[kind]
    assert train_folder(image_folder, tmp_path, '--model', 'test_resnet', '--pretrained', '--pretrained-path',
                        str(path), '--sdpgo', *LR_ZERO_EPOCH) == 0
    assert f"--pretrained-path weights ('{path}'): new 3-class head (fc) initialised" in info_lines()
    weights = saved_weights(tmp_path)
    assert_backbone_equal(weights, trained_model(0).state_dict())
    assert weights['fc.weight'].shape[0] == len(FOLDER_CLASSES)


def _bad_pretrained_paths(tmp_path: Path) -> Dict[str, tuple]:
    text = tmp_path / 'notes.txt'
    text.write_text('not weights')
    other = tmp_path / 'resnet10t.pth'
    torch.save(timm.create_model('resnet10t', num_classes=10).state_dict(), other)
    good = _weights_files(tmp_path)['safetensors']
    return {
        'missing file': (['--pretrained', '--pretrained-path', str(tmp_path / 'none.pth')],
                         f"--pretrained-path: checkpoint '{tmp_path / 'none.pth'}' does not exist"),
        'unreadable file': (['--pretrained', '--pretrained-path', str(text)],
                            f"--pretrained-path: '{text}' is not a timm training checkpoint"),
        'another architecture': (['--pretrained', '--pretrained-path', str(other)],
                                 f"--pretrained-path '{other}' do not fit --model 'test_resnet': "),
        'without --pretrained': (['--pretrained-path', str(good)], 'is loaded only with --pretrained'),
        'with a Hub model': (['--model', f'hf-hub:{REPO}', '--pretrained', '--pretrained-path', str(good)],
                             "timm would load the hf-hub: weights and ignore the file"),
    }


@pytest.mark.parametrize('case', ['missing file', 'unreadable file', 'another architecture', 'without --pretrained',
                                  'with a Hub model'])
def test_pretrained_path_refusals_are_one_line_before_training(case, image_folder, tmp_path, monkeypatch,
                                                               error_lines):
    set_offline(monkeypatch)
    argv, message = _bad_pretrained_paths(tmp_path)[case]
    assert train_folder(image_folder, tmp_path / 'out', '--model', 'test_resnet', *argv, '--sdpgo') == 2
    error, = error_lines()
    assert '\n' not in error and message in error, error
    assert not (tmp_path / 'out').exists()


def test_initial_checkpoint_with_another_head_is_refused_naming_pretrained_path(image_folder, tmp_path,
                                                                                error_lines):
    """--initial-checkpoint loads every weight as it is (timm's strict load): a 10-class checkpoint for 3 classes
    is refused in one line that names --pretrained-path, timm's way to fine-tune it with a new head."""
    checkpoint = _weights_files(tmp_path)['checkpoint']
    assert train_folder(image_folder, tmp_path / 'out', '--model', 'test_resnet', '--initial-checkpoint',
                        str(checkpoint), '--sdpgo') == 2
    error, = error_lines()
    assert error == (f"error: --initial-checkpoint '{checkpoint}' has a 10-class head (fc) and the model 3 classes: "
                     "--initial-checkpoint loads every weight as it is; to start from its backbone with a new head "
                     f"pass --pretrained --pretrained-path {checkpoint}")
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('method', METHODS)
def test_layer_decay_freezing_and_ema(method, image_folder, tmp_path):
    """--layer-decay gives timm's per-group lr scales; --layer-decay-no-opt-scale freezes the groups below it at the
    pretrained weights (in the EMA too); with --sdpgo the taps on layer3 and layer4 still see every step's
    gradient."""
    path = _weights_files(tmp_path)['safetensors']
    assert train_folder(image_folder, tmp_path, '--model', 'test_resnet', '--pretrained', '--pretrained-path',
                        str(path), *METHODS[method], '--epochs', '1', '--lr', '0.05', '--layer-decay', '0.5',
                        '--layer-decay-no-opt-scale', '0.2', '--model-ema', '--model-ema-decay', '0.5') == 0
    checkpoint = load_checkpoint_file(str(tmp_path / 'run' / 'last.pth.tar'))
    reference = timm.create_model('test_resnet', num_classes=len(FOLDER_CLASSES))
    groups = param_groups_layer_decay(reference, weight_decay=2e-5, layer_decay=0.5, no_opt_scale=0.2)
    saved = checkpoint['optimizer']['param_groups']
    assert [(g['lr_scale'], g['weight_decay'], len(g['params'])) for g in saved] == [
        (g['lr_scale'], g['weight_decay'], len(g['params'])) for g in groups]
    assert min(g['lr_scale'] for g in saved) == 0.25  # stem, layer1, layer2 (1/32 .. 1/8) are not optimized
    frozen = [n for n, p in reference.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(('conv1', 'bn1', 'layer1', 'layer2')) for n in frozen)
    pretrained = trained_model(0).state_dict()
    for key in ('state_dict', 'state_dict_ema'):
        assert all(torch.equal(checkpoint[key][n], pretrained[n]) for n in frozen), key
    trained = 'layer3.0.conv1.weight'
    assert not torch.equal(checkpoint['state_dict'][trained], pretrained[trained])
    assert not torch.equal(checkpoint['state_dict_ema'][trained], checkpoint['state_dict'][trained])  # an average
    if method == 'sdpgo':
        pwa = checkpoint['task_state']['pwa']
        steps = len(FOLDER_CLASSES) * 8 // 4  # 24 fresh images, 4 a step (half of each batch of 8 is replay)
        assert pwa['steps'] == steps and [int(layer['count']) for layer in pwa['layers']] == [steps, steps]


def test_taps_on_frozen_layers_are_refused_before_training(image_folder, tmp_path, error_lines):
    """Freezing layer3 too (its scale 1/4 < 0.3) cuts SDPGO's default tap there off from every gradient."""
    assert train_folder(image_folder, tmp_path / 'out', '--model', 'test_resnet', '--sdpgo', '--layer-decay', '0.5',
                        '--layer-decay-no-opt-scale', '0.3') == 2
    error, = error_lines()
    assert error.startswith('error: --sdpgo-layers (default: layer3 layer4): no gradient reaches layer3, frozen with '
                            'every layer before it by --layer-decay-no-opt-scale 0.3')
    assert not (tmp_path / 'out').exists()


def test_layers_without_gradient_follow_what_is_frozen():
    model = timm.create_model('test_resnet', num_classes=3)
    assert layers_without_gradient(model, ['layer2', 'layer4'], (3, 16, 16)) == []
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith(('conv1', 'bn1', 'layer1', 'layer2'))
    assert layers_without_gradient(model, ['layer2', 'layer3', 'layer4'], (3, 16, 16)) == ['layer2']
    assert model.training
