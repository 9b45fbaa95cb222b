""" Teacher knowledge distillation (timm's --kd-* flags, through timm.task's distillation tasks): the loss, the
optimized parameters, student-only checkpoints, resume, a teacher that is never downloaded, and bad input. """
from pathlib import Path

import pytest
import safetensors.torch
import torch

import timm
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.task import FeatureDistillationTask, LogitDistillationTask
from sdpgo_timm.hub import push_checkpoint
from sdpgo_timm.runner.args import parse_args
from sdpgo_timm.runner.builders import create_train_task
from sdpgo_timm.runner.checkpoint import load_checkpoint_file
from sdpgo_timm.runner.builders import optimizer_module
from conftest import FAST, assert_same_weights, run_train, run_validate, summary
from fakehub import fake_hub, set_offline, use_cache  # noqa: F401 (fixture)

CPU = torch.device('cpu')


@pytest.fixture(scope='module')
def teachers(tmp_path_factory) -> dict:
    """Teacher weights for digits (10 classes), as a user saves them: a test_resnet state dict (torch.save) and a
    resnet10t .safetensors (pooled features 512 wide, test_resnet's 96: feature distillation needs a projection)."""
    folder = tmp_path_factory.mktemp('teachers')
    torch.manual_seed(1)
    torch.save(timm.create_model('test_resnet', num_classes=10).state_dict(), folder / 'test_resnet.pth')
    safetensors.torch.save_file(timm.create_model('resnet10t', num_classes=10).state_dict(),
                                str(folder / 'resnet10t.safetensors'))
    return dict(test_resnet=folder / 'test_resnet.pth', resnet10t=folder / 'resnet10t.safetensors')


def _task(argv, num_classes: int = 10):
    args, _ = parse_args(['digits', '--model', 'test_resnet', *argv])
    model = timm.create_model('test_resnet', num_classes=num_classes)
    return create_train_task(args, model, None, CPU), model


def test_logit_kd_loss_is_the_weighted_sum_with_the_plain_runs_criterion(teachers):
    torch.manual_seed(0)
    input, target = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    teacher = ['--kd-model-name', 'test_resnet', '--kd-checkpoint', str(teachers['test_resnet'])]
    losses = {}
    for weights, (task_w, kd_w) in (([], (1, 1)), (['--distill-loss-weight', '3'], (1, 3)),
                                    (['--task-loss-weight', '0.3'], (0.3, 0.7))):  # timm's complementary mode
        task, model = _task([*teacher, '--kd-temperature', '2', '--smoothing', '0.2', *weights])
        assert isinstance(task, LogitDistillationTask) and task.temperature == 2
        assert task.get_trainable_module() is model and optimizer_module(task, model) is model
        # the criterion of a plain run with these flags
        assert isinstance(task.criterion, LabelSmoothingCrossEntropy) and task.criterion.smoothing == 0.2
        assert_same_state(task.teacher.model, torch.load(teachers['test_resnet']))
        out = task(input, target)
        assert out['kd_loss'] > 0
        torch.testing.assert_close(out['loss'], task_w * out['task_loss'] + kd_w * out['kd_loss'])
        losses[kd_w] = out['loss'].item()
    assert len(set(losses.values())) == 3  # the distillation weight changes the loss


def assert_same_state(model: torch.nn.Module, state: dict) -> None:
    got = model.state_dict()
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_feature_kd_projection_is_in_the_optimizer_and_trains(teachers):
    task, model = _task(['--kd-model-name', 'resnet10t', '--kd-checkpoint', str(teachers['resnet10t']),
                         '--kd-distill-type', 'feature'])
    assert isinstance(task, FeatureDistillationTask)
    projection = task.get_trainable_module().projection
    assert (projection.in_features, projection.out_features) == (96, 512)
    optimizer = create_optimizer_v2(optimizer_module(task, model), opt='sgd', lr=0.1, weight_decay=1e-4)
    optimized = {id(p) for g in optimizer.param_groups for p in g['params']}
    assert {id(p) for p in projection.parameters()} <= optimized
    assert {id(p) for p in model.parameters()} <= optimized
    assert not {id(p) for p in task.teacher.parameters()} & optimized
    before = projection.weight.detach().clone()
    task(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))['loss'].backward()
    optimizer.step()
    assert not torch.equal(before, projection.weight)


@pytest.fixture(scope='module')
def logit_run(tmp_path_factory, ce_ema_run) -> Path:
    """A 1-epoch logit KD digits run whose teacher is a train.py checkpoint (the CE run's, EMA weights: timm's
    loader prefers them), distillation weight 2."""
    output = tmp_path_factory.mktemp('train')
    assert run_train(['digits', '--epochs', '1', *FAST, '--kd-model-name', 'test_resnet', '--kd-checkpoint',
                      str(ce_ema_run / 'last.pth.tar'), '--distill-loss-weight', '2', '--output', str(output),
                      '--experiment', 'kd']) == 0
    return output / 'kd'


