"""PWA's α against the labels a --label-noise run flipped: ROC AUC, per-sample α kept by the task, summary.csv."""
import itertools

import numpy as np
import pytest
import timm
import torch

from conftest import FAST, run_train, summary
from sdpgo_timm import SDPGOTask
from sdpgo_timm.data.noise import noisy_label_mask, roc_auc, weight_noise_metrics


def _pairwise_auc(scores, positive):
    """The AUC's definition, pair by pair: P(positive scores above negative), ties half."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize('seed', range(4))
def test_roc_auc_is_the_pairwise_probability_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (40,), generator=g).float() / 5  # many ties
    positive = torch.rand(40, generator=g) < 0.3
    assert roc_auc(scores, positive) == pytest.approx(_pairwise_auc(scores.tolist(), positive.tolist()))


def test_roc_auc_extremes_and_empty_groups():
    scores = torch.tensor([0.1, 0.2, 0.8, 0.9])
    assert roc_auc(scores, torch.tensor([False, False, True, True])) == 1.0
    assert roc_auc(scores, torch.tensor([True, True, False, False])) == 0.0
    assert roc_auc(torch.full((4,), 0.5), torch.tensor([True, False, True, False])) == 0.5
    assert np.isnan(roc_auc(scores, torch.zeros(4, dtype=torch.bool)))


def test_weight_noise_metrics_reads_the_flipped_samples_by_dataset_index():
    noisy = np.array([False, True, False, True, False])
    index = torch.tensor([4, 1, 0, 3])  # sample 2 not seen
    weight = torch.tensor([0.2, 0.9, 0.4, 0.7])
    m = weight_noise_metrics(index, weight, noisy)
    assert m['alpha_flipped'] == pytest.approx(0.8) and m['alpha_clean'] == pytest.approx(0.3)
    assert m['alpha_auc'] == 1.0


class _Noisy:
    def __init__(self, clean, targets):
        self.clean_targets, self.targets = np.array(clean), np.array(targets)


def test_noisy_label_mask_only_for_datasets_with_flipped_labels():
    assert noisy_label_mask(_Noisy([0, 1, 2], [0, 2, 2])).tolist() == [False, True, False]
    assert noisy_label_mask(_Noisy([0, 1, 2], [0, 1, 2])) is None  # no label changed
    assert noisy_label_mask(object()) is None  # a folder: no clean labels to compare with


@pytest.mark.parametrize('replay', ['views', 'tensors'])
def test_task_keeps_each_fresh_samples_alpha_with_its_index(replay):
    """Every fresh sample's α, as PWA set it in its step's backward, comes back once with its dataset index."""
    torch.manual_seed(0)
    task = SDPGOTask(timm.create_model('resnet18', num_classes=5), replay=replay, verbose=False)
    assert task.log_sample_weights()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, 32, 32, generator=g)
    y = torch.randint(0, 5, (12,), generator=g)
    alphas = []
    for step, fresh in enumerate([torch.arange(0, 4), torch.arange(4, 8), torch.arange(8, 12)]):
        rows = fresh if replay == 'tensors' or step == 0 else torch.cat([fresh - 4, fresh])
        task(x[rows], y[rows], index=rows)['loss'].backward()
        alphas.append(task.cache.alpha.clone())
    index, alpha = task.sample_weights()
    assert index.tolist() == list(range(12))
    torch.testing.assert_close(alpha, torch.cat(alphas))
    assert [len(t) for t in task.sample_weights()] == [0, 0]  # each α is reported once


def test_fixed_alpha_keeps_no_sample_weights():
    task = SDPGOTask(timm.create_model('resnet18', num_classes=5), alpha_mode='fixed', verbose=False)
    assert not task.log_sample_weights() and task.sample_weights() is None


def test_label_noise_run_logs_alpha_of_flipped_and_clean_samples(tmp_path):
    assert run_train(['digits', '--sdpgo', '--epochs', '2', '--label-noise', '0.4', *FAST,
                      '--output', str(tmp_path), '--experiment', 'noisy']) == 0
    rows = summary(tmp_path / 'noisy')
    assert len(rows) == 2
    for row in rows:
        assert 0.0 <= float(row['train_alpha_auc']) <= 1.0
        assert 0.0 <= float(row['train_alpha_flipped']) <= 1.0 and 0.0 <= float(row['train_alpha_clean']) <= 1.0
    # a clean run has no flipped labels to score α against
    assert run_train(['digits', '--sdpgo', '--epochs', '1', *FAST, '--output', str(tmp_path),
                      '--experiment', 'clean']) == 0
    assert 'train_alpha_auc' not in summary(tmp_path / 'clean')[0]
