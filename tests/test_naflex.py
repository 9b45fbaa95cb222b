"""timm's NaFlex loader in train.py (--naflex-*): dict batches of variable size, their loss scale, the refusals."""
import pytest
import timm
import torch
import torch.distributed as dist
from timm.data import create_dataset
from timm.task import ClassificationTask

from sdpgo_timm.protocol import as_batch
from sdpgo_timm.runner.args import parse_args
from sdpgo_timm.runner.builders import create_train_loader
from sdpgo_timm.runner.engine import LoopOptions, train_one_epoch
from sdpgo_timm.runner.errors import ConfigError
from sdpgo_timm.runner.batches import BatchLossScale
from sdpgo_timm.runner.naflex import check_naflex_args
from sdpgo_timm.runner.setup import create_eval_loader
from conftest import FOLDER_CLASSES, FOLDER_IMAGES, run_train, summary

# a tiny NaFlex ViT, random init: 8 px patches, so a 32 px image is at most 16 patches
MODEL = ['--model', 'naflexvit_base_patch16_gap', '--model-kwargs', 'embed_dim=32', 'depth=2', 'num_heads=2',
         'patch_size=8']
NAFLEX = ['--naflex-loader', '--naflex-train-seq-lens', '4', '16', '--naflex-max-seq-len', '16', '-b', '4',
          '--workers', '0', '--lr', '0.01', '--warmup-epochs', '0', '--log-interval', '1000']
DATA_CONFIG = dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation='bicubic', crop_pct=1.0)
NUM_TRAIN = len(FOLDER_CLASSES) * FOLDER_IMAGES


def _args(folder, *argv):
    args, _ = parse_args([str(folder), *MODEL, *NAFLEX, *argv])
    args.distributed, args.world_size, args.rank, args.num_classes = False, 1, 0, len(FOLDER_CLASSES)
    return args


def _model():
    return timm.create_model('naflexvit_base_patch16_gap', embed_dim=32, depth=2, num_heads=2, patch_size=8,
                             num_classes=len(FOLDER_CLASSES))


def test_naflex_trains_and_evaluates_a_naflex_vit(image_folder, tmp_path):
    assert run_train([str(image_folder), *MODEL, *NAFLEX, '--epochs', '2', '--output', str(tmp_path),
                      '--experiment', 'naflex']) == 0
    rows = summary(tmp_path / 'naflex')
    assert [int(r['train_samples']) for r in rows] == [NUM_TRAIN] * 2  # each image once an epoch, any batch sizes
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss'])
    assert all(0 <= float(r['eval_top1']) <= 100 and float(r['eval_loss']) > 0 for r in rows)
    model = _model()
    timm.models.load_checkpoint(model, str(tmp_path / 'naflex' / 'last.pth.tar'))


def test_naflex_loaders_yield_patch_dicts(image_folder):
    """Training: batches of 4- or 16-patch sequences whose size varies with the length, reordered each epoch;
    validation: every image as up to --naflex-max-seq-len patches of the model's size."""
    args = _args(image_folder)
    device = torch.device('cpu')
    dataset = create_dataset('', root=str(image_folder), split='train', is_training=True)
    loader = create_train_loader(args, dataset, DATA_CONFIG, device, None, model=_model())

    def epoch(number):
        loader.set_epoch(number)
        return [as_batch(b) for b in loader]

    first = epoch(0)
    assert len(first) == len(loader) and sum(len(b.target) for b in first) == NUM_TRAIN
    for batch in first:
        assert batch.input['patches'].shape[1:] == (batch.input['seq_len'], 8 * 8 * 3)
        assert batch.input['patches'].shape[0] == len(batch.target)
    assert {b.input['seq_len'] for b in first} == {4, 16}
    assert len({len(b.target) for b in first}) > 1
    second = epoch(1)
    assert [b.target.tolist() for b in second] != [b.target.tolist() for b in first]

    eval_set = create_dataset('', root=str(image_folder), split='validation', is_training=False)
    batch = as_batch(next(iter(create_eval_loader(args, eval_set, DATA_CONFIG, device, model=_model()))))
    assert batch.input['patches'].shape == (4, 16, 8 * 8 * 3) and batch.input['patch_valid'].all()


