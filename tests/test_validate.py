""" validate.py on checkpoints written by train.py: same numbers as training's evaluation, results files, errors. """
import csv
import json
import logging
import subprocess
import sys
from types import SimpleNamespace

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


def test_log_lines_and_result_keys_are_timms(ce_ema_run, capsys, caplog):
    """timm's validate.py lines (`Test: [   0/N]` every --log-freq batches from 0, then ` * Acc@1 a (err) Acc@5 b
    (err)`) and its result keys first, in its order; ours after them."""
    caplog.set_level(logging.INFO)
    assert run_validate(['digits', '--checkpoint', str(ce_ema_run / 'last.pth.tar'), '-b', '64', '--workers', '0',
                         '--log-freq', '2']) == 0
    result, = json.loads(capsys.readouterr().out.split('--result\n')[-1])
    assert list(result)[:9] == ['model', 'top1', 'top1_err', 'top5', 'top5_err', 'param_count', 'img_size',
                                'crop_pct', 'interpolation']
    messages = [r.getMessage() for r in caplog.records]
    batches = [int(m.split('[')[1].split('/')[0]) for m in messages if m.startswith('Test: [')]
    assert batches and batches == list(range(0, batches[-1] + 1, 2))
    assert any(m.startswith(f" * Acc@1 {result['top1']:.3f} ({result['top1_err']:.3f}) Acc@5 {result['top5']:.3f} "
                            f"({result['top5_err']:.3f})") for m in messages)


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
                                  'missing split', 'no model', 'naflex loader on a resnet',
                                  'tf preprocessing in memory'])
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
        'naflex loader on a resnet': (['--checkpoint', last, '--naflex-loader'], 'needs a NaFlex model'),
        'tf preprocessing in memory': (['--checkpoint', last, '--tf-preprocessing'], 'needs an image folder'),
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


# timm's remaining validate.py flags (issue 12)

@pytest.fixture
def evaluated(monkeypatch):
    """What validate.py hands the engine's validate, per model: the model and the inputs of every batch."""
    import validate as script
    from sdpgo_timm.runner.evaluation import MapBatches
    seen, real = [], script.validate

    def spy(model, loader, **kwargs):
        record = SimpleNamespace(model=model, inputs=[])
        seen.append(record)
        return real(model, MapBatches(loader, lambda batch: record.inputs.append(batch[0]) or batch), **kwargs)
    monkeypatch.setattr(script, 'validate', spy)
    return seen


def _results(capsys):
    """The result lists printed so far, one per validate.py run."""
    return [json.loads(chunk) for chunk in capsys.readouterr().out.split('--result\n')[1:]]


def _save_weights(model, path):
    torch.save(model.state_dict(), path)
    return str(path)


def test_results_format_overrides_the_file_extension(sdpgo_run, tmp_path):
    argv = ['digits', '--checkpoint', str(sdpgo_run / 'last.pth.tar'), '--workers', '0']
    assert run_validate(argv + ['--results-file', str(tmp_path / 'r.txt'), '--results-format', 'json']) == 0
    assert run_validate(argv + ['--results-file', str(tmp_path / 'r.json'), '--results-format', 'csv']) == 0
    as_json, = json.loads((tmp_path / 'r.txt').read_text())
    with open(tmp_path / 'r.json', newline='') as f:
        as_csv, = list(csv.DictReader(f))
    assert float(as_csv['top1']) == as_json['top1'] and as_csv['checkpoint'] == as_json['checkpoint']


@pytest.mark.parametrize('loader', [[], ['--no-prefetcher']])
def test_model_dtype_bfloat16_evaluates_a_bfloat16_model_on_bfloat16_inputs(sdpgo_run, capsys, evaluated, loader):
    argv = ['digits', '--checkpoint', str(sdpgo_run / 'last.pth.tar'), '--workers', '0', *loader]
    assert run_validate(argv) == 0 and run_validate(argv + ['--model-dtype', 'bfloat16']) == 0
    (fp32,), (bf16,) = _results(capsys)
    assert next(evaluated[1].model.parameters()).dtype == torch.bfloat16
    assert {x.dtype for x in evaluated[1].inputs} == {torch.bfloat16}
    assert bf16['top1'] == pytest.approx(fp32['top1'], abs=2) and bf16['loss'] == pytest.approx(fp32['loss'], abs=0.02)