def test_logit_kd_run_logs_its_loss_parts(logit_run):
    row, = summary(logit_run)
    task_loss, kd_loss = float(row['train_task_loss']), float(row['train_kd_loss'])
    assert kd_loss > 0 and float(row['train_loss']) == pytest.approx(task_loss + 2 * kd_loss, rel=1e-5)
    assert 'kd_model_name: test_resnet' in (logit_run / 'args.yaml').read_text()


def test_kd_checkpoint_holds_the_student_only_and_validate_scores_it(logit_run, capsys):
    import json
    path = logit_run / 'last.pth.tar'
    checkpoint = load_checkpoint_file(str(path))
    assert checkpoint['state_dict'].keys() == timm.create_model('test_resnet', num_classes=10).state_dict().keys()
    assert 'task_state' not in checkpoint  # logit distillation trains nothing beside the student
    timm.create_model('test_resnet', num_classes=10, checkpoint_path=str(path))
    capsys.readouterr()
    assert run_validate(['digits', '--checkpoint', str(path), '--workers', '0']) == 0
    result, = json.loads(capsys.readouterr().out.split('--result\n')[-1])
    assert result['top1'] == pytest.approx(float(summary(logit_run)[0]['eval_top1']), abs=1e-4)


def test_feature_kd_resume_is_exact(teachers, tmp_path):
    """A feature KD run with EMA resumed from its epoch-0 checkpoint ends as the straight run: student, projection
    (task_state), their EMAs and the optimizer (which holds the projection) resume."""
    kd = ['digits', '--kd-model-name', 'resnet10t', '--kd-checkpoint', str(teachers['resnet10t']), '--kd-distill-type',
          'feature', '--model-ema', '--model-ema-decay', '0.9', '--epochs', '2', *FAST, '--output', str(tmp_path)]
    assert run_train([*kd, '--experiment', 'straight']) == 0
    straight = tmp_path / 'straight'
    first, last = (load_checkpoint_file(str(straight / f'checkpoint-{e}.pth.tar')) for e in (0, 1))
    student = len(list(timm.create_model('test_resnet', num_classes=10).parameters()))
    assert sum(len(g['params']) for g in first['optimizer']['param_groups']) == student + 2  # + projection
    assert not torch.equal(first['task_state']['projection']['weight'], last['task_state']['projection']['weight'])
    student_keys = timm.create_model('test_resnet', num_classes=10).state_dict().keys()
    assert first['state_dict'].keys() == first['state_dict_ema'].keys() == student_keys

    assert run_train([*kd, '--experiment', 'resumed', '--resume', str(straight / 'checkpoint-0.pth.tar')]) == 0
    resumed = tmp_path / 'resumed'
    assert summary(resumed)[0]['train_loss'] == summary(straight)[1]['train_loss']
    assert_same_weights(straight / 'last.pth.tar', resumed / 'last.pth.tar')
    resumed_last = load_checkpoint_file(str(resumed / 'last.pth.tar'))
    for key in ('state_dict_ema', 'task_state', 'task_state_ema'):
        want = last[key] if key == 'state_dict_ema' else last[key]['projection']
        got = resumed_last[key] if key == 'state_dict_ema' else resumed_last[key]['projection']
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), key


def test_token_kd_trains_a_distilled_student(teachers, tmp_path):
    tiny_deit = ['--model', 'deit_tiny_distilled_patch16_224', '--model-kwargs', 'depth=1', 'embed_dim=32',
                 'num_heads=2']
    assert run_train(['digits', '--epochs', '1', *FAST, *tiny_deit, '--kd-model-name', 'test_resnet',
                      '--kd-checkpoint', str(teachers['test_resnet']), '--kd-distill-type', 'token',
                      '--kd-token-distill-type', 'hard', '--output', str(tmp_path), '--experiment', 'token']) == 0
    row, = summary(tmp_path / 'token')
    # hard: CE against the teacher's argmax, on the distillation head
    assert float(row['train_distill_loss']) > 0.1
    assert float(row['train_loss']) == pytest.approx(float(row['train_task_loss']) + float(row['train_distill_loss']),
                                                     rel=1e-5)
    assert 'head_dist.weight' in load_checkpoint_file(str(tmp_path / 'token' / 'last.pth.tar'))['state_dict']


def test_teacher_by_name_loads_from_the_local_cache(fake_hub, tmp_path, monkeypatch):
    """--kd-model-name alone takes timm's pretrained weights from the cache (offline: no request at all); a
    teacher pretrained on other classes is refused (timm would give it a random head)."""
    from test_hub import REPO, save_checkpoint
    path, teacher = save_checkpoint(tmp_path / 'run')
    push_checkpoint(str(path), REPO)
    timm.create_model(f'hf-hub:{REPO}', pretrained=True)  # a former online load: the weights are cached
    set_offline(monkeypatch)
    seen = len(fake_hub.requests)
    task, _ = _task(['--kd-model-name', f'hf-hub:{REPO}'])
    assert_same_state(task.teacher.model, teacher.state_dict())
    assert len(fake_hub.requests) == seen
    with pytest.raises(ValueError, match=r"was pretrained on 10 classes, the student has 5: .*--kd-checkpoint"):
        _task(['--kd-model-name', f'hf-hub:{REPO}'], num_classes=5)


