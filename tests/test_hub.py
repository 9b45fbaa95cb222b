""" sdpgo_timm.hub against a fake Hub on a local socket (tests/fakehub.py): no test reaches the network. """
import argparse
import csv
import json
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

import timm
from timm.models import _registry
from sdpgo_timm import hub
from sdpgo_timm import pretrained
from fakehub import FAKE_TOKEN, fake_hub, set_offline, use_cache, use_hub  # noqa: F401 (fixture)

ARCH = 'test_resnet'
REPO = 'sdpgo/test-resnet-cifar10'


@pytest.fixture(autouse=True)
def timm_registry(monkeypatch):
    """Keep tags registered by a test out of the other tests."""
    monkeypatch.setattr(_registry, '_model_pretrained_cfgs', dict(_registry._model_pretrained_cfgs))
    monkeypatch.setattr(_registry, '_model_has_pretrained', set(_registry._model_has_pretrained))
    with_tags = type(_registry._model_with_tags)(list, {k: list(v) for k, v in _registry._model_with_tags.items()})
    monkeypatch.setattr(_registry, '_model_with_tags', with_tags)
    monkeypatch.setattr(pretrained, '_REGISTERED', {})


def trained_model(seed: int) -> torch.nn.Module:
    """A 10-class test_resnet whose weights and BN statistics all differ from a fresh init."""
    torch.manual_seed(seed)
    model = timm.create_model(ARCH, num_classes=10)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if t.ndim == 1 else torch.randn_like(t) * 0.1)
    return model.eval()