def test_test_pool_pools_a_larger_input_as_at_the_model_default_size(image_folder, capsys, evaluated):
    """test_resnet's default input is 160: at 192 timm's TestTimePoolHead takes over and the image is not cropped;
    at 160 --test-pool changes nothing."""
    from timm.layers.test_time_pool import TestTimePoolHead
    argv = [str(image_folder), '--model', 'test_resnet', '--workers', '0', '--test-pool']
    for size in ('192', '160'):
        torch.manual_seed(0)
        assert run_validate(argv + ['--img-size', size]) == 0
    (pooled,), (plain,) = _results(capsys)
    assert isinstance(evaluated[0].model, TestTimePoolHead) and pooled['crop_pct'] == 1.0
    assert not isinstance(evaluated[1].model, TestTimePoolHead) and plain['crop_pct'] != 1.0
    assert {tuple(x.shape[1:]) for x in evaluated[0].inputs} == {(3, 192, 192)}


def test_torchscript_and_fuser_evaluate_a_script_module_with_the_same_top1(sdpgo_run, capsys, evaluated,
                                                                           monkeypatch):
    from sdpgo_timm.runner import setup  # the model builder sets the fuser, for both scripts
    fusers, real_set_jit_fuser = [], setup.set_jit_fuser
    monkeypatch.setattr(setup, 'set_jit_fuser', lambda name: fusers.append(name) or real_set_jit_fuser(name))
    argv = ['digits', '--checkpoint', str(sdpgo_run / 'last.pth.tar'), '--workers', '0']
    assert run_validate(argv) == 0 and run_validate(argv + ['--torchscript', '--fuser', 'te']) == 0
    (eager,), (scripted,) = _results(capsys)
    assert isinstance(evaluated[1].model, torch.jit.ScriptModule) and fusers == ['te']
    assert scripted['top1'] == pytest.approx(eager['top1'], abs=1e-4)
    assert scripted['loss'] == pytest.approx(eager['loss'], abs=1e-4)


def test_aot_autograd_fuses_once_per_input_shape_with_the_same_top1(sdpgo_run, capsys, evaluated):
    """The validation split is not a multiple of 64: the last, smaller batch gets a trace of its own."""
    from sdpgo_timm.runner.evaluation import FusedPerShape
    argv = ['digits', '--checkpoint', str(sdpgo_run / 'last.pth.tar'), '--workers', '0', '-b', '64']
    assert run_validate(argv) == 0 and run_validate(argv + ['--aot-autograd']) == 0
    (eager,), (fused,) = _results(capsys)
    model = evaluated[1].model
    assert isinstance(model, FusedPerShape)
    assert set(model._fused) == {tuple(x.shape) for x in evaluated[1].inputs} and len(model._fused) == 2
    assert fused['top1'] == pytest.approx(eager['top1'], abs=1e-4)


def test_reparam_fuses_the_branches_with_the_same_logits(image_folder, tmp_path, capsys):
    """repghostnet's re-parameterizable branches fold into one conv each: fewer parameters, the same outputs."""
    import timm
    torch.manual_seed(0)
    weights = _save_weights(timm.create_model('repghostnet_050', num_classes=3), tmp_path / 'w.pth')
    argv = [str(image_folder), '--model', 'repghostnet_050', '--checkpoint', weights, '--img-size', '32',
            '--workers', '0']
    assert run_validate(argv) == 0 and run_validate(argv + ['--reparam']) == 0
    (plain,), (reparam,) = _results(capsys)
    assert reparam['param_count'] < plain['param_count']
    assert reparam['loss'] == pytest.approx(plain['loss'], abs=1e-4) and reparam['top1'] == plain['top1']


