"""timm's AugMix flags in train.py: --aug-splits, --jsd-loss, --split-bn, --resplit, and the ways they are refused."""
import pytest
import torch
from timm.layers import SplitBatchNorm2d
from timm.loss import JsdCrossEntropy

from sdpgo_timm.data import DigitsDataset
from sdpgo_timm.protocol import as_batch
from sdpgo_timm.runner.args import parse_args
from sdpgo_timm.runner.builders import create_train_loader, create_train_task
from sdpgo_timm.runner.checkpoint import load_checkpoint_file
from sdpgo_timm.runner.setup import create_timm_model
from conftest import FAST, run_train, run_validate, summary

DATA_CONFIG = dict(input_size=(3, 16, 16), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                   interpolation='bilinear', crop_pct=0.875)


def _args(*argv):
    args, _ = parse_args(['digits', *FAST, *argv])
    args.distributed, args.world_size, args.rank = False, 1, 0
    return args


def _batch(args, feed=None, number=0):
    loader = create_train_loader(args, DigitsDataset('train'), DATA_CONFIG, torch.device('cpu'), feed)
    batches = iter(loader)
    for _ in range(number):
        next(batches)
    return as_batch(next(batches))


@pytest.mark.parametrize('prefetcher', [True, False])
def test_aug_split_batches_hold_each_split_of_the_images_in_turn(prefetcher):
    """--aug-splits 3: 3 rows per image, split-major (clean rows, then each augmented copy), targets repeated;
    without augmentation to tell them apart the splits are the same images."""
    off = [] if prefetcher else ['--no-prefetcher']
    plain = _args('-b', '8', '--aug-splits', '3', '--color-jitter', '0', '--hflip', '0', *off)
    batch = _batch(plain)
    assert batch.input.shape == (24, 3, 16, 16)
    assert torch.equal(batch.target, batch.target[:8].repeat(3))
    clean, *augmented = batch.input.split(8)
    assert all(torch.equal(clean, copy) for copy in augmented)

    jittered = _batch(_args('-b', '8', '--aug-splits', '3', '--color-jitter', '0.4', '--hflip', '0', *off))
    clean, *augmented = jittered.input.split(8)
    assert not any(torch.equal(clean, copy) for copy in augmented)


def test_jsd_loss_is_timms_jsd_cross_entropy_over_the_splits():
    args = _args('--aug-splits', '3', '--jsd-loss', '--smoothing', '0.1')
    task = create_train_task(args, torch.nn.Linear(4, 10), None, torch.device('cpu'))
    assert isinstance(task.criterion, JsdCrossEntropy) and task.criterion.num_splits == 3
    assert not isinstance(create_train_task(_args('--aug-splits', '3'), torch.nn.Linear(4, 10), None,
                                            torch.device('cpu')).criterion, JsdCrossEntropy)


@pytest.mark.parametrize('argv, aux', [(['--aug-splits', '3'], 2), (['--resplit'], 1)])
def test_split_bn_converts_every_batchnorm_layer(argv, aux):
    """One aux BatchNorm per augmentation split after the first (two splits, the halves, with --resplit alone)."""
    model = create_timm_model(_args('--split-bn', *argv))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and not hasattr(m, 'aux_bn')]
    splits = [m for m in model.modules() if isinstance(m, SplitBatchNorm2d)]
    assert splits and all(len(m.aux_bn) == aux for m in splits)
    assert len(norms) == aux * len(splits)  # every BatchNorm left is an aux layer of a split one


def test_aug_splits_jsd_split_bn_train_and_evaluate(tmp_path):
    """A quarter of digits, batch 64: 5 steps of 64 images, 3 x 64 model rows each; validate.py rebuilds the split
    BatchNorm model from the checkpoint and scores it as training's evaluation did."""
    assert run_train(['digits', *FAST, '--epochs', '1', '--train-fraction', '0.25', '--aug-splits', '3',
                      '--jsd-loss', '--split-bn', '--output', str(tmp_path), '--experiment', 'augmix']) == 0
    row, = summary(tmp_path / 'augmix')
    assert int(row['train_steps']) == 5 and int(row['train_samples']) == 5 * 64 * 3
    state = load_checkpoint_file(str(tmp_path / 'augmix' / 'last.pth.tar'))['state_dict']
    assert 'bn1.aux_bn.1.running_mean' in state and 'bn1.aux_bn.2.running_mean' not in state
    results = tmp_path / 'results.json'
    assert run_validate(['digits', '--checkpoint', str(tmp_path / 'augmix' / 'last.pth.tar'), '--workers', '0',
                         '--results-file', str(results)]) == 0
    assert f"{float(row['eval_top1']):.4f}" in results.read_text()


def test_resplit_keeps_the_replay_half_clean_with_sdpgo():
    """--resplit with --sdpgo (views replay): random erasing spares the first half of each batch, the replayed
    views, and erases the fresh half (constant erasing writes exact zeros, which normalized digits never hold)."""
    def erased(batch):
        return [bool((row == 0).any()) for row in batch.input]

    args = _args('--sdpgo', '-b', '16', '--reprob', '1', '--remode', 'const')
    assert all(erased(_batch(args, 'views', number=1)))
    args.resplit = True
    batch = _batch(args, 'views', number=1)  # the epoch's first batch is a fresh half alone
    assert batch.fresh_start == 8 and erased(batch) == [False] * 8 + [True] * 8


def test_resplit_trains_with_sdpgo(tmp_path):
    """--resplit leaves SDPGO's batches as they are: 32 fresh images a step, the replay half distilled."""
    assert run_train(['digits', '--sdpgo', *FAST, '--epochs', '1', '--train-fraction', '0.25', '--resplit',
                      '--reprob', '0.5', '--output', str(tmp_path), '--experiment', 'resplit']) == 0
    row, = summary(tmp_path / 'resplit')
    assert int(row['train_samples']) == 32 * int(row['train_steps']) > 0 and float(row['train_loss_sil']) > 0


REFUSALS = {
    'one split': (['--aug-splits', '1'], '--aug-splits must be 0 (off) or >= 2'),
    'jsd without splits': (['--jsd-loss'], '--jsd-loss compares the augmentation splits'),
    'split bn without splits': (['--split-bn'], '--split-bn keeps BatchNorm layers per augmentation split'),
    'split bn and sync bn': (['--split-bn', '--aug-splits', '2', '--sync-bn'], 'does not combine with --sync-bn'),
    'split bn halves odd batch': (['--split-bn', '--resplit', '-b', '63'], '--batch-size 63 must be even'),
    'splits and mixup': (['--aug-splits', '3', '--mixup', '0.2'], '--aug-splits does not combine with --mixup'),
    'resplit without prefetcher': (['--resplit', '--reprob', '0.25', '--no-prefetcher'], 'drop --no-prefetcher'),
    'splits and sdpgo': (['--aug-splits', '3', '--jsd-loss', '--sdpgo'], '--aug-splits does not combine with --sdpgo'),
    'split bn and skd': (['--split-bn', '--resplit', '--skd', 'dlb'], '--split-bn does not combine with --skd dlb'),
}


@pytest.mark.parametrize('case', REFUSALS)
def test_augmix_refusals_are_one_line(case, tmp_path, error_lines):
    argv, message = REFUSALS[case]
    assert run_train(['digits', *FAST, '--epochs', '1', *argv, '--output', str(tmp_path / 'out')]) == 2
    errors = error_lines()
    assert len(errors) == 1 and '\n' not in errors[0] and message in errors[0], errors
    assert not (tmp_path / 'out').exists()