def save_checkpoint(folder, seed=0, ema_seed=None, **arg_overrides):
    """A timm-style training checkpoint plus summary.csv beside it, as train.py writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    model = trained_model(seed)
    args = argparse.Namespace(
        model=ARCH, num_classes=10, dataset='torch/cifar10', img_size=64, input_size=None, in_chans=None,
        mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26], crop_pct=1.0, interpolation='bilinear', gp=None,
        model_kwargs={}, epochs=3, batch_size=64, lr=0.1, opt='sgd', weight_decay=5e-4, sched='cosine',
        sdpgo_topk=2, sdpgo_beta=0.9, sdpgo_weighting='complementary', skd='sdpgo', data_dir='/data/cifar',
    )
    vars(args).update(arg_overrides)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # momentum buffers: optimizer state that must stay off the Hub
    checkpoint = dict(
        epoch=2, arch=ARCH, state_dict=model.state_dict(), optimizer=optimizer.state_dict(), args=args,
        task_state={'pwa': {'lam': torch.ones(2)}, 'teacher': torch.rand(32, 10)}, version=2,
    )
    if ema_seed is not None:
        checkpoint['state_dict_ema'] = trained_model(ema_seed).state_dict()
    path = folder / 'last.pth.tar'
    torch.save(checkpoint, path)
    with (folder / 'summary.csv').open('w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr'])
        writer.writerows([[0, 2.1, 1.9, 50.0, 90.0, 0.1], [1, 1.2, 1.1, 71.25, 95.5, 0.05],
                          [2, 1.0, 1.2, 70.0, 96.0, 0.0]])
    return path, model


def assert_same_weights(model, reference):
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def assert_same_outputs(model, reference):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference.eval()(x))


def test_round_trip_gives_identical_weights_outputs_and_preprocessing(fake_hub, tmp_path):
    path, model = save_checkpoint(tmp_path / 'run')
    url = hub.push_checkpoint(path, REPO)

    assert url == f'{fake_hub.url}/{REPO}/commit/{fake_hub.repos[REPO].branches["main"]}'
    loaded = timm.create_model(f'hf-hub:{REPO}', pretrained=True)
    assert_same_weights(loaded, model)
    assert_same_outputs(loaded, model)
    cfg = loaded.pretrained_cfg
    assert cfg['num_classes'] == 10 and tuple(cfg['input_size']) == (3, 64, 64)
    assert tuple(cfg['mean']) == (0.49, 0.48, 0.45) and tuple(cfg['std']) == (0.25, 0.24, 0.26)
    assert cfg['crop_pct'] == 1.0 and cfg['interpolation'] == 'bilinear'


def test_pushed_repo_holds_only_weights_config_and_card_in_one_commit(fake_hub, tmp_path):
    path, model = save_checkpoint(tmp_path / 'run')
    hub.push_checkpoint(path, REPO, label_names=[f'class{i}' for i in range(10)])

    initial, push = fake_hub.history(REPO)
    assert push.changed == ('README.md', 'config.json', 'model.safetensors')
    files = fake_hub.files(REPO)
    assert set(files) == {'.gitattributes', 'README.md', 'config.json', 'model.safetensors'}
    tensors = safetensors.torch.load(files['model.safetensors'])  # safetensors: no pickle involved
    assert tensors.keys() == model.state_dict().keys()
    config = json.loads(files['config.json'])
    assert config['architecture'] == ARCH and config['num_classes'] == 10
    assert config['label_names'] == [f'class{i}' for i in range(10)]
    assert not {'optimizer', 'task_state', 'args'} & set(config)
    assert 'hf_hub_id' not in config['pretrained_cfg'] and config['pretrained_cfg']['tag'] is None


def test_model_card_front_matter_metrics_recipe_usage_citation(fake_hub, tmp_path):
    path, _ = save_checkpoint(tmp_path / 'run')
    hub.push_checkpoint(path, REPO, license='mit')

    card = fake_hub.files(REPO)['README.md'].decode()
    _, front, body = card.split('---\n', 2)
    meta = yaml.safe_load(front)
    assert meta['library_name'] == 'timm' and meta['license'] == 'mit'
    assert meta['tags'] == ['image-classification', 'timm', 'sdpgo'] and meta['datasets'] == ['cifar10']
    metrics = {m['name']: m['value'] for m in meta['model-index'][0]['results'][0]['metrics']}
    assert metrics == {'Top-1 accuracy': 71.25, 'Top-5 accuracy': 95.5}  # best top-1 epoch, not the last
    assert '| epochs trained | 3 |' in body and '| best epoch | 1 |' in body
    recipe = yaml.safe_load(body.split('```yaml\n')[1].split('```')[0])
    assert recipe['opt'] == 'sgd' and recipe['sdpgo_topk'] == 2 and recipe['skd'] == 'sdpgo'
    assert 'data_dir' not in recipe
    assert f"timm.create_model('hf-hub:{REPO}', pretrained=True)" in body
    assert hub.PAPER_TITLE in body and 'Su, Tongtong and Liao, Yun and Zheng, Fengbo' in body


def test_second_push_is_a_new_commit_serving_new_weights(fake_hub, tmp_path):
    first, _ = save_checkpoint(tmp_path / 'a', seed=0)
    second, newer = save_checkpoint(tmp_path / 'b', seed=1)
    hub.push_checkpoint(first, REPO)
    timm.create_model(f'hf-hub:{REPO}', pretrained=True)  # cached now
    url = hub.push_checkpoint(second, REPO, commit_message='Epoch 300 weights')

    commits = fake_hub.history(REPO)
    assert len(commits) == 3 and commits[-1].message == 'Epoch 300 weights' and url.endswith(commits[-1].sha)
    assert_same_weights(timm.create_model(f'hf-hub:{REPO}', pretrained=True), newer)

    assert hub.push_checkpoint(second, REPO) == url  # nothing changed: no empty commit
    assert len(fake_hub.history(REPO)) == 3


def test_use_ema_pushes_the_ema_weights_and_needs_them(fake_hub, tmp_path):
    path, _ = save_checkpoint(tmp_path / 'ema', ema_seed=5)
    hub.push_checkpoint(path, REPO, use_ema=True)
    assert_same_weights(timm.create_model(f'hf-hub:{REPO}', pretrained=True), trained_model(5))

    plain, _ = save_checkpoint(tmp_path / 'plain')
    with pytest.raises(ValueError, match='no EMA weights'):
        hub.push_checkpoint(plain, 'sdpgo/other', use_ema=True)
    assert 'sdpgo/other' not in fake_hub.repos


def test_push_a_model_object_and_to_a_branch(fake_hub, tmp_path):
    model = trained_model(3)
    hub.push_checkpoint(model, REPO, revision='v1')

    assert 'model.safetensors' not in fake_hub.files(REPO, 'main')
    assert_same_weights(timm.create_model(f'hf-hub:{REPO}@v1', pretrained=True), model)
    with pytest.raises(ValueError, match='pass the EMA model'):
        hub.push_checkpoint(model, REPO, use_ema=True)


def test_registered_tag_loads_the_pushed_weights(fake_hub, tmp_path):
    path, model = save_checkpoint(tmp_path / 'run')
    hub.push_checkpoint(path, REPO)
    pretrained.register_pretrained(ARCH, 'sdpgo_test', hf_hub_id=REPO, num_classes=10, input_size=(3, 64, 64))

    assert f'{ARCH}.sdpgo_test' in timm.list_pretrained(f'{ARCH}.*')
    loaded = timm.create_model(f'{ARCH}.sdpgo_test', pretrained=True)
    assert_same_weights(loaded, model)
    assert loaded.pretrained_cfg['hf_hub_id'] == REPO and loaded.pretrained_cfg['tag'] == 'sdpgo_test'


def test_push_records_a_pinned_manifest_entry_that_registers(fake_hub, tmp_path, monkeypatch):
    path, model = save_checkpoint(tmp_path / 'run')
    manifest = tmp_path / 'pretrained.json'
    hub.push_checkpoint(path, REPO, manifest=manifest, tag='sdpgo_c10')
    hub.push_checkpoint(save_checkpoint(tmp_path / 'later', seed=9)[0], REPO)  # the tag stays on its commit

    (entry,) = json.loads(manifest.read_text())['models']
    first_push = fake_hub.history(REPO)[1].sha
    assert entry['arch'] == ARCH and entry['tag'] == 'sdpgo_c10' and entry['hf_hub_id'] == f'{REPO}@{first_push}'
    assert entry['num_classes'] == 10 and entry['top1'] == 71.25 and entry['recipe']['sdpgo_beta'] == 0.9
    monkeypatch.setenv(pretrained.MANIFEST_ENV, str(manifest))
    assert pretrained.register_builtin() == [f'{ARCH}.sdpgo_c10']
    assert_same_weights(timm.create_model(f'{ARCH}.sdpgo_c10', pretrained=True), model)
    commits = len(fake_hub.history(REPO))
    with pytest.raises(ValueError, match='already in'):
        hub.push_checkpoint(save_checkpoint(tmp_path / 'retag', seed=4)[0], REPO, manifest=manifest, tag='sdpgo_c10')
    assert len(fake_hub.history(REPO)) == commits  # refused before anything was sent


def test_shipped_manifest_is_empty():
    assert json.loads(pretrained.MANIFEST.read_text()) == {'models': []}
    assert pretrained.register_manifest(pretrained.MANIFEST) == []


def test_builtin_registration_skips_what_it_cannot_register(tmp_path, monkeypatch):
    manifest = tmp_path / 'mixed.json'
    entries = [dict(arch='no_such_net', tag='sdpgo_a', hf_hub_id='sdpgo/a'),
               dict(arch=ARCH, tag='sdpgo_b', hf_hub_id='sdpgo/b', num_classes=10, top1=70.0, recipe={'lr': 0.1})]
    manifest.write_text(json.dumps({'models': entries}))
    with pytest.raises(ValueError, match="mixed.json.*Unknown architecture 'no_such_net'"):
        pretrained.register_manifest(manifest)

    monkeypatch.setenv(pretrained.MANIFEST_ENV, str(manifest))
    with pytest.warns(UserWarning, match='no_such_net'):
        assert pretrained.register_builtin() == [f'{ARCH}.sdpgo_b']
    assert timm.models.get_pretrained_cfg(f'{ARCH}.sdpgo_b').num_classes == 10
    monkeypatch.setenv(pretrained.MANIFEST_ENV, str(tmp_path / 'missing.json'))
    with pytest.warns(UserWarning, match='cannot read pretrained manifest.*missing.json'):
        assert pretrained.register_builtin() == []


def test_register_pretrained_never_clobbers(monkeypatch):
    timm_cfg = timm.models.get_pretrained_cfg('resnet18.a1_in1k')
    with pytest.raises(ValueError, match="timm's own pretrained tags"):
        pretrained.register_pretrained('resnet18', 'a1_in1k', hf_hub_id='sdpgo/resnet18')
    assert timm.models.get_pretrained_cfg('resnet18.a1_in1k') == timm_cfg

    pretrained.register_pretrained('resnet18', 'sdpgo_x', hf_hub_id='sdpgo/resnet18', num_classes=100)
    pretrained.register_pretrained('resnet18', 'sdpgo_x', hf_hub_id='sdpgo/resnet18', num_classes=100)  # no-op
    with pytest.raises(ValueError, match='another cfg'):
        pretrained.register_pretrained('resnet18', 'sdpgo_x', hf_hub_id='sdpgo/other', num_classes=100)
    cfg = timm.models.get_pretrained_cfg('resnet18.sdpgo_x')
    assert cfg.hf_hub_id == 'sdpgo/resnet18' and cfg.num_classes == 100 and cfg.url is None
    assert cfg.first_conv == 'conv1' and cfg.classifier == 'fc' and cfg.paper_ids is None


@pytest.mark.parametrize('arch,tag,hf_hub_id,match', [
    ('no_such_net', 'sdpgo', 'sdpgo/x', 'Unknown architecture'),
    ('resnet18.a1_in1k', 'sdpgo', 'sdpgo/x', 'Unknown architecture'),
    ('resnet18', 'bad.tag', 'sdpgo/x', 'Bad pretrained tag'),
    ('resnet18', 'sdpgo', 'no-namespace', 'Bad repo id'),
])
def test_register_pretrained_rejects_bad_input(arch, tag, hf_hub_id, match):
    with pytest.raises(ValueError, match=match):
        pretrained.register_pretrained(arch, tag, hf_hub_id=hf_hub_id)


def test_registry_access_refuses_a_timm_whose_private_registry_changed(monkeypatch):
    """timm has no public API to add a tag; a release without the registry's private tables gets the fallback."""
    import timm.models
    monkeypatch.setattr(timm.models, '_registry', types.SimpleNamespace())  # what `from timm.models import` finds
    with pytest.raises(RuntimeError, match="changed its private model registry.*hf-hub:sdpgo/x"):
        pretrained.register_pretrained('resnet18', 'sdpgo_old', hf_hub_id='sdpgo/x')
    assert 'resnet18.sdpgo_old' not in timm.list_pretrained('resnet18.*')