def _bad_teacher_inputs(teachers: dict, tmp_path: Path) -> dict:
    test_resnet = ['--kd-model-name', 'test_resnet']
    return {
        'sdpgo': ([*test_resnet, '--sdpgo'], "--kd-model-name test_resnet and --sdpgo: teacher distillation and "
                                             "self-distillation are alternatives; drop one"),
        'skd': ([*test_resnet, '--skd', 'dlb'], 'and --skd dlb: teacher distillation and self-distillation are '
                                                'alternatives; drop one'),
        'not cached': (test_resnet, "'timm/test_resnet.r160_in1k' (for 'test_resnet') is not in the local cache"),
        'no pretrained weights': (['--kd-model-name', 'botnet50ts_256'], 'timm has no pretrained weights'),
        'unknown teacher': (['--kd-model-name', 'resnet_nonesuch'], "unknown teacher --kd-model-name"),
        'missing file': ([*test_resnet, '--kd-checkpoint', str(tmp_path / 'none.pth')], 'is not a file'),
        'other architecture': (['--kd-model-name', 'resnet10t', '--kd-checkpoint', str(teachers['test_resnet'])],
                               "does not load as teacher --kd-model-name 'resnet10t' with 10 classes"),
        'no teacher name': (['--kd-checkpoint', str(teachers['test_resnet'])], 'needs --kd-model-name'),
        'feature width': (['--kd-model-name', 'resnet10t', '--kd-checkpoint', str(teachers['resnet10t']),
                           '--kd-distill-type', 'feature', '--kd-teacher-feature-dim', '64'],
                          "--kd-teacher-feature-dim 64, but the teacher 'resnet10t' has 512 pooled features"),
    }


@pytest.mark.parametrize('case', ['sdpgo', 'skd', 'not cached', 'no pretrained weights', 'unknown teacher',
                                  'missing file', 'other architecture', 'no teacher name', 'feature width'])
def test_bad_teacher_input_is_one_line_before_training(case, teachers, tmp_path, monkeypatch, error_lines):
    use_cache(monkeypatch, tmp_path / 'empty_cache')  # online: the teacher is still never downloaded
    argv, message = _bad_teacher_inputs(teachers, tmp_path)[case]
    output = tmp_path / 'out'
    assert run_train(['digits', *argv, '--epochs', '1', *FAST, '--output', str(output)]) == 2
    errors = error_lines()
    assert len(errors) == 1 and '\n' not in errors[0], errors
    assert message in errors[0]
    if case == 'not cached':
        assert 'A run never downloads its teacher: pass --kd-checkpoint PATH' in errors[0]
    assert not output.exists()


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # resnet10t's pretrained_cfg (test_resnet's: 0.5 / 0.5)


@pytest.mark.parametrize('arch, saved, expected', [
    # a train.py checkpoint: the normalisation its run trained with (its args), even where the student's differs
    ('test_resnet', {'args': dict(mean=[0.2, 0.3, 0.4], std=[0.6, 0.7, 0.8])}, ((0.2, 0.3, 0.4), (0.6, 0.7, 0.8))),
    # trained on the student's recipe (digits: 0.5 / 0.5): the student's input as it is
    ('resnet10t', {'args': dict(mean=[0.5] * 3, std=[0.5] * 3)}, ((0.5,) * 3, (0.5,) * 3)),
    # trained without --mean/--std: the teacher model's defaults, as its run resolved them
    ('resnet10t', {'args': dict(mean=None, std=None)}, IMAGENET),
    # weights only: nothing says otherwise, so the student's (a --kd-checkpoint is trained on the student's data)
    ('resnet10t', {}, ((0.5,) * 3, (0.5,) * 3)),
], ids=['its own args', 'the same recipe', 'model defaults', 'weights only'])
def test_the_teacher_sees_its_input_normalised_as_it_was_trained(arch, saved, expected, teachers, tmp_path):
    """timm renormalises from the student's pretrained_cfg to the teacher's (0.5 / 0.5 to ImageNet's for test_resnet
    and resnet10t), which is neither what the student's input is (the digits recipe's 0.5 / 0.5) nor, for a teacher
    trained by train.py, what the teacher saw in training."""
    import argparse
    path = teachers[arch]
    state = safetensors.torch.load_file(str(path)) if path.suffix == '.safetensors' else torch.load(path)
    path = tmp_path / 'teacher.pth.tar'
    torch.save({'state_dict': state, **({'args': argparse.Namespace(**saved['args'])} if saved else {})}, path)
    task, model = _task(['--kd-model-name', arch, '--kd-checkpoint', str(path)])
    seen = []
    task.teacher.model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    torch.manual_seed(0)
    input = torch.randn(4, 3, 16, 16)  # normalised with the recipe's 0.5 / 0.5
    task(input, torch.randint(0, 10, (4,)))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in expected)
    torch.testing.assert_close(seen[0], (input * 0.5 + 0.5 - mean) / std)
