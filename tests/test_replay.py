import io

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import Mixup
from timm.data.mixup import mixup_target
from torch.utils.data import Dataset

from sdpgo_timm.data.replay import ReplayBatchSampler, ReplayMixup, create_replay_loader


def _fresh(batch, sampler):
    return batch[len(batch) - sampler.fresh_size:]


def _replay(batch, sampler):
    return batch[:len(batch) - sampler.fresh_size]


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


# ---- ReplayBatchSampler ----

def test_odd_batch_size_names_the_flag():
    with pytest.raises(ValueError, match='--batch-size'):
        ReplayBatchSampler(100, 7, num_replicas=1, rank=0)


def test_every_fresh_index_exactly_once_per_epoch():
    sampler = ReplayBatchSampler(48, 8, num_replicas=1, rank=0)
    for epoch in range(3):
        batches = _epoch(sampler, epoch)
        assert len(batches) == len(sampler) == 12
        fresh = [i for b in batches for i in _fresh(b, sampler)]
        assert sorted(fresh) == list(range(48))
        assert all(len(b) == 8 for b in batches[1 if epoch == 0 else 0:])


@pytest.mark.parametrize('num_replicas', [2, 3])
@pytest.mark.parametrize('drop_last', [True, False])
def test_ranks_disjoint_and_equal_length(num_replicas, drop_last):
    samplers = [
        ReplayBatchSampler(50, 6, num_replicas=num_replicas, rank=r, seed=5, drop_last=drop_last)
        for r in range(num_replicas)]
    for epoch in range(2):
        per_rank = [[i for b in _epoch(s, epoch) for i in _fresh(b, s)] for s in samplers]
        assert len({len(s) for s in samplers}) == 1
        assert len({len(f) for f in per_rank}) == 1
        covered = set().union(*per_rank)
        if drop_last:
            assert all(len(set(f)) == len(f) for f in per_rank)
            assert len(covered) == sum(len(f) for f in per_rank) == len(samplers[0]) * 3 * num_replicas
        else:
            assert covered == set(range(50))


def test_replay_half_is_previous_fresh_half_across_epochs():
    sampler = ReplayBatchSampler(40, 8, num_replicas=1, rank=0, seed=1)
    stream = _epoch(sampler, 0) + _epoch(sampler, 1) + _epoch(sampler, 2)
    assert len(stream[0]) == 4  # the very first step has nothing to replay
    for prev, batch in zip(stream, stream[1:]):
        assert _replay(batch, sampler) == _fresh(prev, sampler)


def test_order_reproducible_from_seed_and_epoch():
    a = ReplayBatchSampler(64, 8, num_replicas=1, rank=0, seed=3)
    b = ReplayBatchSampler(64, 8, num_replicas=1, rank=0, seed=3)
    assert _epoch(a, 4) == _epoch(b, 4) == list(b)
    assert _epoch(a, 4) != _epoch(a, 5)
    assert _epoch(a, 4) != _epoch(ReplayBatchSampler(64, 8, num_replicas=1, rank=0, seed=4), 4)


@pytest.mark.parametrize('epoch,step', [(0, 3), (2, 1), (2, 0)])
def test_mid_epoch_resume_yields_remaining_batches(epoch, step):
    full = _epoch(ReplayBatchSampler(60, 10, num_replicas=2, rank=1, seed=2), epoch)
    resumed = ReplayBatchSampler(60, 10, num_replicas=2, rank=1, seed=2)
    resumed.load_state_dict({'epoch': epoch, 'start_step': step})
    assert resumed.state_dict() == {'epoch': epoch, 'start_step': step}
    resumed.set_epoch(epoch)  # a train loop calls this at the start of every epoch
    assert list(resumed) == full[step:]
    assert list(resumed) == full  # the start step applies once
    resumed.start_at(step)
    resumed.set_epoch(epoch + 1)  # ...and only to the epoch it was given for
    assert list(resumed) == _epoch(ReplayBatchSampler(60, 10, num_replicas=2, rank=1, seed=2), epoch + 1)


def test_default_replicas_without_distributed():
    sampler = ReplayBatchSampler(20, 4)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)