def test_valid_labels_restrict_the_logits_to_those_classes_in_that_order(image_folder, tmp_path, capsys):
    """A 5-class model on 3-class data with --valid-labels 3 0 4 scores as the 3-class model whose head is
    rows 3, 0, 4 of its head."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=5)
    full = _save_weights(model, tmp_path / 'full.pth')
    head = model.pretrained_cfg['classifier']
    subset = {k: v[[3, 0, 4]] if k.startswith(head + '.') else v for k, v in model.state_dict().items()}
    torch.save(subset, tmp_path / 'subset.pth')
    (tmp_path / 'valid.txt').write_text('3\n0\n4\n')
    argv = [str(image_folder), '--model', 'test_resnet', '--img-size', '32', '--workers', '0']
    assert run_validate(argv + ['--checkpoint', full, '--num-classes', '5',
                                '--valid-labels', str(tmp_path / 'valid.txt')]) == 0
    assert run_validate(argv + ['--checkpoint', str(tmp_path / 'subset.pth')]) == 0
    (restricted,), (reference,) = _results(capsys)
    for key in ('top1', 'top5', 'loss'):
        assert restricted[key] == pytest.approx(reference[key], abs=1e-4), key


@pytest.mark.parametrize('text, message', [
    ('3\n0\n9\n', "line 3: '9' is not a class index of the model (0 to 4)"),
    ('3\nzero\n4\n', "line 2: 'zero' is not a class index"),
    ('3\n0\n', 'lists 2 classes but the 3-class data needs one line per class'),
])
def test_bad_valid_labels_are_one_line_and_exit_2(image_folder, tmp_path, error_lines, text, message):
    (tmp_path / 'valid.txt').write_text(text)
    assert run_validate([str(image_folder), '--model', 'test_resnet', '--num-classes', '5', '--img-size', '16',
                         '--workers', '0', '--valid-labels', str(tmp_path / 'valid.txt')]) == 2
    errors = error_lines()
    assert len(errors) == 1 and message in errors[0], errors


@pytest.mark.parametrize('average, expected', [
    ('micro', (4 / 6, 4 / 6, 4 / 6)),
    ('macro', (0.625, (2 / 3 + 0.5 + 1) / 4, 0.575)),
    ('weighted', (5 / 6, 4 / 6, 4.4 / 6)),
])
def test_class_scores_average_as_scikit_learn(average, expected):
    """Hand-computed with scikit-learn's definitions (zero_division=0): class 3 is only predicted, so it counts in
    the macro mean with recall 0 and weighs nothing in the weighted one."""
    from sdpgo_timm.runner.evaluation import class_scores
    targets, preds = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([0, 0, 1, 1, 3, 2])
    assert class_scores(preds, targets, average) == pytest.approx(expected, abs=1e-9)


def test_class_scores_match_scikit_learn_documentation_example():
    """precision_score / recall_score / f1_score docs: y_true [0, 1, 2, 0, 1, 2], y_pred [0, 2, 1, 0, 0, 1]."""
    from sdpgo_timm.runner.evaluation import class_scores
    targets, preds = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 2, 1, 0, 0, 1])
    assert class_scores(preds, targets, 'macro') == pytest.approx((0.2222, 0.3333, 0.2667), abs=1e-4)
    assert class_scores(preds, targets, 'weighted') == pytest.approx((0.2222, 0.3333, 0.2667), abs=1e-4)


def test_metrics_avg_reports_precision_recall_f1(sdpgo_run, tmp_path, capsys):
    """For single-label data micro precision, recall and F1 all equal top-1 accuracy."""
    argv = ['digits', '--checkpoint', str(sdpgo_run / 'last.pth.tar'), '--workers', '0']
    for average in ('micro', 'macro'):
        assert run_validate(argv + ['--metrics-avg', average, '--results-file', str(tmp_path / f'{average}.csv')]) == 0
    (micro,), (macro,) = _results(capsys)
    assert micro['micro_precision'] == micro['micro_recall'] == micro['micro_f1_score'] == micro['top1']
    assert 0 < macro['macro_f1_score'] <= 100 and 'macro_precision' in read_results(tmp_path / 'macro.csv')[0]


def _fail_above(max_batch, message='CUDA out of memory. Tried to allocate 2.00 GiB'):
    """A create_eval_model whose model raises torch.OutOfMemoryError on batches larger than `max_batch`."""
    import validate as script
    real = script.create_eval_model

    def create(*args, **kwargs):
        model = real(*args, **kwargs)

        def check(module, inputs):
            if inputs[0].shape[0] > max_batch:
                raise torch.OutOfMemoryError(message)
        model.register_forward_pre_hook(check)
        return model
    return create


def test_retry_decays_the_batch_size_until_it_fits(sdpgo_run, capsys, caplog, monkeypatch):
    import validate as script
    argv = ['digits', '--checkpoint', str(sdpgo_run / 'last.pth.tar'), '--workers', '0', '-b', '64']
    assert run_validate(argv) == 0
    monkeypatch.setattr(script, 'create_eval_model', _fail_above(16))
    assert run_validate(argv) == 6  # without --retry: one line naming the batch size
    error, = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
    assert error.startswith('error: out of memory at --batch-size 64 (')
    caplog.clear()
    assert run_validate(argv + ['--retry']) == 0
    (plain,), (retried,) = _results(capsys)
    assert retried['top1'] == plain['top1'] and retried['loss'] == pytest.approx(plain['loss'], abs=1e-4)
    retries = [r.getMessage() for r in caplog.records if 'retrying with batch size' in r.getMessage()]
    assert [m.rsplit(' ', 1)[-1] for m in retries] == ['48', '32', '24', '16']
    assert 'CUDA out of memory' in retries[0] and '\n' not in retries[0]


@pytest.mark.parametrize('message, tried', [('CUDA out of memory', 'down to batch size 1'),
                                            ('an illegal memory access was encountered', 'at batch size 4, not retried')])
def test_retry_that_never_fits_is_one_error_line_and_exit_1(sdpgo_run, tmp_path, capsys, error_lines, monkeypatch,
                                                            message, tried):
    import validate as script
    monkeypatch.setattr(script, 'create_eval_model', _fail_above(0, message))
    assert run_validate(['digits', '--checkpoint', str(sdpgo_run / 'last.pth.tar'), '--workers', '0', '-b', '4',
                         '--retry', '--results-file', str(tmp_path / 'r.csv')]) == 1
    errors = error_lines()
    assert len(errors) == 1 and tried in errors[0] and message in errors[0], errors
    assert _results(capsys) == [[]] and not (tmp_path / 'r.csv').exists()


@pytest.fixture(scope='module')
def naflex_weights(tmp_path_factory):
    """Random weights of a tiny 3-class NaFlex ViT (naflexvit_base_patch16_gap at width 32, depth 2)."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model('naflexvit_base_patch16_gap', num_classes=3, embed_dim=32, depth=2, num_heads=2)
    return _save_weights(model, tmp_path_factory.mktemp('naflex') / 'naflex.pth')