def test_offline_loads_from_a_seeded_cache_without_requests(fake_hub, tmp_path, monkeypatch):
    path, model = save_checkpoint(tmp_path / 'run')
    hub.push_checkpoint(path, REPO)
    timm.create_model(f'hf-hub:{REPO}', pretrained=True)  # seeds the cache
    pretrained.register_pretrained(ARCH, 'sdpgo_off', hf_hub_id=REPO, num_classes=10)
    seen = len(fake_hub.requests)

    set_offline(monkeypatch)
    for name in (f'hf-hub:{REPO}', f'{ARCH}.sdpgo_off'):
        pretrained.ensure_cached(name)
        assert_same_weights(timm.create_model(name, pretrained=True), model)
    assert len(fake_hub.requests) == seen


def test_offline_without_cache_names_the_repository(fake_hub, tmp_path, monkeypatch):
    path, _ = save_checkpoint(tmp_path / 'run')
    hub.push_checkpoint(path, REPO)
    pretrained.register_pretrained(ARCH, 'sdpgo_nc', hf_hub_id=REPO, num_classes=10)
    use_cache(monkeypatch, tmp_path / 'empty_cache')
    set_offline(monkeypatch)

    for name in (f'hf-hub:{REPO}', f'{ARCH}.sdpgo_nc'):
        with pytest.raises(FileNotFoundError, match=f"'{REPO}'.*not in the local cache.*HF_HUB_OFFLINE"):
            pretrained.ensure_cached(name)
    with pytest.raises(FileNotFoundError, match="'timm/test_resnet.r160_in1k'"):
        pretrained.ensure_cached(ARCH)  # timm's own default weights come from the Hub too
    pretrained.ensure_cached(f'local-dir:{tmp_path}')  # not from the Hub: nothing to check
    set_offline(monkeypatch, False)
    pretrained.ensure_cached(f'hf-hub:{REPO}')  # online: the download will happen