# ---- create_replay_loader ----

class _IndexImages(Dataset):
    """Image i is filled with the value i, its target is i % 10."""

    def __init__(self, n=24):
        self.n = n
        self.transform = None

    def __getitem__(self, index):
        img = Image.new('RGB', (8, 8), (index, index, index))
        if self.transform is not None:
            img = self.transform(img)
        return img, index % 10

    def __len__(self):
        return self.n


@pytest.mark.parametrize('use_prefetcher,num_workers', [(True, 0), (False, 0), (True, 1)])
def test_loader_yields_input_target_index(use_prefetcher, num_workers):
    loader = create_replay_loader(
        _IndexImages(), (3, 8, 8), 6, no_aug=True, mean=(0., 0., 0.), std=(1., 1., 1.),
        use_prefetcher=use_prefetcher, num_workers=num_workers, seed=4)
    loader.set_epoch(1)
    expected = list(loader.sampler)
    batches = list(loader)
    assert len(batches) == len(loader) == len(expected) == 8
    for (input, target, index, fresh_start), indices in zip(batches, expected):
        assert fresh_start == len(indices) - 3  # the 3 fresh rows come after the replayed ones
        assert input.shape == (6, 3, 8, 8) and input.dtype == torch.float32
        assert index.dtype == torch.int64 and index.tolist() == indices
        assert torch.equal((input[:, 0, 0, 0] * 255).round().long(), index)
        assert torch.equal(target, index % 10)
    loader.set_epoch(2)  # the next pass follows the new epoch, persistent workers or not
    assert [batch.index.tolist() for batch in loader] == _epoch(loader.sampler, 2)


def test_loader_prefetcher_normalizes_and_erases_like_timm():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    kwargs = dict(no_aug=True, mean=mean, std=std, num_workers=0)
    loader = create_replay_loader(_IndexImages(), (3, 16, 16), 4, **kwargs)
    input, _, index, _ = next(iter(loader))
    pixel = index.float().view(-1, 1, 1, 1)
    expected = (pixel - torch.tensor(mean).view(1, 3, 1, 1) * 255) / (torch.tensor(std).view(1, 3, 1, 1) * 255)
    torch.testing.assert_close(input, expected.expand_as(input))
    # no_aug turns random erasing off, as in timm; with augmentation every image gets erased to 0
    erased = create_replay_loader(_IndexImages(), (3, 16, 16), 4, re_prob=1., scale=(1., 1.), ratio=(1., 1.),
                                  hflip=0., color_jitter=0., mean=mean, std=std, num_workers=0)
    input = next(iter(erased)).input
    assert all((img == 0).all(0).any() for img in input)
    assert not (next(iter(loader))[0] == 0).any()


def test_loader_state_resumes_mid_epoch():
    kwargs = dict(no_aug=True, num_workers=0, seed=9)
    loader = create_replay_loader(_IndexImages(), (3, 8, 8), 4, **kwargs)
    loader.set_epoch(2)
    full = [batch.index.tolist() for batch in loader]
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    assert state == {'epoch': 2, 'start_step': 5}
    resumed = create_replay_loader(_IndexImages(), (3, 8, 8), 4, **kwargs)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert [batch.index.tolist() for batch in resumed] == full[5:]
    assert resumed.state_dict() == {'epoch': 3, 'start_step': 0}


# ---- ReplayMixup ----

MIX_CONFIGS = {
    'mixup': dict(mixup_alpha=1., cutmix_alpha=0.),
    'cutmix': dict(mixup_alpha=0., cutmix_alpha=1.),
    'switch': dict(mixup_alpha=0.8, cutmix_alpha=1., switch_prob=0.5),
}


def _mixup(cls, mode, config, **kwargs):
    return cls(mode=mode, num_classes=10, label_smoothing=0.1, **MIX_CONFIGS[config], **kwargs)


