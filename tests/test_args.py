""" Command lines of train.py and validate.py: timm's flag names, YAML/recipe defaults, benchmark names. """
import argparse
import re
from pathlib import Path

import pytest
import yaml

from sdpgo_timm.runner import args as args_module
from sdpgo_timm.runner.args import (
    ConfigError, create_parser, create_validate_parser, parse_args, parse_validate_args, resolve_eval_args)
from sdpgo_timm.data import benchmarks
from sdpgo_timm.data.benchmarks import BENCHMARKS, resolve_data_dir

TRAIN_FLAGS = (
    '--data-dir --dataset --train-split --val-split --num-classes --model --pretrained --pretrained-path '
    '--initial-checkpoint --model-kwargs --img-size --input-size --drop-path --grad-checkpointing --opt --lr '
    '--lr-base --weight-decay --momentum --clip-grad --grad-accum-steps --sched --epochs --warmup-epochs --aa '
    '--reprob --mixup --cutmix --smoothing --color-jitter --aug-repeats --amp --amp-dtype --channels-last '
    '--model-ema --sync-bn --torchcompile --resume --output --experiment --checkpoint-hist --log-interval --seed '
    '--workers --device --sdpgo --sdpgo-temperature --sdpgo-topk --sdpgo-beta --sdpgo-layers --sdpgo-alpha-mode '
    '--sdpgo-alpha --sdpgo-weighting --sdpgo-replay --skd --label-noise -b --batch-size -j -c --config').split()
VALIDATE_FLAGS = (
    '--data-dir --model --checkpoint --use-ema --pretrained --dataset --split -b --batch-size --img-size '
    '--input-size --crop-pct --mean --std --interpolation --num-classes --amp --amp-dtype --channels-last --device '
    '-j --workers --num-gpu --results-file --log-freq').split()


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize('flag', TRAIN_FLAGS)
def test_train_flag_has_timms_name(flag):
    assert flag in create_parser()._option_string_actions


@pytest.mark.parametrize('flag', VALIDATE_FLAGS)
def test_validate_flag_has_timms_name(flag):
    assert flag in create_validate_parser()._option_string_actions


def test_shared_flags_are_defined_alike():
    """A flag of both scripts means the same: one definition, same type, nargs and help."""
    train = create_parser()._option_string_actions
    for flag, action in create_validate_parser()._option_string_actions.items():
        if flag in train and flag not in ('-h', '--help', '--model', '-b', '--batch-size'):
            other = train[flag]
            assert (action.dest, action.type, action.nargs, action.help) == (
                other.dest, other.type, other.nargs, other.help), flag


def test_timm_defaults_without_recipe():
    args, _ = parse_args(['/some/folder'])
    assert (args.model, args.batch_size, args.opt, args.sched, args.epochs, args.smoothing) == (
        'resnet50', 128, 'sgd', 'cosine', 300, 0.1)
    assert args.sdpgo is False and args.sdpgo_topk == 2 and args.sdpgo_replay == 'auto'


def test_digits_recipe_sets_defaults():
    args, text = parse_args(['digits', '--model', 'test_resnet'])
    assert args.input_size == [3, 32, 32] and args.batch_size == 64 and args.lr == 0.05 and args.epochs == 8
    assert args.mean == [0.5, 0.5, 0.5] and args.crop_pct == 1.0 and args.smoothing == 0.0
    assert 'batch_size: 64' in text  # args.yaml records the resolved values


def test_model_recipe_wins_over_default_recipe(tmp_path, monkeypatch):
    (tmp_path / 'digits').mkdir()
    _write(tmp_path / 'digits' / 'default.yaml', 'batch_size: 32\nepochs: 3\n')
    _write(tmp_path / 'digits' / 'test_resnet.yaml', 'batch_size: 16\n')
    monkeypatch.setattr(benchmarks, 'HPARAMS_DIR', tmp_path)
    assert parse_args(['digits', '--model', 'test_resnet'])[0].batch_size == 16
    args, _ = parse_args(['digits', '--model', 'resnet18'])
    assert (args.batch_size, args.epochs) == (32, 3)


def test_yaml_config_sets_defaults_and_command_line_wins(tmp_path):
    config = _write(tmp_path / 'run.yaml', 'batch-size: 48\nsdpgo_topk: 3\nlr: 0.2\nsdpgo: true\n')
    args, _ = parse_args(['-c', config, 'digits', '--lr', '0.01'])
    assert (args.batch_size, args.sdpgo_topk, args.lr, args.sdpgo) == (48, 3, 0.01, True)
    assert args.input_size == [3, 32, 32]  # recipe keys the config does not set stay


