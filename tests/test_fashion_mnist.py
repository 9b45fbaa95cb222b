"""The fashion-mnist benchmark: IDX reading and checks, splits, noise, data fraction, pad-and-crop,
train.py / validate.py on generated IDX files, and one smoke test on the real files."""
import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdpgo_timm.runner.args import ConfigError, parse_args
from sdpgo_timm.data import fashion_mnist
from sdpgo_timm.data.fashion_mnist import CLASSES, FILES, FLIP_MAP, FashionMNISTDataset
from conftest import run_train, run_validate, summary

# fast fashion-mnist runs: a 1 % stratified share (550 images) of the training split, 1 epoch, quiet
FAST = ['--model', 'test_resnet', '--train-fraction', '0.01', '--epochs', '1', '--workers', '0',
        '--warmup-epochs', '0', '--log-interval', '1000', '--batch-size', '32']


def _idx(path: Path, array: np.ndarray) -> None:
    header = b'\x00\x00\x08' + bytes([array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    with gzip.open(path, 'wb', compresslevel=1) as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _write_fake(root: Path) -> None:
    """Full-size IDX files whose images show their class: a bright band at a class-specific row, on noise."""
    rng = np.random.RandomState(0)
    for part, (images_file, labels_file, count) in FILES.items():
        labels = np.arange(count) % 10
        rng.shuffle(labels)
        images = rng.randint(0, 40, size=(count, 28, 28)).astype(np.uint8)
        for c in range(10):
            images[labels == c, 2 + 2 * c:5 + 2 * c, 4:24] = 255
        _idx(root / images_file, images)
        _idx(root / labels_file, labels)


@pytest.fixture(scope='session')
def fake_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('fashion')
    _write_fake(root)
    return root


@pytest.fixture
def fake_env(fake_dir, monkeypatch) -> Path:
    monkeypatch.setenv('FASHION_MNIST_DIR', str(fake_dir))
    return fake_dir


def test_splits_partition_the_files_stratified(fake_dir):
    train, val = FashionMNISTDataset('train', root=str(fake_dir)), FashionMNISTDataset('validation', root=str(fake_dir))
    trainval = FashionMNISTDataset('trainval', root=str(fake_dir))
    test = FashionMNISTDataset('test', root=str(fake_dir))
    assert (len(train), len(val), len(trainval), len(test)) == (55000, 5000, 60000, 10000)
    np.testing.assert_array_equal(np.bincount(val.targets), [500] * 10)
    # train and validation are disjoint and together are the training file, in its order
    images = np.concatenate([train.images, val.images])
    order = np.lexsort(images.reshape(len(images), -1).T)
    full = trainval.images.reshape(60000, -1)
    np.testing.assert_array_equal(images.reshape(60000, -1)[order], full[np.lexsort(full.T)])
    assert train.classes == list(CLASSES) and train.num_classes == 10
    img, target = test[3]
    assert isinstance(img, Image.Image) and img.mode == 'RGB' and img.size == (28, 28)
    assert target == int(test.targets[3]) and np.asarray(img)[2 + 2 * target, 10, 0] == 255


def test_data_folder_comes_from_argument_then_variable_then_debian(fake_dir, tmp_path, monkeypatch):
    monkeypatch.delenv('FASHION_MNIST_DIR', raising=False)
    monkeypatch.setattr(fashion_mnist, 'DEBIAN_DIR', str(fake_dir))
    assert fashion_mnist.fashion_mnist_dir() == str(fake_dir)
    monkeypatch.setenv('FASHION_MNIST_DIR', str(tmp_path))
    with pytest.raises(ValueError, match='lacks train-images-idx3-ubyte.gz'):
        fashion_mnist.fashion_mnist_dir()
    assert fashion_mnist.fashion_mnist_dir(str(fake_dir)) == str(fake_dir)


def test_missing_data_names_the_package_and_the_variable(tmp_path):
    with pytest.raises(ValueError) as error:
        FashionMNISTDataset('train', root=str(tmp_path))
    message = str(error.value)
    assert 'apt-get install dataset-fashion-mnist' in message and 'FASHION_MNIST_DIR' in message
    assert '\n' not in message


@pytest.mark.parametrize('damage, message', [
    ('truncate', 'damaged or truncated'),
    ('count', r'shape \(59999, 28, 28\), expected .* of shape \(60000, 28, 28\)'),
    ('not_gzip', 'cannot be read'),
])
def test_damaged_files_are_refused(fake_dir, tmp_path, damage, message):
    for name in os.listdir(fake_dir):
        os.symlink(fake_dir / name, tmp_path / name)
    target = tmp_path / 'train-images-idx3-ubyte.gz'
    target.unlink()
    data = gzip.open(fake_dir / 'train-images-idx3-ubyte.gz').read()
    if damage == 'truncate':
        target.write_bytes(gzip.compress(data, 1)[:-5000])
    elif damage == 'count':
        _idx(target, np.frombuffer(data, np.uint8, offset=16).reshape(60000, 28, 28)[:59999])
    else:
        target.write_bytes(data[:1000])
    with pytest.raises(ValueError, match=message):
        FashionMNISTDataset('train', root=str(tmp_path))


def test_asym_noise_flips_only_the_confusable_pairs(fake_dir):
    noisy = FashionMNISTDataset('train', root=str(fake_dir), label_noise=0.4, noise_mode='asym', noise_seed=3)
    flipped = noisy.targets != noisy.clean_targets
    np.testing.assert_array_equal(noisy.targets[flipped], np.asarray(FLIP_MAP)[noisy.clean_targets[flipped]])
    per_class = np.bincount(noisy.clean_targets[flipped], minlength=10)
    assert per_class.tolist() == [2200, 0, 2200, 0, 2200, 2200, 2200, 2200, 0, 0]  # 40 % of 5,500 in 6 classes
    assert sorted(FLIP_MAP) == list(range(10)) and all(FLIP_MAP[FLIP_MAP[c]] == c for c in range(10))
    with pytest.raises(ValueError, match='training splits only'):
        FashionMNISTDataset('test', root=str(fake_dir), label_noise=0.2)


def test_fraction_is_a_fixed_stratified_share(fake_dir):
    quarter = FashionMNISTDataset('train', root=str(fake_dir), fraction=0.25)
    again = FashionMNISTDataset('train', root=str(fake_dir), fraction=0.25, label_noise=0.2, noise_seed=5)
    assert len(quarter) == 13750 and np.bincount(quarter.targets).tolist() == [1375] * 10
    np.testing.assert_array_equal(quarter.images, again.images)  # the noise seed does not move the share
    assert (again.targets != again.clean_targets).sum() == round(0.2 * 13750)


def test_pad_crop_shifts_the_image_within_its_padding(fake_dir):
    plain = FashionMNISTDataset('test', root=str(fake_dir))
    padded = FashionMNISTDataset('test', root=str(fake_dir), pad_crop=4)
    original = np.asarray(plain[0][0])[..., 0]
    crops = [np.asarray(padded[0][0])[..., 0] for _ in range(20)]
    assert all(c.shape == (28, 28) for c in crops)
    assert any(not np.array_equal(c, original) for c in crops)
    for crop in crops:  # every crop is the image shifted by at most 4 pixels, zeros filling the border
        canvas = np.pad(original, 4)
        assert any(np.array_equal(crop, canvas[y:y + 28, x:x + 28]) for y in range(9) for x in range(9))


def test_recipe_is_pad_crop_and_flip_at_28px(fake_env):
    args, _ = parse_args(['fashion-mnist', '--model', 'resnet18'])
    assert args.pad_crop == 4 and args.hflip == 0.5 and args.scale == [1.0, 1.0] and args.ratio == [1.0, 1.0]
    assert args.input_size == [3, 28, 28] and args.val_split == 'validation'


@pytest.mark.parametrize('argv, message', [
    (['--train-fraction', '0'], r'--train-fraction must be in \(0, 1\]'),
    (['--train-fraction', '1.5'], r'--train-fraction must be in \(0, 1\]'),
    (['--pad-crop', '-1'], '--pad-crop must be >= 0'),
])
def test_bad_fraction_or_padding_is_a_config_error(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(['fashion-mnist', *argv])


def test_train_and_validate_on_generated_files(fake_env, tmp_path, capsys):
    """SDPGO (views replay), PS-KD and CE train on a 1 % share with noise; validate.py scores the test split."""
    for method in (['--sdpgo'], ['--skd', 'pskd'], []):
        name = method[-1].strip('-') if method else 'ce'
        assert run_train(['fashion-mnist', *FAST, *method, '--label-noise', '0.2', '--label-noise-mode', 'asym',
                          '--output', str(tmp_path), '--experiment', name]) == 0
        row, = summary(tmp_path / name)
        assert int(row['train_samples']) == 550 // 16 * 16 if method == ['--sdpgo'] else 550 // 32 * 32
    capsys.readouterr()
    assert run_validate(['fashion-mnist', '--checkpoint', str(tmp_path / 'sdpgo' / 'last.pth.tar'), '--split', 'test',
                         '--workers', '0']) == 0
    out = capsys.readouterr().out
    assert "'split': 'test'" in out or '"split": "test"' in out


def test_folder_data_refuses_in_memory_options(image_folder, tmp_path, error_lines):
    assert run_train([str(image_folder), '--model', 'test_resnet', '--train-fraction', '0.5', '--epochs', '1',
                      '--output', str(tmp_path)]) == 2
    assert any('--train-fraction is supported on the in-memory benchmarks only' in m for m in error_lines())


REAL_LABEL_SHA256 = {  # of the decompressed label files of Zalando's release (Debian's dataset-fashion-mnist)
    'train-labels-idx1-ubyte.gz': 'bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9',
    't10k-labels-idx1-ubyte.gz': '0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34',
}


def _real_dir() -> str:
    try:
        return fashion_mnist.fashion_mnist_dir()
    except ValueError as e:
        if os.environ.get('CI'):
            raise AssertionError(f"CI must install the real data: {e}") from None
        pytest.skip(f"real Fashion-MNIST not installed: {e}")


def test_real_files_smoke(tmp_path, monkeypatch):
    """The installed files read as Zalando's (counts, balance, pixel statistics), and a short run learns them."""
    root = _real_dir()
    for name, digest in REAL_LABEL_SHA256.items():
        assert hashlib.sha256(gzip.open(os.path.join(root, name)).read()).hexdigest() == digest, name
    monkeypatch.setenv('FASHION_MNIST_DIR', root)
    train, test = FashionMNISTDataset('trainval'), FashionMNISTDataset('test')
    assert np.bincount(train.targets).tolist() == [6000] * 10 and np.bincount(test.targets).tolist() == [1000] * 10
    assert train.images.mean() / 255 == pytest.approx(0.2860, abs=1e-4)
    assert train.images.std() / 255 == pytest.approx(0.3530, abs=1e-4)
    assert run_train(['fashion-mnist', '--model', 'test_resnet', '--train-fraction', '0.05', '--epochs', '2',
                      '--workers', '0', '--warmup-epochs', '0', '--log-interval', '1000', '--sdpgo',
                      '--output', str(tmp_path), '--experiment', 'real']) == 0
    rows = summary(tmp_path / 'real')
    assert float(rows[-1]['eval_top1']) > 50  # 10 classes: chance is 10 %