def test_push_without_token_or_offline_fails_fast_and_never_shows_the_token(fake_hub, tmp_path, monkeypatch, capsys):
    path, _ = save_checkpoint(tmp_path / 'run')
    use_hub(monkeypatch, fake_hub.url, tmp_path / 'logged_out', token=None)
    with pytest.raises(ValueError, match='no Hugging Face token.*HF_TOKEN'):
        hub.push_checkpoint(path, REPO)

    set_offline(monkeypatch)
    with pytest.raises(ValueError, match='HF_HUB_OFFLINE') as offline:
        hub.push_checkpoint(path, REPO, token=FAKE_TOKEN)
    monkeypatch.setenv('HF_TOKEN', FAKE_TOKEN)
    assert hub.main(['push', str(path), REPO]) == 2
    out, err = capsys.readouterr()
    assert FAKE_TOKEN not in str(offline.value) + out + err
    assert err.count('\n') == 1 and 'HF_HUB_OFFLINE' in err
    assert fake_hub.requests == []


def _not_a_checkpoint(folder):
    text = folder / 'notes.txt'
    text.write_text('not a checkpoint')
    tensor = folder / 'tensor.pth'
    torch.save(torch.zeros(3), tensor)
    unsafe = folder / 'unsafe.pth.tar'
    unsafe.write_bytes(pickle.dumps({'state_dict': {}, 'hook': print}))
    return [text, tensor, unsafe, folder / 'missing.pth.tar']


