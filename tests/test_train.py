""" train.py end to end: summaries, checkpoints, exact resume, DDP sharding, bad input, non-finite loss. """
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset

import timm
from sdpgo_timm.runner.checkpoint import load_checkpoint_file
from sdpgo_timm.data import DigitsDataset
from sdpgo_timm.data.replay import ReplayBatchSampler
from sdpgo_timm.runner.builders import resolve_feed
from conftest import FAST, ROOT, assert_same_weights, run_train, run_validate, summary

TIMM_COLUMNS = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr')
SDPGO_COLUMNS = ('train_loss_ce', 'train_loss_sil', 'train_alpha', 'train_sparsity', 'train_steps', 'train_samples')
CHECKPOINT_KEYS = {'state_dict', 'optimizer', 'epoch', 'arch', 'args', 'version', 'task_state'}
DIGITS_TRAIN = 1438
FRESH_PER_EPOCH = DIGITS_TRAIN // 32 * 32  # recipe batch 64: 32 fresh samples a step, last partial chunk dropped


def test_sdpgo_run_writes_timm_outputs(sdpgo_run):
    rows = summary(sdpgo_run)
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert set(TIMM_COLUMNS + SDPGO_COLUMNS) <= set(rows[0])
    assert all(int(r['train_samples']) == FRESH_PER_EPOCH for r in rows)
    assert 0 < float(rows[-1]['train_alpha']) < 1 and 0 <= float(rows[-1]['train_sparsity']) <= 1
    assert float(rows[-1]['train_loss_sil']) > 0
    assert (sdpgo_run / 'args.yaml').is_file() and 'sdpgo: true' in (sdpgo_run / 'args.yaml').read_text()
    for name in ('checkpoint-0.pth.tar', 'checkpoint-1.pth.tar', 'last.pth.tar', 'model_best.pth.tar'):
        checkpoint = load_checkpoint_file(str(sdpgo_run / name))
        assert CHECKPOINT_KEYS <= set(checkpoint), name
        assert checkpoint['arch'] == 'test_resnet' and checkpoint['args'].sdpgo
        assert {'pwa', 'cache', 'replay'} <= set(checkpoint['task_state'])
        model = timm.create_model(checkpoint['arch'], checkpoint_path=str(sdpgo_run / name), num_classes=10)
        assert model.num_classes == 10
    assert load_checkpoint_file(str(sdpgo_run / 'last.pth.tar'))['epoch'] == 1


def test_training_loss_falls(sdpgo_run):
    first, last = summary(sdpgo_run)
    assert float(last['train_loss']) < float(first['train_loss'])
    assert float(last['train_loss_ce']) < 0.8 * float(first['train_loss_ce'])
    assert float(last['eval_top1']) > 50  # 10 classes: chance is 10%