def _images(n, seed, size=16):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
@pytest.mark.parametrize('config', list(MIX_CONFIGS))
def test_fresh_half_mixed_like_timm(mode, config):
    x, target = _images(8, 0), torch.arange(8)
    np.random.seed(11)
    expected_x, expected_target = _mixup(Mixup, mode, config)(x.clone(), target)
    np.random.seed(11)
    mixed_x, mixed_target = _mixup(ReplayMixup, mode, config)(x.clone(), target, replay_size=0)
    assert torch.equal(mixed_x, expected_x) and torch.equal(mixed_target, expected_target)


@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
@pytest.mark.parametrize('config', ['mixup', 'cutmix'])
def test_replay_half_remixed_like_its_fresh_half(mode, config):
    np.random.seed(0)
    mixup = _mixup(ReplayMixup, mode, config)
    fresh, fresh_target = _images(6, 1), torch.tensor([0, 1, 2, 3, 4, 5])
    first_x, first_target = mixup(fresh.clone(), fresh_target, replay_size=0)
    assert not torch.equal(first_x, fresh)  # something was mixed
    x = torch.cat([fresh, _images(6, 2)])
    target = torch.cat([fresh_target, torch.tensor([6, 7, 8, 9, 0, 1])])
    second_x, second_target = mixup(x, target, replay_size=6)
    assert torch.equal(second_x[:6], first_x)
    assert torch.equal(second_target[:6], first_target)


@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
def test_mixing_never_crosses_halves(mode):
    mixup = ReplayMixup(mode=mode, mixup_alpha=0.8, cutmix_alpha=1., num_classes=10, label_smoothing=0.)
    np.random.seed(2)
    for step in range(4):
        replay_size = 0 if step == 0 else 8
        replay, fresh = _images(replay_size, step).abs() + 1, -_images(8, step + 10).abs() - 1
        target = torch.cat([torch.randint(0, 5, (replay_size,)), torch.randint(5, 10, (8,))])
        x, y = mixup(torch.cat([replay, fresh]), target, replay_size=replay_size)
        assert (x[:replay_size] > 0).all() and (x[replay_size:] < 0).all()
        assert (y[:replay_size, 5:] == 0).all() and (y[replay_size:, :5] == 0).all()


def test_disabled_mixup_leaves_fresh_half_but_remixes_replay():
    np.random.seed(3)
    mixup = _mixup(ReplayMixup, 'elem', 'switch')
    fresh, target = _images(4, 0), torch.tensor([1, 2, 3, 4])
    first_x, first_target = mixup(fresh.clone(), target)
    mixup.mixup_enabled = False
    new = _images(4, 1)
    x, y = mixup(torch.cat([fresh, new]), torch.cat([target, target]), replay_size=4)
    assert torch.equal(x[:4], first_x) and torch.equal(y[:4], first_target)
    assert torch.equal(x[4:], new)
    assert torch.equal(y[4:], mixup_target(target, 10, smoothing=0.1))
    x, y = mixup(torch.cat([new, fresh]), torch.cat([target, target]), replay_size=4)
    assert torch.equal(x, torch.cat([new, fresh]))  # recorded "no mixing" is replayed as such


def test_mixup_state_round_trip():
    np.random.seed(4)
    mixup = _mixup(ReplayMixup, 'pair', 'switch')
    mixup(_images(6, 0), torch.arange(6))
    buffer = io.BytesIO()
    torch.save(mixup.state_dict(), buffer)
    buffer.seek(0)
    restored = _mixup(ReplayMixup, 'pair', 'switch')
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    x, target = torch.cat([_images(6, 1), _images(4, 2)]), torch.arange(10)
    expected, _ = mixup(x.clone(), target, replay_size=6)
    replayed, _ = restored(x.clone(), target, replay_size=6)
    assert torch.equal(replayed[:6], expected[:6])


def test_replay_without_recorded_params_is_an_error():
    mixup = _mixup(ReplayMixup, 'batch', 'mixup')
    with pytest.raises(ValueError, match='No mixing parameters recorded'):
        mixup(_images(8, 0), torch.arange(8), replay_size=4)
    mixup(_images(4, 0), torch.arange(4))
    with pytest.raises(ValueError, match='No mixing parameters recorded'):
        mixup(_images(8, 0), torch.arange(8), replay_size=2)