def test_bad_input_is_a_value_error_and_sends_nothing(fake_hub, tmp_path):
    path, _ = save_checkpoint(tmp_path / 'run')
    for repo_id in ('no-namespace', 'a/b/c', 'bad--name/x', ''):
        with pytest.raises(ValueError, match="Bad repo id.*'namespace/name'"):
            hub.push_checkpoint(path, repo_id)
    for bad in _not_a_checkpoint(tmp_path):
        with pytest.raises(ValueError, match='(not a timm training checkpoint|does not exist).*Pass the .pth.tar'):
            hub.push_checkpoint(bad, REPO)
    unknown, _ = save_checkpoint(tmp_path / 'unknown', model='no_such_net')
    with pytest.raises(ValueError, match="unknown architecture 'no_such_net'.*Upgrade timm"):
        hub.push_checkpoint(unknown, REPO)
    with pytest.raises(ValueError, match='both `manifest` and `tag`'):
        hub.push_checkpoint(path, REPO, tag='sdpgo_x')
    assert fake_hub.requests == [] and fake_hub.repos == {}


def test_cli_push_prints_the_commit_url_and_exits_2_on_bad_input(fake_hub, tmp_path, capsys):
    path, model = save_checkpoint(tmp_path / 'run')
    assert hub.main(['push', str(path), REPO, '--private', '--commit-message', 'from the CLI']) == 0
    out, _ = capsys.readouterr()
    assert out.strip().endswith(fake_hub.history(REPO)[-1].sha) and fake_hub.repos[REPO].private
    assert fake_hub.history(REPO)[-1].message == 'from the CLI'
    assert_same_weights(timm.create_model(f'hf-hub:{REPO}', pretrained=True), model)

    assert hub.main(['push', str(tmp_path / 'run' / 'summary.csv'), REPO]) == 2
    _, err = capsys.readouterr()
    assert err.startswith('error: ') and err.count('\n') == 1 and 'not a timm training checkpoint' in err


