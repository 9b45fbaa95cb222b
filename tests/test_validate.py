""" validate.py on checkpoints written by train.py: same numbers as training's evaluation, results files, errors. """
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, run_validate


def last_summary_row(run):
    with open(run / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))[-1]


def read_results(path):
    if path.suffix == '.json':
        return json.loads(path.read_text())
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_top1_matches_training_evaluation(sdpgo_run, tmp_path, capsys):
    """The data config (16x16, recipe mean/std/crop) comes from the checkpoint; --model from its arch."""
    row = last_summary_row(sdpgo_run)
    for name in ('results.csv', 'results.json'):
        assert run_validate(['digits', '--checkpoint', str(sdpgo_run / 'last.pth.tar'), '-b', '64',
                             '--workers', '0', '--results-file', str(tmp_path / name)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith('--result\n')
    result, = json.loads(printed.split('--result\n')[-1])
    assert result['model'] == 'test_resnet' and result['split'] == 'validation'
    assert result['top1'] == pytest.approx(float(row['eval_top1']), abs=1e-4)
    assert result['top5'] == pytest.approx(float(row['eval_top5']), abs=1e-4)
    assert result['loss'] == pytest.approx(float(row['eval_loss']), abs=1e-4)
    assert result['img_size'] == 16 and result['crop_pct'] == 1.0 and result['img_per_sec'] > 0
    csv_row, = read_results(tmp_path / 'results.csv')
    json_row, = read_results(tmp_path / 'results.json')
    assert json_row == result
    assert float(csv_row['top1']) == result['top1'] and csv_row['checkpoint'] == str(sdpgo_run / 'last.pth.tar')


def test_ema_weights_match_training_evaluation(ce_ema_run, capsys):
    """With --model-ema, train.py reports the EMA model's metrics; --use-ema evaluates the same weights."""
    row = last_summary_row(ce_ema_run)
    assert run_validate(['digits', '--model', 'test_resnet', '--checkpoint', str(ce_ema_run / 'last.pth.tar'),
                         '--use-ema', '-b', '64', '--workers', '0']) == 0
    result, = json.loads(capsys.readouterr().out.split('--result\n')[-1])
    assert result['top1'] == pytest.approx(float(row['eval_top1']), abs=1e-4)


def test_checkpoint_folder_gives_one_result_per_checkpoint(ce_ema_run, tmp_path):
    results = tmp_path / 'all.json'
    assert run_validate(['digits', '--checkpoint', str(ce_ema_run), '--workers', '0',
                         '--results-file', str(results)]) == 0
    rows = read_results(results)
    assert [r['checkpoint'].rsplit('/', 1)[-1] for r in rows] == [
        'checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    assert len({r['top1'] for r in rows}) == 1  # one epoch: the same weights three times


def test_other_split_and_explicit_data_config(sdpgo_run, capsys):
    assert run_validate(['digits', '--checkpoint', str(sdpgo_run / 'last.pth.tar'), '--split', 'train',
                         '--img-size', '24', '--workers', '0', '--log-freq', '0']) == 0
    result, = json.loads(capsys.readouterr().out.split('--result\n')[-1])
    assert result['split'] == 'train' and result['img_size'] == 24


def test_crop_mode_and_border_reach_timms_eval_transform(sdpgo_run, capsys):
    """timm's --crop-mode / --crop-border-pixels reach the eval transform: cropping borders changes the input;
    squashing a square image is its center crop."""
    losses = {}
    for name, extra in (('center', []), ('squash', ['--crop-mode', 'squash']), ('border', ['--crop-border-pixels', '2'])):
        assert run_validate(['digits', '--checkpoint', str(sdpgo_run / 'last.pth.tar'), '--crop-pct', '0.6',
                             '--workers', '0', '--seed', '1', *extra]) == 0
        result, = json.loads(capsys.readouterr().out.split('--result\n')[-1])
        losses[name] = result['loss']
    assert losses['squash'] == losses['center'] and losses['border'] != losses['center']


def test_channels_last_and_amp_run_on_cpu(sdpgo_run, capsys):
    assert run_validate(['digits', '--checkpoint', str(sdpgo_run / 'last.pth.tar'), '--channels-last', '--amp',
                         '--amp-dtype', 'bfloat16', '--device', 'cpu', '--workers', '0']) == 0
    result, = json.loads(capsys.readouterr().out.split('--result\n')[-1])
    assert 0 <= result['top1'] <= 100


def test_torchcompile_evaluates_the_compiled_model_with_the_same_top1(sdpgo_run, capsys, monkeypatch):
    backends = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: backends.append(kw['backend']) or real_compile(model, **kw))
    argv = ['digits', '--checkpoint', str(sdpgo_run / 'last.pth.tar'), '--workers', '0']
    assert run_validate(argv) == 0 and run_validate(argv + ['--torchcompile', 'aot_eager']) == 0
    eager, compiled = (json.loads(chunk) for chunk in capsys.readouterr().out.split('--result\n')[1:])
    assert backends == ['aot_eager']
    assert compiled[0]['top1'] == pytest.approx(eager[0]['top1'], abs=1e-4)


@pytest.fixture
def real_folder(tmp_path):
    """A 2-class validation folder of six images named as ImageNet's (PNG data, .JPEG names)."""
    rng = np.random.RandomState(0)
    labels = []
    for i in range(6):
        folder = tmp_path / 'data' / 'validation' / f'n0{i % 2}'
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            folder / f'ILSVRC2012_val_{i + 1:08d}.JPEG', format='PNG')
        labels.append(i % 2)
    return tmp_path / 'data', labels


def _real_top(real_folder, tmp_path, capsys, real):
    path = tmp_path / 'real.json'
    path.write_text(json.dumps(real))
    argv = [str(real_folder), '--model', 'test_resnet', '--num-classes', '2', '--img-size', '16', '--workers', '0']
    for extra in ([], ['--real-labels', str(path)]):
        torch.manual_seed(0)  # the same randomly initialised model both times
        assert run_validate(argv + extra) == 0
    plain, with_real = (json.loads(c)[0] for c in capsys.readouterr().out.split('--result\n')[1:])
    return plain, with_real


def test_real_labels_equal_to_the_folder_labels_give_the_same_top1(real_folder, tmp_path, capsys):
    root, labels = real_folder
    plain, real = _real_top(root, tmp_path, capsys, [[y] for y in labels])
    assert real['loss'] == plain['loss']  # the same model evaluated twice
    assert real['top1'] == pytest.approx(plain['top1'], abs=1e-4)


def test_real_labels_replace_the_folder_labels(real_folder, tmp_path, capsys):
    """Every class counted right for images 1-4, images 5-6 left out (empty ReaL lists): top-1 is 100."""
    root, _ = real_folder
    plain, real = _real_top(root, tmp_path, capsys, [[0, 1]] * 4 + [[]] * 2)
    assert real['top1'] == 100.0 and real['top5'] == 100.0


@pytest.mark.parametrize('real, message', [
    ([[0]] * 5, 'labels for 5 images'),
    ('{"a": 1}', 'must hold a list'),
    ('not json', 'cannot be read as JSON'),
])
def test_bad_real_labels_are_one_line_and_exit_2(real_folder, tmp_path, error_lines, real, message):
    path = tmp_path / 'real.json'
    path.write_text(real if isinstance(real, str) else json.dumps(real))
    root, _ = real_folder
    assert run_validate([str(root), '--model', 'test_resnet', '--num-classes', '2', '--img-size', '16',
                         '--workers', '0', '--real-labels', str(path)]) == 2
    errors = error_lines()
    assert len(errors) == 1 and message in errors[0], errors


def test_real_labels_need_file_names(tmp_path, error_lines):
    path = tmp_path / 'real.json'
    path.write_text('[[0]]')
    assert run_validate(['digits', '--model', 'test_resnet', '--workers', '0', '--real-labels', str(path)]) == 2
    errors = error_lines()
    assert len(errors) == 1 and 'needs an ImageNet validation folder' in errors[0], errors


@pytest.mark.parametrize('case', ['missing checkpoint', 'unknown model', 'other architecture', 'other classes',
                                  'no ema', 'not a checkpoint', 'bad results file', 'num gpu on cpu',
                                  'missing split', 'no model'])
def test_bad_input_is_one_line_and_exit_2(case, sdpgo_run, tmp_path, error_lines):
    last = str(sdpgo_run / 'last.pth.tar')
    not_checkpoint = tmp_path / 'notes.pth.tar'
    not_checkpoint.write_text('not a checkpoint')
    argv, message = {
        'missing checkpoint': (['--checkpoint', str(tmp_path / 'none.pth.tar')], 'does not exist'),
        'unknown model': (['--model', 'resnet_nonesuch'], "unknown model 'resnet_nonesuch'"),
        'other architecture': (['--model', 'resnet10t', '--checkpoint', last], "holds a 'test_resnet' model"),
        'other classes': (['--checkpoint', last, '--num-classes', '5'], 'does not fit'),
        'no ema': (['--checkpoint', last, '--use-ema'], 'no EMA weights'),
        'not a checkpoint': (['--checkpoint', str(not_checkpoint)], 'not a timm training checkpoint'),
        'bad results file': (['--checkpoint', last, '--results-file', str(tmp_path / 'r.txt')], '.csv or .json'),
        'num gpu on cpu': (['--checkpoint', last, '--num-gpu', '2', '--device', 'cpu'], '--num-gpu 2'),
        'missing split': (['--checkpoint', last, '--split', 'test'], "split 'test' not found"),
        'no model': ([], '--model'),
    }[case]
    assert run_validate(['digits', *argv, '--workers', '0']) == 2
    errors = error_lines()
    assert len(errors) == 1 and '\n' not in errors[0], errors
    assert message in errors[0]
    assert not (tmp_path / 'r.txt').exists()


def test_command_line_exit_status_and_message(tmp_path):
    done = subprocess.run([sys.executable, 'validate.py', 'digits', '--checkpoint', str(tmp_path / 'none.pth.tar')],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count('\n') == 0 and 'does not exist' in done.stderr
    assert done.stdout == ''