def test_yaml_config_wins_over_recipe(tmp_path):
    config = _write(tmp_path / 'run.yaml', 'batch_size: 8\n')
    assert parse_args(['digits', '-c', config])[0].batch_size == 8


def test_unknown_yaml_key_names_key_and_file(tmp_path):
    config = _write(tmp_path / 'run.yaml', 'batch_size: 8\nsdpgo_tempreature: 2\n')
    with pytest.raises(ConfigError, match=r"\['sdpgo_tempreature'\].*run\.yaml"):
        parse_args(['digits', '-c', config])


@pytest.mark.parametrize('text, match', [
    ('batch_size: [1, 2\n', 'is not valid YAML'),
    ('- batch_size\n', 'must hold a mapping'),
])
def test_bad_yaml_is_one_line_error_naming_the_file(tmp_path, text, match):
    config = _write(tmp_path / 'bad.yaml', text)
    with pytest.raises(ConfigError, match=match) as info:
        parse_args(['digits', '-c', config])
    assert 'bad.yaml' in str(info.value) and '\n' not in str(info.value)


def test_missing_yaml_config(tmp_path):
    with pytest.raises(ConfigError, match='does not exist'):
        parse_args(['digits', '-c', str(tmp_path / 'none.yaml')])


def test_benchmark_names(tmp_path, monkeypatch):
    assert set(BENCHMARKS) >= {'digits', 'imagenet'}
    assert resolve_data_dir('digits', None) is None
    monkeypatch.setenv('IMAGENET_DIR', str(tmp_path))
    assert resolve_data_dir('imagenet', None) == str(tmp_path)
    other = tmp_path / 'other'
    other.mkdir()
    assert resolve_data_dir('imagenet', str(other)) == str(other)  # --data-dir wins over the variable
    assert resolve_data_dir(str(other), None) == str(other)  # a folder is a folder
    monkeypatch.delenv('IMAGENET_DIR')
    with pytest.raises(ValueError, match='IMAGENET_DIR'):
        resolve_data_dir('imagenet', None)
    monkeypatch.setenv('IMAGENET_DIR', str(tmp_path / 'missing'))
    with pytest.raises(ValueError, match='does not exist'):
        resolve_data_dir('imagenet', None)


def test_unknown_benchmark_lists_known_names():
    with pytest.raises(ValueError, match='known benchmarks: digits, fashion-mnist, imagenet'):
        resolve_data_dir('cifar1000', None)


def test_no_data_given():
    with pytest.raises(ValueError, match='no data given'):
        resolve_data_dir(None, None)


def test_validate_defaults_are_timms():
    args = parse_validate_args(['digits'])
    assert (args.split, args.batch_size, args.workers, args.num_gpu, args.model, args.checkpoint) == (
        'validation', 256, 4, 1, None, '')


def test_validate_results_file_must_be_csv_or_json():
    assert parse_validate_args(['digits', '--results-file', 'r.JSON']).results_file == 'r.JSON'
    with pytest.raises(ConfigError, match=r'\.csv or \.json'):
        parse_validate_args(['digits', '--results-file', 'r.txt'])


def test_eval_args_command_line_then_checkpoint_then_recipe():
    saved = argparse.Namespace(model='test_resnet', input_size=[3, 16, 16], num_classes=10, crop_pct=None,
                               mean=[0.1, 0.2, 0.3], bn_eps=1e-3, epochs=5)
    args = resolve_eval_args(parse_validate_args(['digits', '--mean', '0.4', '0.4', '0.4']), saved)
    assert args.model == 'test_resnet'
    assert args.input_size == [3, 16, 16] and args.num_classes == 10 and args.bn_eps == 1e-3  # checkpoint
    assert args.mean == [0.4, 0.4, 0.4]  # command line
    assert args.crop_pct == 1.0 and args.std == [0.5, 0.5, 0.5]  # digits recipe
    assert not hasattr(args, 'epochs')  # training-only options stay out


def test_eval_args_need_a_model():
    with pytest.raises(ConfigError, match='--model'):
        resolve_eval_args(parse_validate_args(['digits']), None)
    assert resolve_eval_args(parse_validate_args(['/data', '--model', 'resnet18'])).input_size is None


def test_eval_args_from_a_plain_dict():
    args = resolve_eval_args(parse_validate_args(['/data']), {'model': 'resnet18', 'img_size': 64})
    assert (args.model, args.img_size) == ('resnet18', 64)


def test_eval_input_size_options_come_from_one_source():
    """--img-size on the command line replaces the checkpoint's --input-size instead of conflicting with it."""
    saved = {'model': 'resnet18', 'input_size': [3, 16, 16], 'in_chans': 3}
    args = resolve_eval_args(parse_validate_args(['digits', '--img-size', '24']), saved)
    assert (args.img_size, args.input_size, args.in_chans) == (24, None, None)
    assert any({'img_size', 'input_size'} <= set(group) for group in args_module.EVAL_ARGS)