def test_python_m_entry_point_reports_one_line_and_exit_2(tmp_path):
    path, _ = save_checkpoint(tmp_path / 'run')
    done = subprocess.run(
        [sys.executable, '-m', 'sdpgo_timm.hub', 'push', str(path), 'no-namespace'],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 2 and done.stdout == ''
    assert done.stderr.count('\n') == 1 and "Bad repo id 'no-namespace'" in done.stderr


def test_train_push_to_hub_round_trip(fake_hub, tmp_path):
    """train.py --push-to-hub: 1 digits epoch, pushed at the end, loads through plain timm."""
    from conftest import FAST, run_train, run_validate
    from sdpgo_timm.runner.checkpoint import load_checkpoint_file
    repo = 'sdpgo/test-resnet-digits'
    assert run_train(['digits', '--sdpgo', '--epochs', '1', *FAST, '--output', str(tmp_path),
                      '--experiment', 'pushed', '--push-to-hub', repo]) == 0
    best = load_checkpoint_file(str(tmp_path / 'pushed' / 'model_best.pth.tar'))
    pulled = timm.create_model(f'hf-hub:{repo}', pretrained=True)
    for name, tensor in pulled.state_dict().items():
        assert torch.equal(tensor, best['state_dict'][name]), name
    pretrained.register_pretrained(best['arch'], 'sdpgo_digits', hf_hub_id=repo, num_classes=10)
    by_tag = timm.create_model(f"{best['arch']}.sdpgo_digits", pretrained=True)
    assert all(torch.equal(a, b) for a, b in zip(by_tag.state_dict().values(), pulled.state_dict().values()))
    results = tmp_path / 'val.json'
    assert run_validate(['digits', '--model', f'hf-hub:{repo}', '--pretrained', '--input-size', '3', '16', '16',
                         '--workers', '0', '--results-file', str(results)]) == 0
    top1 = json.loads(results.read_text())[0]['top1']
    last = list(csv.DictReader(open(tmp_path / 'pushed' / 'summary.csv')))[-1]
    assert top1 == pytest.approx(float(last['eval_top1']), abs=1e-3)  # validate.py rounds to 3 decimals


def test_unreachable_hub_and_missing_card_files_are_one_line(fake_hub, tmp_path, monkeypatch, capsys):  # noqa: F811
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session
    path, _ = save_checkpoint(tmp_path / 'run')
    assert hub.main(['push', str(path), 'sdpgo/x', '--summary-csv', str(tmp_path / 'nope.csv')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and "summary file '" in err and 'nope.csv' in err and 'does not exist' in err
    assert hub.main(['push', str(path), 'sdpgo/x', '--args-yaml', str(tmp_path / 'nope.yaml')]) == 2
    assert "args file '" in capsys.readouterr().err
    assert fake_hub.requests == []
    monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9')  # nothing listens there
    close_session()
    assert hub.main(['push', str(path), 'sdpgo/x']) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: cannot reach the Hub at http://127.0.0.1:9 (')


def test_train_checks_the_push_before_training_and_keeps_the_run_when_the_hub_is_down(
        fake_hub, tmp_path, monkeypatch, caplog):  # noqa: F811
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session
    from conftest import FAST, run_train
    assert run_train(['digits', '--epochs', '1', *FAST, '--output', str(tmp_path), '--experiment', 'bad',
                      '--push-to-hub', 'no-namespace']) == 2
    assert not (tmp_path / 'bad').exists()
    monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9')
    close_session()
    assert run_train(['digits', '--epochs', '1', *FAST, '--output', str(tmp_path), '--experiment', 'down',
                      '--push-to-hub', 'sdpgo/down']) == 1
    error = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR'][-1]
    assert error.startswith('error: cannot reach the Hub') and 'push it later with python -m sdpgo_timm.hub push' in error
    assert (tmp_path / 'down' / 'model_best.pth.tar').is_file() and (tmp_path / 'down' / 'summary.csv').is_file()