def test_ce_run_has_half_the_steps_and_ema(ce_ema_run, sdpgo_run):
    ce, sdpgo = summary(ce_ema_run)[0], summary(sdpgo_run)[0]
    assert set(TIMM_COLUMNS + ('train_steps', 'train_samples')) <= set(ce)
    assert int(sdpgo['train_steps']) == 2 * int(ce['train_steps']) == 2 * (DIGITS_TRAIN // 64)
    assert int(ce['train_samples']) == DIGITS_TRAIN // 64 * 64
    for name in ('checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar'):
        checkpoint = load_checkpoint_file(str(ce_ema_run / name))
        assert (CHECKPOINT_KEYS - {'task_state'}) | {'state_dict_ema'} <= set(checkpoint), name
        model = timm.create_model(checkpoint['arch'], checkpoint_path=str(ce_ema_run / name), num_classes=10)
        timm.models.load_checkpoint(model, str(ce_ema_run / name), use_ema=True)


def _resume_matches_straight_run(straight: Path, tmp_path: Path, extra) -> None:
    """Resuming the straight run's epoch-0 checkpoint for one more epoch gives the same final weights.

    checkpoint-0.pth.tar is a link to what last.pth.tar held after epoch 0: resuming it is
    resuming a run stopped there, with the same --epochs (and so the same LR schedule).
    """
    assert run_train(['digits', '--sdpgo', '--epochs', '2', *FAST, *extra, '--output', str(tmp_path),
                      '--experiment', 'resumed', '--resume', str(straight / 'checkpoint-0.pth.tar')]) == 0
    resumed = tmp_path / 'resumed'
    assert [r['epoch'] for r in summary(resumed)] == ['1']
    assert summary(resumed)[0]['train_loss'] == summary(straight)[1]['train_loss']
    assert_same_weights(straight / 'last.pth.tar', resumed / 'last.pth.tar')


def test_resume_is_exact(sdpgo_run, tmp_path):
    _resume_matches_straight_run(sdpgo_run, tmp_path, [])


def test_resume_is_exact_with_mixup_cutmix(tmp_path):
    mix = ['--mixup', '0.2', '--cutmix', '0.5']
    assert run_train(['digits', '--sdpgo', '--epochs', '2', *FAST, *mix, '--output', str(tmp_path),
                      '--experiment', 'straight']) == 0
    assert 'replay_mixup' in load_checkpoint_file(str(tmp_path / 'straight' / 'checkpoint-0.pth.tar'))
    _resume_matches_straight_run(tmp_path / 'straight', tmp_path, mix)


def test_plain_resume_is_exact_from_the_saved_rng_states(tmp_path):
    """A CE run draws its sample order and augmentations from the global RNGs, which no epoch reseeds (as in timm):
    an epoch checkpoint holds them and a resumed run restores them. Without them the next epoch draws others."""
    plain = ['digits', '--epochs', '2', *FAST, '--output', str(tmp_path)]
    assert run_train([*plain, '--experiment', 'straight']) == 0
    epoch0 = tmp_path / 'straight' / 'checkpoint-0.pth.tar'
    assert len(load_checkpoint_file(str(epoch0))['rng_ranks']) == 1
    assert run_train([*plain, '--experiment', 'resumed', '--resume', str(epoch0)]) == 0
    assert_same_weights(tmp_path / 'straight' / 'last.pth.tar', tmp_path / 'resumed' / 'last.pth.tar')

    checkpoint = load_checkpoint_file(str(epoch0))
    del checkpoint['rng_ranks']
    torch.save(checkpoint, tmp_path / 'no_rng.pth.tar')
    assert run_train([*plain, '--experiment', 'no_rng', '--resume', str(tmp_path / 'no_rng.pth.tar')]) == 0
    assert summary(tmp_path / 'no_rng')[0]['train_loss'] != summary(tmp_path / 'straight')[1]['train_loss']


def test_imagenet_benchmark_from_environment(image_folder, tmp_path, monkeypatch):
    """`train.py imagenet ... --sdpgo` with IMAGENET_DIR, as the user runs it (one process)."""
    monkeypatch.setenv('IMAGENET_DIR', str(image_folder))
    assert run_train(['imagenet', '--model', 'test_vit', '--sdpgo', '--input-size', '3', '32', '32', '-b', '8',
                      '--epochs', '1', '--workers', '0', '--lr', '0.01', '--warmup-epochs', '0',
                      '--output', str(tmp_path), '--experiment', 'imagenet']) == 0
    row, = summary(tmp_path / 'imagenet')
    assert int(row['train_samples']) == 24 and int(row['train_steps']) == 6  # 3 classes x 8 images, 4 fresh a step
    checkpoint = load_checkpoint_file(str(tmp_path / 'imagenet' / 'last.pth.tar'))
    assert checkpoint['state_dict']['head.weight'].shape[0] == 3
    assert checkpoint['state_dict']['pos_embed'].shape[1] == 4 + 1  # a native 32x32 model: 2x2 patches + cls
    results = tmp_path / 'results.json'
    assert run_validate(['imagenet', '--checkpoint', str(tmp_path / 'imagenet' / 'last.pth.tar'),
                         '--workers', '0', '--results-file', str(results)]) == 0
    result, = json.loads(results.read_text())
    assert result['top1'] == pytest.approx(float(row['eval_top1']), abs=1e-4)


def test_torchrun_two_processes_train_disjoint_shards(tmp_path):
    """Two gloo processes: each trains its own shard; the checkpoint holds both replay caches."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
               'digits', '--sdpgo', '--epochs', '1', '--device', 'cpu', *FAST, '--output', str(tmp_path),
               '--experiment', 'ddp']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / 'ddp'
    row, = summary(run)
    steps = DIGITS_TRAIN // (2 * 32)
    assert int(row['train_steps']) == steps and int(row['train_samples']) == steps * 2 * 32

    checkpoint = load_checkpoint_file(str(run / 'last.pth.tar'))
    states = checkpoint['task_state_ranks']
    shards = [ReplayBatchSampler(DIGITS_TRAIN, 64, num_replicas=2, rank=r, seed=42).fresh_chunks(0) for r in (0, 1)]
    assert not set(shards[0].flatten().tolist()) & set(shards[1].flatten().tolist())
    assert len(set(torch.cat(shards).flatten().tolist())) == int(row['train_samples'])
    for rank, (state, shard) in enumerate(zip(states, shards)):
        # each rank's cache holds the last fresh chunk of its own shard: it trained on that shard
        assert torch.equal(state['cache']['index'], shard[-1]), rank
    for a, b in zip(states[0]['pwa']['layers'], states[1]['pwa']['layers']):
        assert all(torch.equal(a[k], b[k]) for k in a)  # PWA statistics are all-reduced
    assert torch.equal(checkpoint['task_state']['cache']['index'], shards[0][-1])
    timm.create_model('test_resnet', checkpoint_path=str(run / 'last.pth.tar'), num_classes=10)


# what rank 1's copy of the image folder lacks or has in place of rank 0's, and the error line that names it
_RANK_DATA = {
    'one image fewer': (lambda root: (root / 'train' / 'cat' / 'cat_0.png').unlink(),
                        'the training split holds 23 samples on rank 1, 24 on rank 0'),
    'a class renamed': (lambda root: [(root / split / 'fox').rename(root / split / 'owl')
                                      for split in ('train', 'validation')],
                        "the training split has other classes on rank 1 than on rank 0 (rank 1 lacks ['fox'], "
                        "adds ['owl'])"),
    'other validation files': (lambda root: (root / 'validation' / 'dog' / 'dog_0.png').rename(
        root / 'validation' / 'dog' / 'dog_9.png'),
                               'the validation split holds other files on rank 1 than on rank 0 (the same number and '
                               'classes, other names or labels)'),
}
_RANK_LAUNCHER = """import os, sys
sys.path.insert(0, {root!r})
import train
rank = int(os.environ['RANK'])
status = train.main([sys.argv[1 + rank], *sys.argv[3:]])
open(os.path.join({out!r}, f'rank{{rank}}.status'), 'w').write(str(status))
sys.exit(status)
"""


@pytest.mark.parametrize('change', list(_RANK_DATA))
def test_torchrun_ranks_that_read_different_data_stop_with_one_line(image_folder, tmp_path, change):
    """Two nodes with their own copies of a data set that differ: every rank stops before training, exit 2."""
    damage, expected = _RANK_DATA[change]
    other = tmp_path / 'other'
    shutil.copytree(image_folder, other)
    damage(other)
    launcher = tmp_path / 'launch.py'
    launcher.write_text(_RANK_LAUNCHER.format(root=str(ROOT), out=str(tmp_path)))
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(launcher),
               str(image_folder), str(other), *FAST, '--device', 'cpu', '-b', '4', '--epochs', '1', '--output',
               str(tmp_path), '--experiment', 'ddp']
    done = subprocess.run(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True,
                          text=True, timeout=300)
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if line.startswith('error: ')]
    assert lines == [f'error: the processes read different data: {expected}; every process must read the same data '
                     'set (the same files on every node, or one shared --data-dir)'] * 2, output[-3000:]
    assert [(tmp_path / f'rank{r}.status').read_text() for r in (0, 1)] == ['2', '2']
    assert not (tmp_path / 'ddp').exists()
    assert output.count('Traceback (most recent call last)') == 1  # torchrun's own, reporting the failed ranks


class _Stream(IterableDataset):
    num_classes = 10

    def __iter__(self):
        return iter(DigitsDataset('train'))


def test_views_replay_needs_an_indexable_dataset(tmp_path, monkeypatch, error_lines):
    args = type('Args', (), {'sdpgo_replay': 'views', 'method': 'sdpgo'})()
    with pytest.raises(ValueError, match='--sdpgo-replay tensors'):
        resolve_feed(args, _Stream())
    args.sdpgo_replay = 'auto'
    assert resolve_feed(args, _Stream()) == 'tensors'
    assert resolve_feed(args, DigitsDataset('validation')) == 'views'

    from sdpgo_timm.runner import session
    monkeypatch.setattr(session, 'create_split_dataset', lambda args, split, is_training: _Stream())
    assert run_train(['digits', '--sdpgo', '--sdpgo-replay', 'views', *FAST, '--output', str(tmp_path / 'out')]) == 2
    assert 'indexable' in error_lines()[-1]
    assert not (tmp_path / 'out').exists()


def _bad_inputs(tmp_path: Path, image_folder: Path):
    bad_yaml = tmp_path / 'bad.yaml'
    bad_yaml.write_text('lr: [0.1\n')
    not_checkpoint = tmp_path / 'notes.pth.tar'
    not_checkpoint.write_text('not a checkpoint')
    return {
        'missing data dir': ([str(tmp_path / 'nowhere')], 'does not exist'),
        'missing split': ([str(image_folder), '--val-split', 'test'], "split 'test' not found"),
        'missing digits split': (['digits', '--val-split', 'test'], "split 'test' not found"),
        'unknown model': (['digits', '--model', 'resnet_nonesuch'], "unknown model 'resnet_nonesuch'"),
        'bad yaml': (['digits', '-c', str(bad_yaml)], 'is not valid YAML'),
        'odd batch': (['digits', '--sdpgo', '-b', '63'], 'even'),
        'odd batch tensors': (['digits', '--sdpgo', '--sdpgo-replay', 'tensors', '-b', '63'], 'even'),
        'not a checkpoint': (['digits', '--sdpgo', '--resume', str(not_checkpoint)], 'not a timm training checkpoint'),
        'missing checkpoint': (['digits', '--resume', str(tmp_path / 'none.pth.tar')], 'does not exist'),
        'two methods': (['digits', '--sdpgo', '--skd', 'dlb'], 'pick one'),
    }


@pytest.mark.parametrize('case', ['missing data dir', 'missing split', 'missing digits split', 'unknown model',
                                  'bad yaml', 'odd batch', 'odd batch tensors', 'not a checkpoint',
                                  'missing checkpoint', 'two methods'])
def test_bad_input_stops_before_training(case, tmp_path, image_folder, error_lines):
    argv, message = _bad_inputs(tmp_path, image_folder)[case]
    output = tmp_path / 'out'
    model = [] if '--model' in argv else ['--model', 'test_resnet']
    assert run_train([*argv, *model, '--epochs', '1', '--workers', '0', '--output', str(output)]) == 2
    errors = error_lines()
    assert len(errors) == 1 and '\n' not in errors[0], errors
    assert message in errors[0]
    assert not output.exists()


def test_non_finite_loss_exits_3_without_saving(tmp_path, error_lines):
    assert run_train(['digits', '--sdpgo', '--epochs', '1', *FAST, '--lr', '1e30', '--output', str(tmp_path),
                      '--experiment', 'nan']) == 3
    assert 'non-finite loss' in error_lines()[-1]
    assert sorted(os.listdir(tmp_path / 'nan')) == ['args.yaml']


def test_non_finite_loss_keeps_the_best_checkpoint(tmp_path, monkeypatch):
    """A loss that turns NaN in epoch 1 stops the run; epoch 0's checkpoints stay as they were."""
    from sdpgo_timm.runner import session
    real_train_one_epoch = session.train_one_epoch

    def poisoned(epoch, task, *args, **kwargs):
        if epoch == 1:
            with torch.no_grad():
                for p in task.parameters():
                    p.fill_(float('nan'))
        return real_train_one_epoch(epoch, task, *args, **kwargs)

    monkeypatch.setattr(session, 'train_one_epoch', poisoned)
    assert run_train(['digits', '--epochs', '2', *FAST, '-b', '128', '--output', str(tmp_path),
                      '--experiment', 'nan']) == 3
    run = tmp_path / 'nan'
    assert sorted(os.listdir(run)) == ['args.yaml', 'checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar',
                                       'summary.csv']
    best = load_checkpoint_file(str(run / 'model_best.pth.tar'))
    assert best['epoch'] == 0
    assert all(torch.isfinite(t).all() for t in best['state_dict'].values() if t.is_floating_point())
    assert [r['epoch'] for r in summary(run)] == ['0']


def test_resume_in_place_keeps_the_best_checkpoint(sdpgo_run, tmp_path, monkeypatch):
    """Resuming into the run's own folder continues timm's checkpoint bookkeeping: a worse epoch is not 'best'."""
    from sdpgo_timm.runner import session
    run = tmp_path / 'sdpgo'
    shutil.copytree(sdpgo_run, run)
    best_before = load_checkpoint_file(str(run / 'model_best.pth.tar'))
    real_validate = session.validate
    monkeypatch.setattr(session, 'validate', lambda *args, **kwargs: {**real_validate(*args, **kwargs), 'top1': 1.0})
    assert run_train(['digits', '--sdpgo', '--epochs', '3', *FAST, '--output', str(tmp_path), '--experiment', 'sdpgo',
                      '--resume', str(run / 'last.pth.tar')]) == 0
    assert [r['epoch'] for r in summary(run)] == ['0', '1', '2']
    assert load_checkpoint_file(str(run / 'last.pth.tar'))['epoch'] == 2
    best = load_checkpoint_file(str(run / 'model_best.pth.tar'))
    assert best['epoch'] == 1 and best['metric'] == best_before['metric']
    assert sorted(p.name for p in run.glob('checkpoint-*')) == ['checkpoint-0.pth.tar', 'checkpoint-1.pth.tar']


def test_val_interval_evaluates_and_checkpoints_every_n_epochs_and_the_last(tmp_path):
    """timm's --val-interval 2 over 3 epochs: epochs 1 and 2 are evaluated, saved and summarised; epoch 0 is not."""
    assert run_train(['digits', '--epochs', '3', '--val-interval', '2', *FAST, '--output', str(tmp_path),
                      '--experiment', 'vi']) == 0
    assert [r['epoch'] for r in summary(tmp_path / 'vi')] == ['1', '2']
    assert sorted(p.name for p in (tmp_path / 'vi').glob('checkpoint-*.pth.tar')) == [
        'checkpoint-1.pth.tar', 'checkpoint-2.pth.tar']


def test_log_wandb_logs_every_row_with_the_sdpgo_columns_and_is_optional(tmp_path, monkeypatch, caplog):
    """--log-wandb through timm's update_summary; without the package one warning line, and the run goes on."""
    import sys
    import types
    import timm.utils.summary
    calls = {'init': [], 'log': []}
    fake = types.SimpleNamespace(init=lambda **kw: calls['init'].append(kw), log=lambda row: calls['log'].append(row))
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    monkeypatch.setattr(timm.utils.summary, 'wandb', fake, raising=False)
    assert run_train(['digits', '--sdpgo', '--epochs', '1', *FAST, '--output', str(tmp_path), '--experiment', 'w',
                      '--log-wandb', '--wandb-project', 'p', '--wandb-tags', 'a', 'b']) == 0
    init, = calls['init']
    assert init['project'] == 'p' and init['tags'] == ['a', 'b'] and init['name'] == 'w' and init['config']['sdpgo']
    row, = calls['log']
    assert {'epoch', 'train_loss', 'train_loss_sil', 'train_alpha', 'eval_top1', 'lr'} <= set(row)
    monkeypatch.setitem(sys.modules, 'wandb', None)  # not installed: import fails
    assert run_train(['digits', '--epochs', '1', *FAST, '--output', str(tmp_path), '--experiment', 'nw',
                      '--log-wandb']) == 0
    assert any('the wandb package is not installed' in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize('bce_sum', [False, True])
def test_bce_loss_is_each_samples_task_loss_under_sdpgo(bce_sum):
    """--bce-loss (timm's A1/A2/A3 recipes): SDPGO's per-sample task loss averages to timm's BinaryCrossEntropy
    summed over classes (CE's scale, which the distillation term assumes), with or without --bce-sum."""
    from timm.loss import BinaryCrossEntropy
    from sdpgo_timm.runner.args import parse_args
    from sdpgo_timm.runner.builders import create_train_task
    argv = ['digits', '--sdpgo', '--bce-loss', '--smoothing', '0.1', '--bce-pos-weight', '2.0'] + (['--bce-sum'] * bce_sum)
    args, _ = parse_args(argv)
    task = create_train_task(args, timm.create_model('test_resnet', num_classes=10), 'tensors', torch.device('cpu'))
    logits, target = torch.randn(6, 10), torch.randint(0, 10, (6,))
    expected = BinaryCrossEntropy(smoothing=0.1, pos_weight=2.0, sum_classes=True)(logits, target)
    torch.testing.assert_close(task._per_sample_loss(logits, target).mean(), expected)
    with pytest.raises(ValueError, match='--bce-loss does not combine with --skd pskd'):
        create_train_task(parse_args(['digits', '--skd', 'pskd', '--bce-loss', '--smoothing', '0.1'])[0],
                          timm.create_model('test_resnet', num_classes=10), 'indexed', torch.device('cpu'),
                          num_samples=10)


def test_bce_loss_trains_end_to_end_with_sdpgo(tmp_path):
    assert run_train(['digits', '--sdpgo', '--bce-loss', '--smoothing', '0.1', '--epochs', '2', *FAST,
                      '--output', str(tmp_path), '--experiment', 'bce']) == 0
    row = summary(tmp_path / 'bce')[-1]
    # it learns (with the class-mean BCE the distillation term swamps it: one class, top-1 10 %)
    assert float(row['eval_top1']) > 80 and float(row['train_alpha']) > 0