@pytest.mark.parametrize('mode, scale', [('linear', 4.0), ('sqrt', 2.0), ('none', 1.0)])
def test_loss_scale_modes(mode, scale):
    """A batch of 16 against --batch-size 4."""
    batch = dict(patches=torch.zeros(16, 4, 12))
    assert BatchLossScale(mode, reference=4)(batch) == pytest.approx(scale)


def test_loss_scale_under_ddp_weighs_each_rank_by_its_share_of_the_global_batch(monkeypatch):
    """This rank has 16 images, the other 8 (the all-reduce sums them): linear scale x world size x this rank's
    batch / the global batch of 24."""
    def all_reduce(total):
        total += 8

    monkeypatch.setattr(dist, 'all_reduce', all_reduce)
    scale = BatchLossScale('linear', reference=4, rank_share=True, world_size=2)(dict(patches=torch.zeros(16, 4, 12)))
    assert float(scale) == pytest.approx(16 / 4 * 2 * 16 / 24)


def test_train_one_epoch_scales_each_batch_loss_before_backward():
    """The same step with its loss scaled by 3 moves plain SGD's weights 3 times as far; the logged loss is
    the unscaled one."""
    def step(scale):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        start = model.weight.detach().clone()
        task = ClassificationTask(model, criterion=torch.nn.CrossEntropyLoss(), device=torch.device('cpu'))
        batches = [(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))]
        metrics = train_one_epoch(0, task, batches, torch.optim.SGD(model.parameters(), lr=0.1),
                                  LoopOptions(device=torch.device('cpu'), log_enabled=False, batch_loss_scale=scale))
        return model.weight.detach() - start, metrics['loss']

    plain, plain_loss = step(None)
    scaled, scaled_loss = step(lambda input: 3.0)
    torch.testing.assert_close(scaled, 3 * plain)
    assert scaled_loss == pytest.approx(plain_loss)


REFUSALS = {
    'sdpgo': (['--sdpgo'], '--naflex-loader does not combine with --sdpgo'),
    'skd': (['--skd', 'dlb'], '--naflex-loader does not combine with --skd dlb'),
    'aug splits': (['--aug-splits', '2'], '--aug-splits is not supported by the NaFlex loader'),
    'channels last': (['--channels-last'], '--channels-last does not apply to NaFlex'),
    'probs without sizes': (['--naflex-patch-size-probs', '1'], 'give those too'),
    'probs length': (['--naflex-patch-sizes', '8', '16', '--naflex-patch-size-probs', '1'], 'same length'),
    'not a naflex model': (['--model', 'test_resnet', '--model-kwargs'], "--model 'test_resnet' is not one"),
}


@pytest.mark.parametrize('case', REFUSALS)
def test_naflex_refusals_are_one_line(case, image_folder, tmp_path, error_lines):
    argv, message = REFUSALS[case]
    output = tmp_path / 'out'
    assert run_train([str(image_folder), *MODEL, *NAFLEX, '--epochs', '1', *argv, '--output', str(output)]) == 2
    errors = error_lines()
    assert len(errors) == 1 and '\n' not in errors[0] and message in errors[0], errors
    assert not output.exists()


@pytest.mark.parametrize('name, value, message', [
    ('train_img_sizes', [16, 32], '--naflex-loader and --train-img-sizes are alternative loader modes'),
    ('use_multi_epochs_loader', True, '--use-multi-epochs-loader is not supported with --naflex-loader'),
])
def test_naflex_refuses_the_other_loader_modes(image_folder, name, value, message):
    """The scheduled-resolution and multi-epochs loaders (flags of their own branch): read when present."""
    args = _args(image_folder)
    check_naflex_args(args)
    setattr(args, name, value)
    with pytest.raises(ConfigError, match=message):
        check_naflex_args(args)
