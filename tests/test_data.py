import os

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_loader

import sdpgo_timm.data
from sdpgo_timm.data import DigitsDataset, apply_label_noise

DIGITS_FILE = os.path.join(os.path.dirname(sdpgo_timm.data.__file__), 'digits.npz')


def _rows(dataset):
    """(image pixels, clean label) rows of a split, sorted, to compare splits as multisets."""
    rows = np.concatenate([dataset.images.reshape(len(dataset), -1), dataset.clean_targets[:, None]], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def test_digits_sizes_and_samples():
    train, val = DigitsDataset('train'), DigitsDataset('validation')
    assert (len(train), len(val)) == (1438, 359)
    assert train.classes == [str(c) for c in range(10)]
    img, target = train[0]
    assert isinstance(img, Image.Image) and img.mode == 'RGB' and img.size == (8, 8)
    assert isinstance(target, int) and 0 <= target < 10
    assert max(np.asarray(img).max() for img, _ in (train[i] for i in range(50))) == 255


def test_digits_split_is_a_fixed_stratified_partition():
    train, val = DigitsDataset('train'), DigitsDataset('validation')
    again = DigitsDataset('train')
    np.testing.assert_array_equal(train.images, again.images)
    np.testing.assert_array_equal(train.targets, again.targets)
    # train + validation is exactly the whole file, no sample in both
    with np.load(DIGITS_FILE) as data:
        full = np.concatenate([data['images'].reshape(len(data['labels']), -1), data['labels'][:, None]], axis=1)
    union = np.concatenate([_rows(train), _rows(val)])
    np.testing.assert_array_equal(union[np.lexsort(union.T[::-1])], full[np.lexsort(full.T[::-1])])
    per_class = np.bincount(train.targets, minlength=10) + np.bincount(val.targets, minlength=10)
    np.testing.assert_array_equal(np.bincount(val.targets, minlength=10), np.round(0.2 * per_class))


def test_digits_bad_split_names_the_accepted_ones():
    with pytest.raises(ValueError, match="'train', 'validation'"):
        DigitsDataset('test')


@pytest.mark.parametrize('eta', [0.2, 0.4])
def test_symmetric_noise_exact_count_other_classes(eta):
    clean = np.random.RandomState(1).randint(0, 10, size=1000)
    noisy = apply_label_noise(clean, 10, eta, seed=3)
    changed = noisy != clean
    assert changed.sum() == round(eta * len(clean))
    assert noisy.dtype == np.int64 and noisy.min() >= 0 and noisy.max() < 10


def test_symmetric_noise_is_uniform_over_other_classes():
    clean = np.zeros(50000, dtype=np.int64)
    noisy = apply_label_noise(clean, 10, 0.9, seed=0)
    counts = np.bincount(noisy, minlength=10)
    assert counts[0] == 5000
    expected = 45000 / 9
    assert np.all(np.abs(counts[1:] - expected) < 0.05 * expected)


def test_asymmetric_noise_moves_each_class_to_the_next():
    clean = np.repeat(np.arange(5), [10, 20, 30, 40, 50])
    noisy = apply_label_noise(clean, 5, 0.3, seed=0, mode='asym')
    for c in range(5):
        members = clean == c
        moved = noisy[members] != c
        assert moved.sum() == round(0.3 * members.sum())
        assert np.all(noisy[members][moved] == (c + 1) % 5)


def test_label_noise_is_seeded_and_leaves_input_alone():
    clean = np.arange(200) % 10
    kept = clean.copy()
    a = apply_label_noise(clean, 10, 0.3, seed=7)
    np.testing.assert_array_equal(a, apply_label_noise(clean, 10, 0.3, seed=7))
    assert not np.array_equal(a, apply_label_noise(clean, 10, 0.3, seed=8))
    np.testing.assert_array_equal(clean, kept)
    np.testing.assert_array_equal(apply_label_noise(clean, 10, 0., seed=7), clean)


@pytest.mark.parametrize('eta', [-0.1, 1.0])
def test_label_noise_rate_out_of_range(eta):
    with pytest.raises(ValueError, match='0, 1'):
        apply_label_noise([0, 1, 2], 3, eta)


def test_digits_noisy_train_clean_validation():
    clean = DigitsDataset('train')
    noisy = DigitsDataset('train', label_noise=0.4, noise_seed=1)
    np.testing.assert_array_equal(noisy.clean_targets, clean.targets)
    assert (noisy.targets != noisy.clean_targets).sum() == round(0.4 * len(noisy))
    assert [noisy[i][1] for i in range(20)] == noisy.targets[:20].tolist()
    val = DigitsDataset('validation')
    np.testing.assert_array_equal(val.targets, val.clean_targets)
    with pytest.raises(ValueError, match='train split only'):
        DigitsDataset('validation', label_noise=0.2)
    with pytest.raises(ValueError, match='0, 1'):
        DigitsDataset('train', label_noise=1.0)


@pytest.mark.parametrize('use_prefetcher', [True, False])
def test_digits_through_timm_create_loader(use_prefetcher):
    loader = create_loader(
        DigitsDataset('train'),
        input_size=(3, 32, 32),
        batch_size=16,
        is_training=True,
        num_workers=0,
        device=torch.device('cpu'),
        use_prefetcher=use_prefetcher,
    )
    input, target = next(iter(loader))
    assert input.shape == (16, 3, 32, 32) and input.dtype == torch.float32
    assert target.shape == (16,) and target.dtype == torch.int64
    assert len(loader) == 1438 // 16