def test_opt_kwargs_keeps_timms_name_and_reaches_the_optimizer(tmp_path):
    """--opt-kwargs is saved as timm's `opt_kwargs` (so timm's args.yaml key reads back) and reaches the optimizer."""
    from sdpgo_timm.runner.args import parse_args
    args, text = parse_args(['digits', '--opt', 'adamw', '--opt-kwargs', 'betas=(0.8,0.95)'])
    assert args.opt_kwargs == {'betas': (0.8, 0.95)} and 'opt_kwargs:' in text and 'opt_args' not in text
    config = tmp_path / 'timm_args.yaml'
    config.write_text('opt_kwargs:\n  eps: 1.0e-06\n')
    assert parse_args(['digits', '-c', str(config)])[0].opt_kwargs == {'eps': 1e-06}
    import timm
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    optimizer = create_optimizer_v2(timm.create_model('test_resnet'), **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    assert optimizer.defaults['betas'] == (0.8, 0.95)


def test_validate_m_is_model_and_results_format_allows_any_file_name():
    args = parse_validate_args(['digits', '-m', 'resnet18', '--results-file', 'r.txt', '--results-format', 'json'])
    assert (args.model, args.results_format, args.naflex_max_seq_len) == ('resnet18', 'json', 576)
    assert parse_validate_args(['digits', '--amp', '--model-dtype', 'float32']).model_dtype == 'float32'


@pytest.mark.parametrize('argv, message', [
    (['--torchscript', '--torchcompile'], '--torchscript and --torchcompile exclude each other'),
    (['--aot-autograd', '--torchcompile', 'eager'], '--torchcompile and --aot-autograd exclude each other'),
    (['--amp', '--model-dtype', 'bfloat16'], '--amp needs a float32 model'),
    (['--naflex-loader', '--channels-last'], '--channels-last does not apply to the NaFlex loader'),
    (['--tf-preprocessing', '--no-prefetcher'], 'not with --no-prefetcher'),
    (['--tf-preprocessing', '--naflex-loader'], 'not with --naflex-loader'),
    (['--model-dtype', 'float64'], "invalid choice: 'float64'"),
    (['--fuser', 'nnc'], "invalid choice: 'nnc'"),
    (['--naflex-max-seq-len', '0'], '--naflex-max-seq-len must be >= 1'),
])
def test_validate_options_that_exclude_each_other_are_config_errors(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_validate_args(['digits', *argv])


def test_timm_args_yaml_is_accepted_unchanged():
    """`-c` takes the args.yaml timm's own train.py wrote (tests/data/timm_args.yaml, from commit aa4b5850c154, the
    `plain` case of benchmarks/timm_parity.py): every key is ours, with timm's value."""
    path = Path(__file__).parent / 'data' / 'timm_args.yaml'
    timm_args = yaml.safe_load(path.read_text())
    args, _ = parse_args(['-c', str(path)])
    assert {k: getattr(args, k) for k in timm_args} == timm_args


def test_our_args_yaml_uses_timms_key_names(tmp_path):
    """Our args.yaml holds every key of timm's, so timm's train.py -c reads ours; the keys only ours has are ours."""
    timm_keys = set(yaml.safe_load((Path(__file__).parent / 'data' / 'timm_args.yaml').read_text()))
    _, text = parse_args(['digits', '--sdpgo'])
    ours = set(yaml.safe_load(text))
    assert timm_keys <= ours
    ours_only = {'config', 'dist_backend', 'dist_url', 'push_to_hub', 'train_fraction', 'pad_crop', 'kd_checkpoint'}
    assert all(k.startswith(('sdpgo', 'pskd', 'skd', 'label_noise')) or k in ours_only
               for k in ours - timm_keys), sorted(ours - timm_keys)


@pytest.mark.parametrize('text, key, value', [
    ("mean: ['0.4', '0.5', '0.6']", 'mean', [0.4, 0.5, 0.6]),  # text that reads as numbers, in a list (argparse
    ("lr: '0.2'", 'lr', 0.2),                                    # converts a one-value default only)
    ('experiment: 2024', 'experiment', '2024'),                  # a number for a text option, as timm writes it
    ('train_split: 7', 'train_split', '7'),
])
def test_yaml_values_take_the_options_type(text, key, value, tmp_path):
    (tmp_path / 'c.yaml').write_text(text + '\n')
    args, _ = parse_args(['digits', '-c', str(tmp_path / 'c.yaml')])
    assert getattr(args, key) == value and type(getattr(args, key)) is type(value)
