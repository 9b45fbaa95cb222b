"""`python -m sdpgo_timm.data export`: an in-memory benchmark (or some of its classes) written as an ImageFolder
that timm reads back to the same pixels and labels, and the fine-tuning study that is built on it."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, ROOT, run_train
from sdpgo_timm.data.digits import DigitsDataset
from sdpgo_timm.runner.checkpoint import load_checkpoint_file
from sdpgo_timm.data.export import choose_indices, class_folder_name, export_image_folder


def test_class_folders_sort_in_label_order_and_name_the_class():
    names = [class_folder_name(i, n) for i, n in enumerate(['T-shirt/top', 'Trouser', 'Ankle boot'])]
    assert names == ['0_t_shirt_top', '1_trouser', '2_ankle_boot']
    # timm's ImageFolder sorts folder names naturally: label order survives ten and more classes
    from timm.utils import natural_key
    many = [class_folder_name(i, 'x') for i in range(12)]
    assert sorted(many, key=natural_key) == many


def test_choose_indices_keeps_the_classes_and_draws_per_class_by_seed():
    labels = np.repeat(np.arange(4), 10)
    every = choose_indices(labels, [1, 3], None, seed=0)
    assert set(labels[every]) == {1, 3} and len(every) == 20
    some = choose_indices(labels, [1, 3], 4, seed=0)
    assert np.bincount(labels[some], minlength=4).tolist() == [0, 4, 0, 4]
    assert np.array_equal(some, choose_indices(labels, [1, 3], 4, seed=0))
    assert not np.array_equal(some, choose_indices(labels, [1, 3], 4, seed=1))
    with pytest.raises(ValueError, match='class 1 has 10 images, fewer than --train-per-class 11'):
        choose_indices(labels, [1, 3], 11, seed=0)


def test_export_round_trips_pixels_and_labels_through_timms_reader(tmp_path):
    from timm.data import create_dataset
    out = tmp_path / 'digits'
    record = export_image_folder('digits', str(out), classes=[3, 5, 8], train_per_class=7, seed=1)
    assert sorted(p.name for p in out.iterdir()) == ['export.json', 'train', 'validation']
    assert json.loads((out / 'export.json').read_text()) == record
    assert record['classes'] == {'3_3': 3, '5_5': 5, '8_8': 8}
    assert record['splits']['train'] == {'3_3': 7, '5_5': 7, '8_8': 7}
    validation = DigitsDataset('validation')
    kept = np.isin(validation.clean_targets, [3, 5, 8])
    assert sum(record['splits']['validation'].values()) == kept.sum()  # evaluation splits keep every image
    for split, source in (('train', DigitsDataset('train')), ('validation', validation)):
        dataset = create_dataset('', root=str(out), split=split)
        assert dataset.reader.class_to_idx == {'3_3': 0, '5_5': 1, '8_8': 2}
        for path, target in dataset.reader.samples:
            index = int(path.rsplit('/', 1)[1].split('.')[0])  # the file is named by its index in the split
            assert [3, 5, 8][target] == source.clean_targets[index]
            assert np.array_equal(np.asarray(Image.open(path)), source.images[index])


@pytest.mark.parametrize('kwargs, match', [
    (dict(benchmark='imagenet'), "cannot export 'imagenet'"),
    (dict(classes=[3]), 'give 2 or more distinct class indices in 0..9'),
    (dict(classes=[3, 3]), 'give 2 or more distinct class indices'),
    (dict(classes=[3, 10]), 'give 2 or more distinct class indices in 0..9'),
    (dict(splits=['test']), '--splits test: each of train, validation at most once'),
    (dict(train_per_class=0), '--train-per-class must be >= 1'),
    (dict(train_per_class=10 ** 6), 'fewer than --train-per-class'),
])
def test_bad_export_is_one_error_and_leaves_nothing(tmp_path, kwargs, match):
    out = tmp_path / 'out'
    with pytest.raises(ValueError, match=match):
        export_image_folder(**{'benchmark': 'digits', 'out': str(out), **kwargs})
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy


def test_cli_exports_once_then_refuses_an_existing_folder(tmp_path):
    out = tmp_path / 'd'
    command = [sys.executable, '-m', 'sdpgo_timm.data', 'export', 'digits', str(out), '--classes', '0', '1',
               '--train-per-class', '5']
    first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    assert f'{out}/train: 10 images in 2 classes' in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [f"error: {str(out)!r} exists; export into a new folder (or remove "
                                                 "it first)"]


def test_train_py_trains_on_an_exported_class_subset(tmp_path):
    out = tmp_path / 'digits'
    export_image_folder('digits', str(out), classes=[0, 1, 2, 3], train_per_class=20)
    assert run_train([str(out), *FAST, '--epochs', '1', '--batch-size', '16', '--sdpgo', '--output', str(tmp_path),
                      '--experiment', 'run']) == 0
    checkpoint = load_checkpoint_file(str(tmp_path / 'run' / 'last.pth.tar'))
    assert checkpoint['classes'] == ['0_0', '1_1', '2_2', '3_3']  # the folder's classes, in label order
    assert checkpoint['state_dict']['fc.weight'].shape[0] == 4  # a head of its 4 classes, not digits' ten