@pytest.mark.parametrize('loader', [[], ['--no-prefetcher']])
def test_naflex_loader_feeds_patch_sequences_of_max_seq_len(image_folder, naflex_weights, capsys, evaluated, loader):
    argv = [str(image_folder), '--model', 'naflexvit_base_patch16_gap', '--model-kwargs', 'embed_dim=32', 'depth=2',
            'num_heads=2', '--checkpoint', naflex_weights, '--naflex-loader', '--workers', '0', '-b', '8', *loader]
    for length in ('16', '4'):
        assert run_validate(argv + ['--naflex-max-seq-len', length]) == 0
    (long,), (short,) = _results(capsys)
    for record, length in zip(evaluated, (16, 4)):
        assert all(isinstance(x, dict) for x in record.inputs)
        assert {tuple(x['patches'].shape[1:]) for x in record.inputs} == {(length, 16 * 16 * 3)}
        assert sum(len(x['patch_valid']) for x in record.inputs) == 24  # every image of the split
    assert long['loss'] != short['loss']


def test_tf_preprocessing_decodes_the_files_bytes_in_timms_transform(image_folder, capsys, monkeypatch):
    """TensorFlow is not installed here: a stand-in for timm's TfPreprocessTransform (bytes in, CHW uint8 out)
    shows that the files' bytes reach it, at the evaluation size."""
    import io
    import types
    calls = []

    class TfPreprocessTransform:
        def __init__(self, is_training=False, size=224, interpolation='bicubic'):
            self.size = size[0] if isinstance(size, tuple) else size

        def __call__(self, image_bytes):
            calls.append((type(image_bytes), self.size))
            img = Image.open(io.BytesIO(image_bytes)).convert('RGB').resize((self.size, self.size))
            return np.rollaxis(np.array(img), 2)
    monkeypatch.setitem(sys.modules, 'timm.data.tf_preprocessing',
                        types.SimpleNamespace(TfPreprocessTransform=TfPreprocessTransform))
    assert run_validate([str(image_folder), '--model', 'test_resnet', '--img-size', '24', '--workers', '0',
                         '--tf-preprocessing']) == 0
    (result,), = _results(capsys)
    assert calls == [(bytes, 24)] * 24 and result['img_size'] == 24


def test_tf_preprocessing_without_tensorflow_is_one_line(image_folder, error_lines):
    assert run_validate([str(image_folder), '--model', 'test_resnet', '--workers', '0', '--tf-preprocessing']) == 2
    errors = error_lines()
    assert len(errors) == 1 and 'needs TensorFlow' in errors[0], errors
